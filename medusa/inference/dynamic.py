"""Dynamic trees at decode time: each step's tree is the `nodes - 1` most probable paths under the heads' own
probabilities (tree.DynamicTree; EAGLE-2's dynamic draft tree over Medusa heads' top-k).

Heads whose guesses do not depend on their parent's token give every path's probability from one call of all
heads (`most_likely_paths`). Heads that take their parent's token (Hydra's sequential heads) give a node's
children only once that node's token is known, so the tree grows level by level (`grow`): head d runs on the
`width` most probable nodes of depth d, each as the parent of its guesses. With width >= nodes - 1 that is
exact: the chosen set holds every ancestor of its nodes (a child is never more probable than its parent), and
a node among the `nodes - 1` most probable paths of all depths is among the `nodes - 1` most probable of its
own depth, so its parent was expanded. The same growth measures such trees offline for calibration
(`evaluate.dynamic_parent_tokens`), over many positions at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medusa.inference.heads import MedusaHeads, next_token_embeds, ranked_guesses
from medusa.inference.tree import DynamicTree, most_likely_paths


@dataclass
class Grown:
    """Candidate nodes for n positions, level by level (level d: nodes of depth d + 1). Per level, each (n, C_d):
    the path's probability, the node's token id, its parent's index among the previous level's candidates
    (level 0: 0, the root), and its rank among its parent's guesses."""
    probs: list[torch.Tensor]
    ids: list[torch.Tensor]
    parent: list[torch.Tensor]
    rank: list[torch.Tensor]

    def order(self) -> torch.Tensor:
        """(n, sum C_d): flat candidate indices (levels concatenated), most probable first; on a tie the
        shallower first, so a parent always comes before a child that ties with it."""
        return torch.cat(self.probs, 1).sort(dim=1, descending=True, stable=True).indices

    def paths(self, chosen: list[int]) -> dict[tuple[int, ...], int]:
        """Position 0's candidates at these flat indices -> {path: flat index}."""
        starts = [0]
        for p in self.probs:
            starts.append(starts[-1] + p.shape[1])
        out = {}
        for flat in chosen:
            level = max(d for d in range(len(self.probs)) if starts[d] <= flat)
            j, path = flat - starts[level], []
            for d in range(level, -1, -1):
                path.append(int(self.rank[d][0, j]))
                j = int(self.parent[d][0, j])
            out[tuple(reversed(path))] = flat
        return out


def grow(heads: MedusaHeads, hidden: torch.Tensor, next_embeds: torch.Tensor | None, draft_head: nn.Module,
         embedding: nn.Module, *, depth: int, width: int, topk: int) -> Grown:
    """Parent-token heads' candidate paths for n positions at once: `hidden` (n, H) the base's last hidden
    state, `next_embeds` (n, H) the root's embedding. Head 0 guesses under the root; head d >= 1 under each of
    the `width` most probable depth-d nodes (its parent embedding that node's token). Each guess keeps its
    `topk` best, a path's probability being the product of its heads' softmax probabilities."""
    n = hidden.shape[0]
    out = Grown([], [], [], [])
    front_p = torch.ones(n, 1, device=hidden.device)
    front_idx = torch.zeros(n, 1, dtype=torch.long, device=hidden.device)
    front_tok = None
    for d in range(depth):
        f = front_p.shape[1]
        h = hidden[:, None].expand(n, f, -1)
        nxt = None if next_embeds is None else next_embeds[:, None].expand(n, f, -1)
        par = None if d == 0 else embedding(front_tok)
        p, ids = ranked_guesses(heads.head_logits(d, h, draft_head, nxt, par), draft_head, topk)   # (n, f, k)
        k = p.shape[-1]
        probs = (front_p[..., None] * p).reshape(n, f * k)
        out.probs.append(probs)
        out.ids.append(ids.reshape(n, f * k))
        out.parent.append(front_idx[..., None].expand(n, f, k).reshape(n, f * k))
        out.rank.append(torch.arange(k, device=hidden.device).repeat(f).expand(n, f * k))
        if d + 1 == depth:
            break
        front_p, front_idx = probs.topk(min(width, f * k), dim=1)
        # only nodes still among the `width` most probable of all depths can have a chosen child: a level
        # where none is left ends the growth (an unsure head 1 costs one head call, not `depth` of them)
        every = torch.cat(out.probs, 1)
        live = int((front_p >= every.topk(min(width, every.shape[1]), dim=1).values[:, -1:]).sum(1).max())
        if live == 0:
            break
        front_p, front_idx = front_p[:, :live], front_idx[:, :live]
        front_tok = out.ids[-1].gather(1, front_idx)
    return out


def propose_dynamic(heads: MedusaHeads, tree: DynamicTree, hidden: torch.Tensor, root: torch.Tensor,
                    draft_head: nn.Module, embedding: nn.Module):
    """A DynamicTree's step: -> (its paths this step, a function from the step's TreeBuffers to its tokens as in
    `heads.propose`). A guess's probability is its head's softmax (over the draft vocabulary where there is
    one). Heads that ignore their parent's token run in one call, every head the tree can reach: on a CPU the
    projection's weights are then read once for all of them, which costs less than running only the heads a
    step's tree turns out to reach, one by one. Parent-token heads grow the tree level by level (`grow`)."""
    depth = tree.depth(heads.num_heads)
    nxt = next_token_embeds(heads, embedding, root)
    if heads.config.parent_token_input:
        g = grow(heads, hidden[None], None if nxt is None else nxt[None], draft_head, embedding,
                 depth=depth, width=tree.nodes - 1, topk=tree.topk)
        where = g.paths(g.order()[0, : tree.nodes - 1].tolist())
        ids = torch.cat(g.ids, 1)[0]
        paths = tuple(sorted(where, key=lambda p: (len(p), p)))
        return paths, lambda t: torch.cat([root.view(1), ids[[where[p] for p in t.paths]]])
    logits = heads(hidden, draft_head, upto=depth, next_embeds=nxt)
    probs, ids = ranked_guesses(logits[:depth], draft_head, tree.topk)                  # (depth, topk) each
    paths = tuple(most_likely_paths(probs.tolist(), tree.nodes))
    return paths, lambda t: torch.cat([root.view(1), ids[t.head[1:t.head_nodes], t.rank[1:t.head_nodes]]])
