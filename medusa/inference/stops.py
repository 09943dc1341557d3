"""Stop strings, matched in one place for the decode engine (which tokens to keep) and the server (which text to
send): `find_stop` says where the first stop string begins in a text, `StopCutter` applies it to text that
arrives in pieces, and `stop_index` to a row's tokens."""
from __future__ import annotations

from typing import Sequence


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where in `text` the earliest stop string begins, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def partial_stop(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (0 when none)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class StopCutter:
    """Drops a stop string and all after it (OpenAI semantics) from text arriving in pieces, holding back any
    tail that may begin one. `push(piece)` -> the text that is safe to send; `stopped` once a stop was met."""

    def __init__(self, stop: Sequence[str]):
        self.stop, self.held, self.stopped = tuple(stop), "", False

    def push(self, piece: str) -> str:
        if not self.stop:
            return piece
        if self.stopped:
            return ""
        self.held += piece
        at = find_stop(self.held, self.stop)
        if at is not None:
            self.stopped = True
            return self.held[:at]
        keep = partial_stop(self.held, self.stop)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


def stop_index(tokenizer, generated: list[int], n_new: int, stops: Sequence[str]) -> int | None:
    """If a stop string appears in the decoded `generated`, how many of its last `n_new` tokens (this step's) to
    keep: up to and including the one that completes it. None when no stop string appears."""
    if not stops or tokenizer is None or find_stop(tokenizer.decode(generated), stops) is None:
        return None
    done = len(generated) - n_new
    for k in range(1, n_new + 1):
        if find_stop(tokenizer.decode(generated[:done + k]), stops) is not None:
            return k
    return n_new
