"""Medusa heads: K small networks on the base model's last hidden state.

Head i (from 0) at position t guesses token t + 2 + i (the base's own head guesses t + 1). Each head is
L residual blocks `x + SiLU(W x + b)`, each with its own weights, then an output projection: the head's
own (initialized from the base's `lm_head`), or the base's `lm_head` shared and frozen.

With `next_token_input`, each head's first block also sees the input embedding of token t + 1 (at decode
time the tree's root, the base's own next token, known before the heads run): `x + SiLU(W x + U e + b)`.
A head that knows the word it continues guesses far better (the idea behind Hydra's and EAGLE's drafts),
at the cost of one embedding lookup; the heads stay one forward each, so the tree is unchanged. Such heads
are ours only: the serving engines' Medusa formats have no place for U.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class HeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True          # reuse the base's lm_head (frozen) instead of one projection per head
    next_token_input: bool = False       # first block also sees the embedding of token t + 1 (see above)
    draft_vocab_size: int = 0            # > 0: guesses at decode time only among these tokens (draft_projection)
    base_model_name_or_path: str | None = None
    extra: dict = field(default_factory=dict)  # provenance, training notes; kept verbatim

    def __post_init__(self):
        if self.next_token_input and self.num_layers < 1:
            raise ValueError("next_token_input needs at least one residual block (num_layers >= 1)")

    def save(self, folder: str | Path) -> None:
        data = {"medusa_heads": True, **asdict(self)}
        (Path(folder) / "medusa_config.json").write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "HeadsConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class ResBlock(nn.Module):
    """x + SiLU(W x + b [+ extra]); W and b start at zero, so an untrained block is the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        z = self.linear(x)
        return x + F.silu(z if extra is None else z + extra)


class MedusaHead(nn.Module):
    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.blocks = nn.ModuleList([ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)])
        self.proj = None if cfg.shared_lm_head else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.token = None
        if cfg.next_token_input:   # U, zero at first: untrained, the head ignores the next token
            self.token = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
            nn.init.zeros_(self.token.weight)

    def features(self, hidden: torch.Tensor, next_embeds: torch.Tensor | None = None) -> torch.Tensor:
        for j, block in enumerate(self.blocks):
            hidden = block(hidden, self.token(next_embeds) if j == 0 and self.token is not None else None)
        return hidden


class MedusaHeads(nn.Module):
    """All K heads. `forward(hidden, lm_head)` -> logits (K, *hidden.shape[:-1], V)."""

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.config = cfg
        self.heads = nn.ModuleList([MedusaHead(cfg) for _ in range(cfg.num_heads)])
        if cfg.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def init_projections_from(self, lm_head: nn.Module) -> None:
        """Copy the base's output projection into every head's own projection (no-op when shared)."""
        with torch.no_grad():
            for head in self.heads:
                if head.proj is not None:
                    head.proj.weight.copy_(lm_head.weight)

    def features(self, hidden: torch.Tensor, upto: int | None = None,
                 next_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) -> (K, ..., H): each head's residual blocks (before the projection), in the heads' dtype;
        only the first `upto` heads when given. `next_embeds` (..., H): the input embeddings of the tokens
        that follow (see `next_token_embeds`), required by and only by `next_token_input` heads."""
        if self.config.next_token_input != (next_embeds is not None):
            raise ValueError("these heads take the next token's embedding: pass `next_embeds`"
                             if self.config.next_token_input else
                             "`next_embeds` given but these heads do not take the next token (next_token_input=False)")
        param = next(self.parameters(), None)
        if param is not None:
            hidden = hidden.to(param.dtype)
            next_embeds = None if next_embeds is None else next_embeds.to(param.dtype)
        return torch.stack([h.features(hidden, next_embeds) for h in self.heads[:upto]])

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None, upto: int | None = None,
                next_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (K, ..., V), or (upto, ..., V): a tree of depth d needs only the first d heads."""
        feats = self.features(hidden, upto, next_embeds)
        if self.config.shared_lm_head:
            if lm_head is None:
                raise ValueError("these heads share the base model's lm_head: pass it as `lm_head`")
            return lm_head(feats.to(lm_head.weight.dtype))
        return torch.stack([h.proj(f) for h, f in zip(self.heads, feats)])


