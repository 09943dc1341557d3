"""Turn decoding steps into text as it arrives, and add up a run's figures (tokens/s, tokens per step)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator


@dataclass
class RunStats:
    new_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    finish_reason: str | None = None
    accept_lengths: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    def add(self, step) -> None:
        """Count one decoding step (a Step): its tokens, and its finish reason once it has one."""
        self.steps += 1
        self.new_tokens += step.accepted
        self.accept_lengths.append(step.accepted)
        self.finish_reason = step.finish_reason or self.finish_reason

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "steps": self.steps, "seconds": round(self.seconds, 4),
                "tokens_per_s": round(self.tokens_per_s, 2), "tokens_per_step": round(self.tokens_per_step, 3),
                "finish_reason": self.finish_reason}


class TextStream:
    """Incremental detokenizer: feed token ids, get the new text. Holds back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.text = text[len(self.text):], text
        return new


def stream_text(steps: Iterator, tokenizer, stats: RunStats) -> Iterator[str]:
    """Yield text pieces from decoding steps, filling `stats` as it goes."""
    out = TextStream(tokenizer)
    start = time.perf_counter()
    for step in steps:
        stats.add(step)
        piece = out.push(step.tokens.tolist())
        stats.seconds = time.perf_counter() - start
        if piece:
            yield piece
    stats.seconds = time.perf_counter() - start
