"""Continuous batching for `medusa distill`'s local back end, on the decode engine (plain decoding: the tree of
the root alone).

Batched `generate` runs every batch until its longest answer ends: with answers capped at 256 tokens and
almost half of them reaching the cap, a third of the rows a batch computes are finished ones. Here up to
`slots` turns decode side by side, one row each, and a row whose answer ends takes the next turn at once (its
prompt prefilled alone). Greedy answers are those of `generate` on each prompt alone (each row attends to its
own entries only; sliding-window layers get their window through the engine's masks).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from medusa.chat_format import eos_token_ids, prompt_ids
from medusa.inference.acceptance import SamplingOptions
from medusa.inference.decode import DecodeOptions, Request, decode
from medusa.inference.engine import build_engine
from medusa.training.prompts import PromptRecord


@dataclass
class Answered:
    """A record whose every turn is answered: its answers, new tokens in all, and "length" if a turn hit the cap."""
    rec: PromptRecord
    history: list = field(default_factory=list)     # chat messages so far
    answers: list = field(default_factory=list)
    new_tokens: int = 0
    finish: str = "stop"
    turn: int = 0
    generated: list = field(default_factory=list)   # the current turn's tokens


class ContinuousBatcher:
    """Up to `slots` records decode side by side, a turn at a time with the model's chat template (plain text
    without one: chat_format); `run(recs)` yields each record as soon as its last turn ends (so out of order);
    one whose turn does not fit the model's context ends there, with finish "context" (not an answer to keep).
    `temperature` 0 is greedy; above it, temperature / top-p sampling from torch's global RNG."""

    def __init__(self, model, tokenizer, *, slots: int, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0):
        if slots < 1 or max_new_tokens < 1:
            raise ValueError(f"slots and max_new_tokens must be >= 1 (got {slots} and {max_new_tokens})")
        self.model, self.tok, self.slots, self.max_new_tokens = model, tokenizer, slots, max_new_tokens
        self.eos = eos_token_ids(model, tokenizer)
        self.engine = build_engine(model, tokenizer=tokenizer)
        self.opts = DecodeOptions(max_new_tokens=max_new_tokens, eos_token_ids=self.eos,
                                  sampling=SamplingOptions(temperature=temperature, top_p=top_p))
        self.device = next(model.parameters()).device

    def _request(self, req: Answered) -> Request | None:
        """`req`'s next turn as a request (None for one longer than the model's context)."""
        req.history.append({"role": "user", "content": req.rec.turns[req.turn]})
        ids = torch.tensor(prompt_ids(self.tok, req.history), device=self.device)
        req.generated = []
        if ids.numel() >= self.engine.context_limit:
            req.finish = "context"          # no answer: the record is reported, not written
            return None
        return Request(ids, self.opts, key=req)

    def _end_turn(self, req: Answered) -> bool:
        """Close the turn; True when the record has no turn left."""
        text = self.tok.decode(req.generated, skip_special_tokens=True)
        req.answers.append(text)
        req.history.append({"role": "assistant", "content": text})
        req.new_tokens += len(req.generated)
        req.turn += 1
        return req.turn >= len(req.rec.turns)

    def _next(self, req: Answered, pending: deque) -> bool:
        """Queue `req`'s next turn; True when `req` is done."""
        if req.finish == "context" or self._end_turn(req):
            return True
        r = self._request(req)
        if r is None:
            return True
        pending.append(r)
        return False

    @torch.inference_mode()
    def run(self, recs: list[PromptRecord]) -> Iterator[Answered]:
        pending: deque[Request] = deque()
        for rec in recs:
            req = Answered(rec)
            r = self._request(req)
            if r is not None:
                pending.append(r)
            else:
                yield req
        for step in decode(self.engine, pending, slots=self.slots, capacity=256):
            req = step.row
            req.generated += step.tokens.tolist()
            if step.finish_reason is None:
                continue
            if step.finish_reason == "eos":
                req.generated.pop()
            elif step.finish_reason in ("length", "context"):
                req.finish = "length"
            if self._next(req, pending):
                yield req
