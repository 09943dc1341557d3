"""Medusa heads: K small networks on the base model's last hidden state.

Head i (from 0) at position t guesses token t + 2 + i (the base's own head guesses t + 1). Each head is
L residual blocks `x + SiLU(W x + b)`, each with its own weights, then an output projection: the head's
own (initialized from the base's `lm_head`), or the base's `lm_head` shared and frozen.

With `next_token_input`, each head's first block also sees the input embedding of token t + 1 (at decode
time the tree's root, the base's own next token, known before the heads run): `x + SiLU(W x + U e + b)`.
A head that knows the word it continues guesses far better (the idea behind Hydra's and EAGLE's drafts),
at the cost of one embedding lookup; the heads stay one forward each, so the tree is unchanged. Such heads
are ours only: the serving engines' Medusa formats have no place for U.

With `parent_token_input` as well, head i >= 1's first block also sees the embedding of token t + 1 + i,
the token its guess follows: `x + SiLU(W x + U e + V p + b)`. At decode time that is the tree node's parent,
head i-1's guess, so each head's guesses depend on the path they extend (Hydra's sequential heads): the
tree is then proposed level by level, head i once per node of depth i that has children (`propose`).
In training and evaluation the heads see the true tokens (`true_inputs`): what a path that is still being
accepted holds.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F


_FIELD_KINDS = {"int": ((int,), "an integer"), "bool": ((bool,), "true or false"),
                "str | None": ((str, type(None)), "a string or null")}


@dataclass
class HeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True          # reuse the base's lm_head (frozen) instead of one projection per head
    next_token_input: bool = False       # first block also sees the embedding of token t + 1 (see above)
    parent_token_input: bool = False     # head i >= 1's first block also sees token t + 1 + i (its parent's)
    draft_vocab_size: int = 0            # > 0: guesses at decode time only among these tokens (draft_projection)
    base_model_name_or_path: str | None = None
    extra: dict = field(default_factory=dict)  # provenance, training notes; kept verbatim

    def __post_init__(self):
        for f in fields(self):     # a config file may say "hidden_size": "576"
            value, (kinds, what) = getattr(self, f.name), _FIELD_KINDS.get(f.type, ((object,), ""))
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"{f.name} must be {what}, not {value!r}")
        if self.next_token_input and self.num_layers < 1:
            raise ValueError("next_token_input needs at least one residual block (num_layers >= 1)")
        if self.parent_token_input and not self.next_token_input:
            raise ValueError("parent_token_input needs next_token_input (head 0's parent is the next token)")
        if self.parent_token_input and self.num_heads < 2:
            raise ValueError("parent_token_input needs at least 2 heads (head 0 has no parent but the next token)")

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


def _zero_linear(size: int) -> nn.Linear:
    layer = nn.Linear(size, size, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


class MedusaHead(nn.Module):
    def __init__(self, cfg: HeadsConfig, index: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList([ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)])
        self.proj = None if cfg.shared_lm_head else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # U and V start at zero: untrained, the head ignores the tokens
        self.token = _zero_linear(cfg.hidden_size) if cfg.next_token_input else None
        self.parent = _zero_linear(cfg.hidden_size) if cfg.parent_token_input and index > 0 else None

    def features(self, hidden: torch.Tensor, next_embeds: torch.Tensor | None = None,
                 parent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        extra = None if self.token is None else self.token(next_embeds)
        if self.parent is not None:
            extra = extra + self.parent(parent_embeds)
        for j, block in enumerate(self.blocks):
            hidden = block(hidden, extra if j == 0 else None)
        return hidden


class MedusaHeads(nn.Module):
    """All K heads. `forward(hidden, lm_head)` -> logits (K, *hidden.shape[:-1], V)."""

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.config = cfg
        self.heads = nn.ModuleList([MedusaHead(cfg, i) for i in range(cfg.num_heads)])
        if cfg.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def init_projections_from(self, weight: torch.Tensor) -> None:
        """Copy the base's output projection (its (V, H) weight) into every head's own projection (no-op when
        shared)."""
        with torch.no_grad():
            for head in self.heads:
                if head.proj is not None:
                    head.proj.weight.copy_(weight)

    def _check_inputs(self, next_embeds, parent_embeds, first_only: bool = False) -> None:
        """`first_only`: for head 0 alone, which takes no parent."""
        for name, flag, given in (("next", self.config.next_token_input, next_embeds),
                                  ("parent", self.config.parent_token_input and not first_only, parent_embeds)):
            if flag != (given is not None):
                raise ValueError(f"these heads take the {name} token's embedding: pass `{name}_embeds`" if flag else
                                 f"`{name}_embeds` given but these heads do not take it ({name}_token_input=False)")

    def _cast(self, *xs):
        param = next(self.parameters(), None)
        return [x if x is None or param is None else x.to(param.dtype) for x in xs]

    def features(self, hidden: torch.Tensor, upto: int | None = None, next_embeds: torch.Tensor | None = None,
                 parent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) -> (K, ..., H): each head's residual blocks (before the projection), in the heads' dtype;
        only the first `upto` heads when given. `next_embeds` (..., H): the input embeddings of the tokens
        that follow (see `next_token_embeds`), required by and only by `next_token_input` heads;
        `parent_embeds` (K - 1, ..., H): entry i - 1 for head i, required by and only by `parent_token_input`
        heads (see `true_inputs`)."""
        self._check_inputs(next_embeds, parent_embeds)
        hidden, next_embeds, parent_embeds = self._cast(hidden, next_embeds, parent_embeds)
        return torch.stack([h.features(hidden, next_embeds, None if i == 0 or parent_embeds is None else parent_embeds[i - 1])
                            for i, h in enumerate(self.heads[:upto])])

    def project(self, i: int, feats: torch.Tensor, lm_head: nn.Module | None) -> torch.Tensor:
        """Head i's features -> its logits: through its own projection, or the shared `lm_head`."""
        if not self.config.shared_lm_head:
            return self.heads[i].proj(feats)
        if lm_head is None:
            raise ValueError("these heads share the base model's lm_head: pass it as `lm_head`")
        weight = getattr(lm_head, "weight", None)     # quantized projections take any float input
        return lm_head(feats if weight is None else feats.to(weight.dtype))

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None, upto: int | None = None,
                next_embeds: torch.Tensor | None = None, parent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (K, ..., V), or (upto, ..., V): a tree of depth d needs only the first d heads. Through a
        DraftProjection (`lm_head`) the last dimension is its rows, not token ids (see `guess`)."""
        feats = self.features(hidden, upto, next_embeds, parent_embeds)
        if self.config.shared_lm_head:
            return self.project(0, feats, lm_head)
        return torch.stack([self.project(i, f, lm_head) for i, f in enumerate(feats)])

    def head_logits(self, i: int, hidden: torch.Tensor, lm_head: nn.Module | None, next_embeds=None,
                    parent_embeds=None) -> torch.Tensor:
        """Head i alone: (..., H) -> (..., V) (or a DraftProjection's rows); `parent_embeds` (..., H) the
        tokens its guesses follow."""
        self._check_inputs(next_embeds, parent_embeds, first_only=i == 0)
        hidden, next_embeds, parent_embeds = self._cast(hidden, next_embeds, parent_embeds)
        return self.project(i, self.heads[i].features(hidden, next_embeds, parent_embeds), lm_head)


def next_token_embeds(heads: MedusaHeads, embedding: nn.Module, next_ids: torch.Tensor) -> torch.Tensor | None:
    """What `next_embeds` the heads take for these next tokens: their input embeddings, or None for heads
    that do not use them."""
    return embedding(next_ids) if heads.config.next_token_input else None


def shifted(input_ids: torch.Tensor, by: int = 1) -> torch.Tensor:
    """(B, T) -> (B, T): the token `by` places after each position (the last one repeats past the end; no
    target reads those)."""
    return torch.cat([input_ids[:, by:], input_ids[:, -1:].expand(-1, min(by, input_ids.shape[1]))], dim=1)


def true_inputs(heads: MedusaHeads, embedding: nn.Module, input_ids: torch.Tensor,
                used: torch.Tensor | None = None) -> dict:
    """The token embeddings the heads take at each position of `input_ids` (B, T), from the true tokens (as in
    training and evaluation): `next_embeds` (token t+1) and `parent_embeds` (token t+1+i for head i >= 1), for
    the positions `used` (a (B, T) bool) only when given. Empty for heads that take none."""
    pick = (lambda x: x) if used is None else (lambda x: x[used])
    out = {}
    if heads.config.next_token_input:
        out["next_embeds"] = embedding(pick(shifted(input_ids)))
    if heads.config.parent_token_input:
        out["parent_embeds"] = torch.stack([embedding(pick(shifted(input_ids, 1 + i)))
                                            for i in range(1, heads.num_heads)])
    return out


MIN_DRAFT_VOCAB = 32


def set_draft_vocab(heads: MedusaHeads, counts: torch.Tensor) -> None:
    """Restrict the heads' guesses at decode time to the tokens they were trained on: `counts` (V,) how often
    each token was a target. A head never learned to guess the others, and an unseen token costs its row of
    the output projection every step (the guesses read all V rows, for SmolLM2 a tenth of a CPU step). Kept in the heads' state (buffer `draft_vocab`); no-op when every token was seen. At least
    MIN_DRAFT_VOCAB tokens (unseen ones fill up), so that any tree's top-k ranks exist."""
    seen = counts > 0
    if int(seen.sum()) in (0, heads.config.vocab_size):
        return
    seen[(~seen).nonzero().flatten()[: max(0, MIN_DRAFT_VOCAB - int(seen.sum()))]] = True
    ids = seen.nonzero().flatten()
    heads.config.draft_vocab_size = ids.numel()
    heads.register_buffer("draft_vocab", ids.to(torch.long))


def guess(heads: MedusaHeads, hidden: torch.Tensor, draft_head: nn.Module, k: int, *, upto: int | None = None,
          next_embeds: torch.Tensor | None = None, parent_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(upto or K, ..., k) token ids: each head's k best guesses, through `draft_head` (as at decode time)."""
    return _best(heads(hidden, draft_head, upto=upto, next_embeds=next_embeds, parent_embeds=parent_embeds), draft_head, k)


def _token_ids(rows: torch.Tensor, draft_head: nn.Module) -> torch.Tensor:
    """`draft_head`'s output rows -> token ids (a draft vocabulary's rows -> their tokens)."""
    ids = getattr(draft_head, "token_ids", None)
    return rows if ids is None else ids[rows]


def _best(logits: torch.Tensor, draft_head: nn.Module, k: int) -> torch.Tensor:
    """The k best outputs of `draft_head` as token ids."""
    return _token_ids(logits.topk(k, dim=-1).indices, draft_head)


def ranked_guesses(logits: torch.Tensor, draft_head: nn.Module, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V') logits through `draft_head` -> (probabilities, token ids), each (..., k): the k best guesses and
    their softmax probabilities (over the draft vocabulary where there is one)."""
    logp, top = logits.float().log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
    return logp.exp(), _token_ids(top, draft_head)


def propose(heads: MedusaHeads, tree, hidden: torch.Tensor, root: torch.Tensor, draft_head: nn.Module,
            embedding: nn.Module) -> torch.Tensor:
    """(tree.head_nodes,) the tree's tokens at decode time: the root (the base's own next token), then each
    node's guess, the rank-th best of its head. `hidden` (H,): the base's last hidden state before the root.
    A batch of rows sharing the tree at once: `hidden` (B, H) and `root` (B,) give (B, tree.head_nodes).
    Heads that take their parent's token run level by level: head d once for each node of depth d that has
    children, its guesses following that node's token."""
    single = hidden.dim() == 1
    hidden, root = hidden.reshape(-1, hidden.shape[-1]), root.reshape(-1)
    B, n = root.numel(), tree.head_nodes
    tokens = root[:, None].repeat(1, n)
    if n > 1:
        nxt = next_token_embeds(heads, embedding, root)       # heads that condition on the root
        if not heads.config.parent_token_input:
            top = guess(heads, hidden, draft_head, tree.topk, upto=tree.max_depth, next_embeds=nxt)  # (d, B, k)
            tokens[:, 1:] = top[tree.head[1:n], :, tree.rank[1:n]].T
        for d, (nodes, parents, rows, k) in enumerate(tree.levels if heads.config.parent_token_input else ()):
            m = parents.numel()
            par = embedding(tokens[:, parents]) if d > 0 else None
            x = None if nxt is None else nxt[:, None].expand(B, m, -1)
            top = _best(heads.head_logits(d, hidden[:, None].expand(B, m, -1), draft_head, x, par), draft_head, k)
            tokens[:, nodes] = top[:, rows, tree.rank[nodes]]
    return tokens[0] if single else tokens
