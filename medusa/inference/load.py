"""Trees sized to the load: whether a batch's rows verify their trees or decode one token per step.

A step costs about the same for a few tokens as for one (reading the weights dominates), and then more and more
as the forward's tokens grow (the products turn compute-bound): on a 2-core CPU already past a few rows, on a
GPU past hundreds. So a tree that pays for one row can cost more than it gains for sixteen. `TreeByLoad`
measures, as a batch runs, the tokens per second its steps give with trees and without them for each number of
rows, and each step takes the faster, trying the other one now and then. Only rows whose acceptance is exact
(greedy, lossless sampling) follow it: their output is the same either way. A lone row always keeps its tree.
"""
from __future__ import annotations


class TreeByLoad:
    """`use_trees(rows)` -> whether this step's exact rows verify their trees; `record(...)` its outcome."""

    def __init__(self, explore_every: int = 48, smoothing: float = 0.3):
        self.rate: dict[tuple[int, bool], float] = {}     # (rows, trees) -> tokens/s, smoothed
        self.explore_every, self.smoothing, self.steps = explore_every, smoothing, 0

    def _trees_lost(self, rows: int) -> bool:
        """Whether plain steps were measured faster at this many rows or fewer: a step's cost grows with its
        tokens, so trees that lose for fewer rows lose for more."""
        return any(r <= rows and self.rate[(r, True)] < self.rate[(r, False)]
                   for r, trees in self.rate if trees and (r, False) in self.rate)

    def use_trees(self, rows: int) -> bool:
        if rows <= 1:
            return True
        self.steps += 1
        explore = self.steps % self.explore_every == 0
        trees, plain = self.rate.get((rows, True)), self.rate.get((rows, False))
        if trees is None or plain is None:
            if self._trees_lost(rows):          # known to lose: plain, trying trees only now and then
                return explore
            return trees is None                # measure each way once
        better = trees >= plain
        return (not better) if explore else better

    def record(self, rows: int, trees: bool, tokens: int, seconds: float) -> None:
        if rows <= 1 or seconds <= 0:
            return
        key, rate = (rows, trees), tokens / seconds
        old = self.rate.get(key)
        self.rate[key] = rate if old is None else old + self.smoothing * (rate - old)
