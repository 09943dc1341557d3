"""What turns shared-projection heads' features into guesses at decode time (`draft_projection`)."""
from __future__ import annotations

import torch
from torch import nn

from medusa.inference.heads import MedusaHeads
from medusa.inference.quantized import Int4Linear, dense_weight


class DraftProjection(nn.Linear):
    """The heads' guesses: some rows of the base's lm_head (`token_ids[i]` is output i's token)."""

    def __init__(self, lm_head: nn.Module, token_ids: torch.Tensor | None, dtype: torch.dtype):
        w, b = dense_weight(lm_head).detach(), None if lm_head.bias is None else lm_head.bias.detach()
        ids = torch.arange(w.shape[0], device=w.device) if token_ids is None else token_ids.to(w.device)
        super().__init__(w.shape[1], ids.numel(), bias=b is not None, device="meta")  # no random init
        self.weight = nn.Parameter(w[ids].to(dtype), requires_grad=False)
        if b is not None:
            self.bias = nn.Parameter(b[ids].to(dtype), requires_grad=False)
        self.register_buffer("token_ids", ids, persistent=False)
        self.eval()


def draft_projection(lm_head: nn.Module, heads: MedusaHeads) -> nn.Module:
    """What turns shared-projection heads' features into guesses at decode time. Only each head's top-k
    matters and the base model verifies every guess, so (outputs never change, guesses rarely):
    - heads with a draft vocabulary guess among those tokens only (the product reads only their rows);
    - with an fp32 or quantized base on a CPU the rows are copied once to bf16 (several times faster there).
    Otherwise the base's own lm_head. `guess` maps output i to `token_ids[i]` when there is one."""
    if heads.config.shared_lm_head and isinstance(lm_head, Int4Linear):
        return DraftProjection(lm_head, getattr(heads, "draft_vocab", None), torch.bfloat16)
    w = getattr(lm_head, "weight", None)
    if not heads.config.shared_lm_head or not isinstance(lm_head, nn.Linear) or w is None:
        return lm_head
    vocab = getattr(heads, "draft_vocab", None)
    fp32_cpu = w.dtype == torch.float32 and w.device.type == "cpu"
    if vocab is None and not fp32_cpu:
        return lm_head
    return DraftProjection(lm_head, vocab, torch.bfloat16 if fp32_cpu else w.dtype)
