"""Medusa heads: K small networks on the base model's last hidden state.

Head i (from 0) at position t guesses token t + 2 + i (the base's own head guesses t + 1). Each head is
L residual blocks `x + SiLU(W x + b)`, each with its own weights, then an output projection: the head's
own (initialized from the base's `lm_head`), or the base's `lm_head` shared and frozen.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
    base_model_name_or_path: str | None = None
    extra: dict = field(default_factory=dict)  # provenance, training notes; kept verbatim

    def save(self, folder: str | Path) -> None:
        data = {"medusa_heads": True, **asdict(self)}
        (Path(folder) / "medusa_config.json").write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "HeadsConfig":
        known = {k: data[k] for k in ("hidden_size", "vocab_size", "num_heads", "num_layers", "shared_lm_head",
                                      "base_model_name_or_path", "extra") if k in data}
        return cls(**known)


class ResBlock(nn.Module):
    """x + SiLU(W x + b); W and b start at zero, so an untrained block is the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.blocks = nn.ModuleList([ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)])
        self.proj = None if cfg.shared_lm_head else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class MedusaHeads(nn.Module):
    """All K heads. `forward(hidden, lm_head)` -> logits (K, *hidden.shape[:-1], V)."""

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.config = cfg
        self.heads = nn.ModuleList([MedusaHead(cfg) for _ in range(cfg.num_heads)])

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def init_projections_from(self, lm_head: nn.Module) -> None:
        """Copy the base's output projection into every head's own projection (no-op when shared)."""
        with torch.no_grad():
            for head in self.heads:
                if head.proj is not None:
                    head.proj.weight.copy_(lm_head.weight)

    def features(self, hidden: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """(..., H) -> (K, ..., H): each head's residual blocks (before the projection), in the heads' dtype;
        only the first `upto` heads when given."""
        param = next(self.parameters(), None)
        hidden = hidden if param is None else hidden.to(param.dtype)
        return torch.stack([h.features(hidden) for h in self.heads[:upto]])

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None, upto: int | None = None) -> torch.Tensor:
        """Logits (K, ..., V), or (upto, ..., V): a tree of depth d needs only the first d heads."""
        feats = self.features(hidden, upto)
        if self.config.shared_lm_head:
            if lm_head is None:
                raise ValueError("these heads share the base model's lm_head: pass it as `lm_head`")
            return lm_head(feats.to(lm_head.weight.dtype))
        return torch.stack([h.proj(f) for h, f in zip(self.heads, feats)])


def draft_projection(lm_head: nn.Module, heads: MedusaHeads) -> nn.Module:
    """What turns shared-projection heads' features into guesses at decode time. Only each head's top-k
    matters and the base model verifies every guess, so with an fp32 base on a CPU the lm_head is copied
    once to bf16 (the 4-row product is several times faster there; guesses rarely change, outputs never).
    Otherwise the base's own lm_head."""
    w = getattr(lm_head, "weight", None)
    if (not heads.config.shared_lm_head or not isinstance(lm_head, nn.Linear) or w is None
            or w.dtype != torch.float32 or w.device.type != "cpu"):
        return lm_head
    copy = nn.Linear(w.shape[1], w.shape[0], bias=lm_head.bias is not None, device="meta")  # no random init
    copy.weight = nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
    if lm_head.bias is not None:
        copy.bias = nn.Parameter(lm_head.bias.detach().to(torch.bfloat16), requires_grad=False)
    return copy.eval()
