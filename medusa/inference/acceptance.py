"""Acceptance schemes: which candidates of the verified tree to keep, and how the next root is chosen.

Given the base model's logits at every tree node, each scheme picks the root-to-leaf path whose prefix of
candidates it accepts the longest. The next step's root (the "bonus" token) is then chosen from the
logits at the last accepted node by `next_token`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa.inference.tree import TreeBuffers


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0            # 0 = greedy
    top_p: float = 1.0
    posterior_threshold: float = 0.09   # epsilon of typical acceptance
    posterior_alpha: float = 0.3        # delta of typical acceptance
    mode: str = "typical"               # when sampling: "typical" (fast, approximate) or "lossless"

    def __post_init__(self):
        if self.mode not in ("typical", "lossless"):
            raise ValueError(f"sampling mode must be 'typical' or 'lossless', got {self.mode!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _path_candidates(tokens: torch.Tensor, tree: TreeBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """Per path: candidate tokens at depth 1..D (P, D) and whether that slot exists (P, D)."""
    ret = tree.retrieve
    valid = ret[:, 1:] >= 0
    cand = tokens[ret[:, 1:].clamp(min=0)]
    return cand, valid


def _longest(match: torch.Tensor) -> tuple[int, int]:
    """match (P, D) bool -> (best path, number of leading Trues on it)."""
    if match.shape[1] == 0:
        return 0, 0
    lengths = match.int().cumprod(dim=1).sum(dim=1)
    best = int(lengths.argmax())
    return best, int(lengths[best])


def accept_greedy(choice: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers) -> tuple[int, int]:
    """Accept a candidate when it is the base model's argmax at its parent: the output equals greedy decoding.

    choice (N,) the base's argmax at each node (`logits.argmax(-1)`); tokens (N,) each node's token. Returns
    (path row, accepted candidates).
    """
    cand, valid = _path_candidates(tokens, tree)
    pred = choice[tree.retrieve[:, :-1].clamp(min=0)]                  # (P, D) base's guess at each parent
    return _longest((cand == pred) & valid)


def accept_typical(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers, opts: SamplingOptions) -> tuple[int, int]:
    """Typical acceptance (Medusa paper): accept x at a node with distribution p if
    p(x) > min(epsilon, delta * exp(-H(p))), p being the temperature-scaled base distribution. Of the paths
    accepting the most candidates, the one whose accepted candidates are likeliest wins."""
    cand, valid = _path_candidates(tokens, tree)
    probs = torch.softmax(logits.float() / opts.temperature, dim=-1)            # (N, V)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)          # (N,)
    threshold = torch.minimum(torch.full_like(entropy, opts.posterior_threshold),
                              opts.posterior_alpha * torch.exp(-entropy))
    parents = tree.retrieve[:, :-1].clamp(min=0)                                 # (P, D)
    p_cand = probs[parents, cand]
    ok = (p_cand > threshold[parents]) & valid
    best, longest = _longest(ok)
    if longest == 0:
        return best, longest
    # among the paths accepting the most, the likeliest (the original Medusa's evaluate_posterior)
    tied = (ok.int().cumprod(dim=1).sum(dim=1) == longest).nonzero().flatten()
    likelihood = p_cand[tied, :longest].log().sum(dim=1)
    return int(tied[likelihood.argmax()]), longest


def sampling_probs(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """The distribution plain sampling draws from: softmax(logits / T), cut to the top-p nucleus."""
    probs = torch.softmax(logits.float() / opts.temperature, dim=-1)
    if opts.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > opts.top_p   # keep the smallest set reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p / sorted_p.sum())
    return probs


def next_token(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next root token from the base's logits (V,): argmax, or a temperature / top-p sample."""
    if opts.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, opts), 1, generator=generator)[0]


def accept_lossless(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers, opts: SamplingOptions,
                    generator: torch.Generator | None = None) -> tuple[int, int, torch.Tensor]:
    """Multi-candidate rejection sampling (as in SpecInfer) for deterministic top-k drafts: at each node,
    try its children in rank order, accepting child x with probability p(x) under the current residual
    distribution p; a rejected x is removed from p (p renormalised). When every child is rejected, or at a
    leaf, the next token is drawn from what remains. Every emitted token then follows plain sampling's
    distribution exactly. Returns (path row, accepted candidates, next root token)."""
    node, toks = 0, tokens.tolist()
    p = sampling_probs(logits[0], opts)
    while True:
        for child in tree.children[node]:
            x = toks[child]
            if torch.rand((), generator=generator, device=p.device) < p[x]:
                node, p = child, sampling_probs(logits[child], opts)
                break
            p[x] = 0
            p = p / p.sum()
        else:
            break
    depth = int(tree.depth[node])
    row = int((tree.retrieve[:, depth] == node).nonzero()[0, 0])
    return row, depth, torch.multinomial(p, 1, generator=generator)[0]


def accept(logits: torch.Tensor, tokens: torch.Tensor, tree: TreeBuffers, opts: SamplingOptions,
           generator: torch.Generator | None = None) -> tuple[int, int, torch.Tensor | None]:
    """-> (path row, accepted candidates, the next root token if the scheme fixes it, else None)."""
    if opts.greedy:
        return (*accept_greedy(logits.argmax(dim=-1), tokens, tree), None)
    if opts.mode == "lossless":
        return accept_lossless(logits, tokens, tree, opts, generator)
    return (*accept_typical(logits, tokens, tree, opts), None)
