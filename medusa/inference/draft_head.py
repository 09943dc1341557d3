"""What turns shared-projection heads' features into guesses at decode time (`draft_projection`): the rows of
the base's lm_head the heads guess among, in the form a step reads fastest. Only each head's top-k matters and
the base model verifies every guess, so outputs never change, and guesses rarely.

With a quantized or fp32 base on a CPU the rows are read as 4-bit codes and each guess's best rows scored again
from bf16 rows (`Int4DraftProjection`). On the default heads' answers to 12 dev prompts (4-bit base, 3,620
guesses), against the base's lm_head weights in fp32: a bf16 copy alone changes 2.1% of the top-1 guesses, 4-bit
codes alone 18%, 4-bit codes rescored 0.4%; the base's own rounding (its products' bf16 activations) moves 2.7%
of them. A proposal level of the default heads then reads 7.8 MB of rows instead of 25.
"""
from __future__ import annotations

import torch
from torch import nn

from medusa.inference.heads import MedusaHeads
from medusa.inference.quantized import Int4Linear, available, dense_weight, fits, quantize_groupwise


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


EXACT_ROWS = 32      # per guess, the best rows an Int4DraftProjection scores again (shipped trees use 10 at most)


class Int4DraftProjection(nn.Module):
    """Some rows of the base's lm_head, held twice: as 4-bit codes in groups of 32 (`quantize_groupwise`),
    through which every row's logit is computed, and in bf16, from which the `exact` best rows' logits are
    computed again. The 4-bit product reads a quarter of the bf16 bytes; the rescoring makes the top of the
    ranking the bf16 rows' own. `token_ids[i]` is output i's token."""

    def __init__(self, lm_head: nn.Module, token_ids: torch.Tensor | None, exact: int = EXACT_ROWS):
        super().__init__()
        w = dense_weight(lm_head).detach()
        ids = torch.arange(w.shape[0], device=w.device) if token_ids is None else token_ids.to(w.device)
        rows = w[ids].float()
        bias = None if lm_head.bias is None else lm_head.bias.detach()[ids].float()
        self.coarse = Int4Linear(quantize_groupwise(rows), bias)
        self.register_buffer("rows", rows.to(torch.bfloat16))
        self.register_buffer("token_ids", ids, persistent=False)
        self.out_features, self.in_features = rows.shape
        self.exact = min(exact, self.out_features)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.coarse(x)                                               # (..., V') from the 4-bit codes
        flat = y.reshape(-1, self.out_features)                          # (n, V')
        best = flat.topk(self.exact, dim=-1).indices                     # (n, R)
        # products and a sum, not a batched matmul: a row's logits are the same whatever rows share the call
        exact = (self.rows[best].float() * x.reshape(-1, 1, self.in_features).float()).sum(-1)     # (n, R)
        if self.coarse.bias is not None:
            exact = exact + self.coarse.bias[best]
        return flat.scatter(-1, best, exact.to(flat.dtype)).reshape(y.shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, exact={self.exact}"


def draft_projection(lm_head: nn.Module, heads: MedusaHeads) -> nn.Module:
    """What turns shared-projection heads' features into guesses at decode time. Only each head's top-k
    matters and the base model verifies every guess, so (outputs never change, guesses rarely):
    - heads with a draft vocabulary guess among those tokens only (the product reads only their rows);
    - with a quantized or fp32 base on a CPU the rows are held as 4-bit codes, each guess's best rescored from
      bf16 rows (`Int4DraftProjection`); in bf16 alone where torch lacks the int4 kernel or the hidden size is
      not a multiple of 32.
    Otherwise the base's own lm_head. `guess` maps output i to `token_ids[i]` when there is one."""
    w = getattr(lm_head, "weight", None)
    if not heads.config.shared_lm_head or not isinstance(lm_head, (nn.Linear, Int4Linear)):
        return lm_head
    vocab = getattr(heads, "draft_vocab", None)
    if isinstance(lm_head, Int4Linear) or (w.dtype == torch.float32 and w.device.type == "cpu"):
        if available() and fits(lm_head.in_features):
            return Int4DraftProjection(lm_head, vocab)
        return DraftProjection(lm_head, vocab, torch.bfloat16)
    return lm_head if vocab is None else DraftProjection(lm_head, vocab, w.dtype)