def next_token_embeds(heads: MedusaHeads, embedding: nn.Module, next_ids: torch.Tensor) -> torch.Tensor | None:
    """What `next_embeds` the heads take for these next tokens: their input embeddings, or None for heads
    that do not use them."""
    return embedding(next_ids) if heads.config.next_token_input else None


def shifted(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): the token after each position (the last one repeats itself; no target reads it)."""
    return torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)


MIN_DRAFT_VOCAB = 32


def set_draft_vocab(heads: MedusaHeads, counts: torch.Tensor) -> None:
    """Restrict the heads' guesses at decode time to the tokens they were trained on: `counts` (V,) how often
    each token was a target. A head never learned to guess the others, and an unseen token costs its row of
    the output projection every step (the guesses read all V rows: ~5 ms for SmolLM2 on a CPU, a tenth of a
    step). Kept in the heads' state (buffer `draft_vocab`); no-op when every token was seen. At least
    MIN_DRAFT_VOCAB tokens (unseen ones fill up), so that any tree's top-k ranks exist."""
    seen = counts > 0
    if int(seen.sum()) in (0, heads.config.vocab_size):
        return
    seen[(~seen).nonzero().flatten()[: max(0, MIN_DRAFT_VOCAB - int(seen.sum()))]] = True
    ids = seen.nonzero().flatten()
    heads.config.draft_vocab_size = ids.numel()
    heads.register_buffer("draft_vocab", ids.to(torch.long))


class DraftProjection(nn.Linear):
    """The heads' guesses: some rows of the base's lm_head (`token_ids[i]` is output i's token)."""

    def __init__(self, lm_head: nn.Linear, token_ids: torch.Tensor | None, dtype: torch.dtype):
        w, b = lm_head.weight.detach(), None if lm_head.bias is None else lm_head.bias.detach()
        ids = torch.arange(w.shape[0], device=w.device) if token_ids is None else token_ids.to(w.device)
        super().__init__(w.shape[1], ids.numel(), bias=b is not None, device="meta")  # no random init
        self.weight = nn.Parameter(w[ids].to(dtype), requires_grad=False)
        if b is not None:
            self.bias = nn.Parameter(b[ids].to(dtype), requires_grad=False)
        self.register_buffer("token_ids", ids, persistent=False)
        self.eval()


def guess(heads: MedusaHeads, hidden: torch.Tensor, draft_head: nn.Module, k: int, *, upto: int | None = None,
          next_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(upto or K, k) token ids: each head's k best guesses at decode time, through `draft_head`."""
    top = heads(hidden, draft_head, upto=upto, next_embeds=next_embeds).topk(k, dim=-1).indices
    ids = getattr(draft_head, "token_ids", None)
    return top if ids is None else ids[top]   # a draft vocabulary's rows -> their tokens


def draft_projection(lm_head: nn.Module, heads: MedusaHeads) -> nn.Module:
    """What turns shared-projection heads' features into guesses at decode time. Only each head's top-k
    matters and the base model verifies every guess, so (outputs never change, guesses rarely):
    - heads with a draft vocabulary guess among those tokens only (the product reads only their rows);
    - with an fp32 base on a CPU the rows are copied once to bf16 (several times faster there).
    Otherwise the base's own lm_head. `guess` maps output i to `token_ids[i]` when there is one."""
    w = getattr(lm_head, "weight", None)
    if not heads.config.shared_lm_head or not isinstance(lm_head, nn.Linear) or w is None:
        return lm_head
    vocab = getattr(heads, "draft_vocab", None)
    fp32_cpu = w.dtype == torch.float32 and w.device.type == "cpu"
    if vocab is None and not fp32_cpu:
        return lm_head
    return DraftProjection(lm_head, vocab, torch.bfloat16 if fp32_cpu else w.dtype)
