"""Context drafts (prompt lookup): guess the next tokens by copying what followed the same n-gram earlier.

Summaries, translations, answers about a pasted passage and edited code repeat long spans of their context,
which no head predicts as well as a copy does; small models also fall into loops. Each step, the text so far
plus the step's root token is matched against the context: the longest suffix n-gram (longest first, down to
`min_ngram`) that occurred before, at its latest occurrence, proposes the tokens that followed it. The decode
loop verifies them as one more branch of the candidate tree (tree.with_drafts), so greedy output stays
identical to `generate` and lossless sampling stays lossless: drafts are only candidates.

An index from n-gram to its latest position makes each lookup O(1); it grows with the accepted tokens.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LookupOptions:
    max_tokens: int = 0      # longest draft copied per step; 0 = off
    max_ngram: int = 3
    min_ngram: int = 2

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"lookup draft length must be >= 0, got {self.max_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"lookup n-gram sizes must satisfy 1 <= min ({self.min_ngram}) <= max ({self.max_ngram})")

    @property
    def enabled(self) -> bool:
        return self.max_tokens > 0


DEFAULT = LookupOptions(max_tokens=10)   # transformers' prompt lookup drafts 10 tokens too


class ContextIndex:
    """The tokens so far (prompt + accepted output) and, per n-gram, where its latest continuation starts."""

    def __init__(self, tokens: list[int], opts: LookupOptions):
        self.opts = opts
        self.tokens: list[int] = []
        self.follows: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, new: list[int]) -> None:
        sizes = range(self.opts.min_ngram, self.opts.max_ngram + 1)
        for tok in new:
            end = len(self.tokens)   # the n-grams ending just before `tok` are followed by it
            for n in sizes:
                if end >= n:
                    self.follows[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(tok)

    def draft(self, root: int, limit: int | None = None) -> list[int]:
        """Up to min(max_tokens, limit) tokens expected after the context followed by `root`."""
        limit = self.opts.max_tokens if limit is None else min(limit, self.opts.max_tokens)
        if limit <= 0:
            return []
        for n in range(self.opts.max_ngram, self.opts.min_ngram - 1, -1):
            if n - 1 > len(self.tokens):
                continue
            start = self.follows.get(tuple(self.tokens[len(self.tokens) - (n - 1):]) + (root,))
            if start is not None:
                # copy forward from there; a copy that runs past the end continues into the root and the
                # draft itself (as LZ77 does), so a repeating span is drafted in full, not just its last token
                tail, end = [root], len(self.tokens)
                for j in range(start, start + limit):
                    tail.append(self.tokens[j] if j < end else tail[j - end])
                return tail[1:]
        return []
