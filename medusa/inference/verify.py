"""Verifying: one forward pass of the stock transformers model over every row's candidate tree.

Rows' trees are padded to the longest (a padding node sees only itself and is never read). Each row's nodes
attend to that row's cache and their own ancestors through a 4D additive float mask (0 = attend, dtype min =
blocked) with explicit position ids, or, under medusa_tree attention, through each node's path
(tree_attention.py), which gives each row of a batch the arithmetic it gets alone. Sliding-window layers get the mask with their window applied (a dict by layer type for
models that take one). A lone root of a lone row needs no mask: the model's own causal path then matches
`generate` exactly. With a greedy head (greedy decoding, greedy_head.py) the model skips its output projection
and only each node's argmax is computed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa.inference.packed_linear import engaged
from medusa.inference.propose import Candidates
from medusa.inference.tree_attention import plan, step_index

NO_LOGITS = torch.empty(0, dtype=torch.long)   # logits_to_keep for a forward whose logits nobody reads


@dataclass
class Verified:
    """One row's share of the forward: per node, its hidden state, and its logits or the base's greedy choice."""
    hidden: torch.Tensor                 # (n, H)
    logits: torch.Tensor | None = None   # (n, V)
    choice: torch.Tensor | None = None   # (n,)


class Verifier:
    """How forwards run, fixed at load: `run` the model (or its compiled forward), `greedy_head` or None,
    `tree_attention` whether the model uses medusa_tree attention, `dtype` the masks'."""

    def __init__(self, run, *, greedy_head=None, tree_attention: bool = False, dtype=torch.float32,
                 window: int | None = None, layer_types: tuple[str, ...] | None = None):
        self.run, self.greedy_head, self.tree_attention, self.dtype = run, greedy_head, tree_attention, dtype
        # sliding-window layers (cache.mask_layout): the window, and the layer types given a mask each
        self.window, self.layer_types = window, layer_types

    def forward(self, ids, cache, positions, mask=None, logits_to_keep=0, **extra):
        """-> (logits (B, n, V) or empty, last hidden states (B, n, H))."""
        with engaged():   # packed weights serve decoding's products (packed_linear.py), never `generate`'s
            out = self.run(input_ids=ids, past_key_values=cache, position_ids=positions, attention_mask=mask,
                           use_cache=True, output_hidden_states=True, logits_to_keep=logits_to_keep, **extra)
        # logits and the heads' input come from the same forward (soft-capped models need out.logits)
        return out.logits, out.hidden_states[-1]

    def prefill(self, ids: torch.Tensor, cache, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt (T,) into the cache (the row it focuses on, which holds the prompt's first `start` tokens: a
        chunk of a long prompt) -> (logits (V,), hidden (H,)) at its last token."""
        ids = ids.clone()[None]   # an inference tensor like every later input: one compiled graph serves both
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        logits, hidden = self.forward(ids, cache, positions, logits_to_keep=1)
        return logits[0, -1], hidden[0, -1]

    def verify(self, cache, lengths: list[int], cands: list[Candidates], greedy: list[bool]) -> list[Verified]:
        """One forward over the rows in use of `cache` (row b: `lengths[b]` cached entries, candidates
        `cands[b]`, decoded greedily if `greedy[b]`)."""
        device = cands[0].tokens.device
        sizes = [c.tokens.numel() for c in cands]
        B, N = len(cands), max(sizes)
        ids = torch.zeros(B, N, dtype=torch.long, device=device)
        positions = torch.tensor(lengths, device=device)[:, None].repeat(1, N)
        for b, c in enumerate(cands):
            ids[b, :sizes[b]] = c.tokens
            positions[b, :sizes[b]] += c.tree.depth
        mask, extra = self._attention(lengths, cands, N)
        use_head = self.greedy_head is not None and all(greedy)
        logits, hidden = self.forward(ids, cache, positions, mask, NO_LOGITS if use_head else 0, **extra)
        if use_head:
            choice = self.greedy_head(torch.cat([hidden[b, :n] for b, n in enumerate(sizes)])).split(sizes)
            return [Verified(hidden[b, :n], choice=choice[b]) for b, n in enumerate(sizes)]
        return [Verified(hidden[b, :n], logits[b, :n], logits[b, :n].argmax(-1) if greedy[b] else None)
                for b, n in enumerate(sizes)]

    def _attention(self, lengths: list[int], cands: list[Candidates], N: int) -> tuple[torch.Tensor | None, dict]:
        """The forward's attention: (a 4D additive mask or None, {"medusa_tree": each row's path indices} or {})."""
        if len(cands) == 1 and N == 1:
            return None, {}
        if self.tree_attention:      # a batch's one-token steps too: each row over its own cache only, as alone
            return None, {"medusa_tree": plan(step_index(c.shape, n) for c, n in zip(cands, lengths))}
        device, low = cands[0].tokens.device, torch.finfo(self.dtype).min
        width = max(lengths) + N
        mask = torch.full((len(cands), 1, N, width), low, dtype=self.dtype, device=device)
        for b, (c, n) in enumerate(zip(cands, lengths)):
            size = c.tokens.numel()
            mask[b, 0, :, :n] = 0
            if size == 1:
                mask[b, 0, 0, n] = 0
            else:
                mask[b, 0, :size, n:n + size] = c.shape
            pad = torch.arange(size, N, device=device)
            mask[b, 0, pad, n + pad] = 0        # a padding node sees only itself
        return self._windowed(mask, lengths, cands), {}

    def _windowed(self, mask: torch.Tensor, lengths: list[int], cands: list[Candidates]):
        """`mask` as every layer takes it: without a window, as it is; else the window applied (a node at
        position p sees cached positions above p - window), for every layer or as the sliding layers' mask."""
        if self.window is None:
            return mask
        slid = mask.clone()
        cols = torch.arange(mask.shape[-1], device=mask.device)
        for b, (c, n) in enumerate(zip(cands, lengths)):
            pos = torch.full((mask.shape[2],), n, device=mask.device)
            pos[:c.tokens.numel()] += c.tree.depth
            slid[b, 0][cols[None] <= pos[:, None] - self.window] = torch.finfo(self.dtype).min
        if self.layer_types is None:
            return slid
        return {t: slid if t == "sliding_attention" else mask for t in self.layer_types}
