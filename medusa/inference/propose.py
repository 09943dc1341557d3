"""Proposing: a row's candidate tree for one step, from its heads (a static or a dynamic tree) and its context
drafts (lookup.py).

The root is the base model's own next token; the heads fill the rest of the tree, and context drafts (when on)
add a chain under the root (tree.with_drafts). A tree's buffers, and its attention block or its medusa_tree
path groups, are built once per shape it takes (`TreeShapes`): a static tree has one shape per draft length,
a dynamic tree one per set of paths it picks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medusa.inference.dynamic import propose_dynamic
from medusa.inference.heads import MedusaHeads, propose
from medusa.inference.tree import DynamicTree, TreeBuffers, tree_buffers, with_drafts
from medusa.inference.tree_attention import tree_paths


class TreeShapes:
    """A tree (static paths or a DynamicTree) as the buffers each step needs, built once per shape."""

    def __init__(self, tree, device, dtype, tree_attention: bool):
        self.tree = tree if isinstance(tree, (DynamicTree, TreeBuffers)) else tree_buffers(tree)
        self.device, self.dtype, self.tree_attention = device, dtype, tree_attention
        self._built: dict[tuple, tuple] = {}

    @property
    def nodes(self) -> int:
        return self.tree.num_nodes

    @property
    def dynamic(self) -> bool:
        return isinstance(self.tree, DynamicTree)

    def get(self, drafted: int, paths: tuple = ()) -> tuple[TreeBuffers, object]:
        """-> (the tree with `drafted` context drafts, its medusa_tree path groups or its additive (N, N) block).
        `paths`: a dynamic tree's choice this step."""
        key = (paths, drafted)
        if key not in self._built:
            heads_tree = tree_buffers(list(paths)) if self.dynamic else self.tree
            t = with_drafts(heads_tree, drafted).to(self.device)
            self._built[key] = (t, tree_paths(t) if self.tree_attention else _additive(t.attn_mask, self.dtype))
        return self._built[key]


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


@dataclass
class Candidates:
    tree: TreeBuffers        # this step's tree (drafts included)
    tokens: torch.Tensor     # (N,) each node's token; node 0 is the root
    shape: object            # the tree's additive (N, N) block, or its medusa_tree path groups


@dataclass
class Proposal:
    """What a row brings to a step's proposal."""
    shapes: TreeShapes       # its tree (the root alone where its cache has no room for more)
    root: torch.Tensor       # its next token
    hidden: torch.Tensor     # (H,) the base's last hidden state before the root
    context: object = None   # its ContextIndex, or None (no drafts)
    room: int | None = None  # cache entries it has left (>= shapes.nodes)


class Proposer:
    """The heads and what they guess through, fixed at load. `pad`: the row count a forward pays for anyway
    (packed_linear.padded_rows), which context drafts may fill, or None."""

    def __init__(self, heads: MedusaHeads, draft_head: nn.Module, embedding: nn.Module, pad=None):
        self.heads, self.draft_head, self.embedding, self.pad = heads, draft_head, embedding, pad

    def propose(self, rows: list[Proposal]) -> list[Candidates]:
        """Each row's candidates. Rows sharing a static tree run their heads in one call; a dynamic tree's
        shape is each row's own. A lone row's drafts may fill the rows the products pad to."""
        heads_tokens: dict[int, torch.Tensor] = {}
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if not (r.shapes.dynamic and r.shapes.nodes > 1):
                groups.setdefault(id(r.shapes), []).append(i)
        for idx in groups.values():
            tree, _ = rows[idx[0]].shapes.get(0)
            out = propose(self.heads, tree, torch.stack([rows[i].hidden for i in idx]),
                          torch.stack([rows[i].root.reshape(()) for i in idx]), self.draft_head, self.embedding)
            heads_tokens.update(zip(idx, out))
        return [self._one(r, heads_tokens.get(i), alone=len(rows) == 1) for i, r in enumerate(rows)]

    def _one(self, r: Proposal, tokens: torch.Tensor | None, alone: bool) -> Candidates:
        n_tree = r.shapes.nodes
        pad = self.pad if alone else None
        fill = (lambda n: pad(n_tree + n) - n_tree) if pad is not None else None
        limit = None if r.room is None else r.room - n_tree
        drafts = r.context.draft(int(r.root), limit, fill) if r.context is not None else []
        if tokens is None:          # a dynamic tree: its paths are chosen from this row's heads
            paths, pick = propose_dynamic(self.heads, r.shapes.tree, r.hidden, r.root, self.draft_head,
                                          self.embedding)
            tree, shape = r.shapes.get(len(drafts), paths)
            tokens = pick(tree)
        else:
            tree, shape = r.shapes.get(len(drafts))
        if drafts:
            tokens = torch.cat([tokens, torch.tensor(drafts, dtype=torch.long, device=tokens.device)])
        return Candidates(tree, tokens, shape)
