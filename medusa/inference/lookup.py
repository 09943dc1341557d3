"""Context drafts (prompt lookup): guess the next tokens by copying what followed the same n-gram earlier.

Summaries, translations, answers about a pasted passage and edited code repeat long spans of their context,
which no head predicts as well as a copy does; small models also fall into loops. Each step, the text so far
plus the step's root token is matched against the context: the longest suffix n-gram (longest first, down to
`min_ngram`) that occurred before, at its latest occurrence, proposes the tokens that followed it. The decode
loop verifies them as one more branch of the candidate tree (tree.with_drafts), so greedy output stays
identical to `generate` and lossless sampling stays lossless: drafts are only candidates.

How many tokens to copy: a copy is right either for a long run or not at all, and every drafted token is one
more row in the step's forward pass. So the draft is `max_tokens` long only after a strong match (the text agrees
with what preceded the copy's source for at least `long_match` tokens), `short_tokens` long after a weaker one;
and the decode loop lengthens it to fill rows the step pays for anyway (MKL-packed products pad to 4, 8 or 16
rows, packed_linear.py; oneDNN's, the default, pad nothing). benchmarks/README.md ("Component timings") has the
side-by-side run that set these lengths.

An index from n-gram to its latest position makes each lookup O(1); it grows with the accepted tokens.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LookupOptions:
    max_tokens: int = 0      # longest draft copied per step; 0 = off
    max_ngram: int = 3
    min_ngram: int = 2
    short_tokens: int | None = None   # draft length after a match shorter than long_match (None: max_tokens)
    long_match: int = 4               # tokens of agreement (the n-gram and before it) that earn max_tokens

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"lookup draft length must be >= 0, got {self.max_tokens}")
        if self.short_tokens is not None and not 0 <= self.short_tokens <= self.max_tokens:
            raise ValueError(f"lookup short draft length must be between 0 and max_tokens ({self.max_tokens}), "
                             f"got {self.short_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"lookup n-gram sizes must satisfy 1 <= min ({self.min_ngram}) <= max ({self.max_ngram})")

    @property
    def enabled(self) -> bool:
        return self.max_tokens > 0


DEFAULT = LookupOptions(max_tokens=10, short_tokens=2)   # transformers' prompt lookup drafts 10 tokens


Lookup = int | LookupOptions


def as_lookup(lookup: Lookup | None, default: LookupOptions = DEFAULT) -> LookupOptions:
    """What `lookup=` means wherever it is taken (MedusaModel, from_pretrained, stream, generate): an int n
    drafts at most n tokens per step with the default policy (`with_max_tokens`; 0 = off), LookupOptions set
    every knob; None leaves `default` (the model's own, or DEFAULT: up to 10 tokens, 2 after a weak match)."""
    if lookup is None:
        return default
    if isinstance(lookup, LookupOptions):
        return lookup
    if isinstance(lookup, bool):
        raise TypeError(f"lookup is an int (tokens per step, 0 = off) or LookupOptions, not {lookup!r}")
    try:
        return with_max_tokens(operator.index(lookup))
    except TypeError:
        raise TypeError(f"lookup is an int (tokens per step, 0 = off) or LookupOptions, not {lookup!r}") from None


def with_max_tokens(n: int, short: int | None = None) -> LookupOptions:
    """The default policy with drafts of at most n tokens (0 = off), and `short` after a weak match (default:
    the default's, at most n)."""
    return replace(DEFAULT, max_tokens=n, short_tokens=min(DEFAULT.short_tokens, n) if short is None else short)


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

    def draft(self, root: int, limit: int | None = None, fill: Callable[[int], int] | None = None) -> list[int]:
        """Tokens expected after the context followed by `root`: max_tokens after a strong match, short_tokens
        after a weak one, lengthened by `fill` (draft length -> the length the step pays for anyway), never more
        than `limit` (the room left in the cache)."""
        for n in range(self.opts.max_ngram, self.opts.min_ngram - 1, -1):
            if n - 1 > len(self.tokens):
                continue
            start = self.follows.get(tuple(self.tokens[len(self.tokens) - (n - 1):]) + (root,))
            if start is not None:
                return self._copy(root, start, self._length(start, n, limit, fill))
        return []

    def _length(self, start: int, n: int, limit: int | None, fill) -> int:
        o = self.opts
        length = o.max_tokens
        if o.short_tokens is not None and self._agreement(start, n) < o.long_match:
            length = o.short_tokens
        if fill is not None and length > 0:
            length = fill(length)
        return length if limit is None else min(length, limit)

    def _agreement(self, start: int, n: int) -> int:
        """How many tokens (up to long_match) the context + root shares with what precedes `start`; the n-gram
        that matched (n tokens, the root last) agrees already."""
        end, k = len(self.tokens), n
        while k < self.opts.long_match and start - 1 - k >= 0 and self.tokens[start - 1 - k] == self.tokens[end - k]:
            k += 1
        return k

    def _copy(self, root: int, start: int, length: int) -> list[int]:
        # copy forward from `start`; a copy that runs past the end continues into the root and the draft itself
        # (as LZ77 does), so a repeating span is drafted in full, not just its last token
        tail, end = [root], len(self.tokens)
        for j in range(start, start + length):
            tail.append(self.tokens[j] if j < end else tail[j - end])
        return tail[1:]
