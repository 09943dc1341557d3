"""Continuous batching for `medusa distill`'s local back end.

Batched `generate` runs every batch until its longest answer ends: with answers capped at 256 tokens and
almost half of them reaching the cap, a third of the rows a batch computes are finished ones. Here a fixed
number of slots (`SlotCache`, one row per request) decodes one token each per step, and a slot whose answer
ends takes the next prompt at once: its prompt is prefilled alone and its entries copied into the slot.
Greedy answers are those of `generate` on each prompt alone (each row attends to its own entries only).
One mask serves every layer, so a model with sliding-window layers has a turn that could outgrow the window
decoded alone, with the model's own masks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from medusa.inference import packed_linear
from medusa.inference.cache import SlotCache, sliding_window
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


def eos_ids(model, tok) -> list[int]:
    """The tokens that end a turn: the model's generation config's and the tokenizer's end-of-sequence."""
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return list({*eos, tok.eos_token_id} - {None})


class ContinuousBatcher:
    """Up to `slots` records decode side by side, a turn at a time with the model's chat template;
    `run(recs)` yields each record as soon as its last turn ends (so out of order). `temperature` 0 is
    greedy; above it, sampling as `generate` does (transformers' warpers, torch's global RNG)."""

    def __init__(self, model, tokenizer, *, slots: int, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0):
        if slots < 1 or max_new_tokens < 1:
            raise ValueError(f"slots and max_new_tokens must be >= 1 (got {slots} and {max_new_tokens})")
        self.model, self.tok, self.slots, self.max_new_tokens = model, tokenizer, slots, max_new_tokens
        self.eos = set(eos_ids(model, tokenizer))
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.window = sliding_window(model.config)
        self.warpers = None
        if temperature > 0:
            from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                                TopPLogitsWarper)

            self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] +
                                               ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, V) -> (rows,): the argmax, or a sample."""
        if self.warpers is None:
            return logits.argmax(-1)
        return torch.multinomial(self.warpers(None, logits.float()).softmax(-1), 1)[:, 0]

    def _forward(self, ids, cache, **kw):
        with packed_linear.engaged():    # packed copies of fp32 CPU weights, where the caller made them
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1]

    def _start(self, cache: SlotCache, slot: int, req: Answered) -> int | None:
        """Prefill `req`'s next turn alone and move its entries into `slot`; returns its first token. A turn
        that could pass the sliding window is answered here and now instead (returns None)."""
        from transformers import DynamicCache

        req.history.append({"role": "user", "content": req.rec.turns[req.turn]})
        text = self.tok.apply_chat_template(req.history, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor(self.tok(text, add_special_tokens=False)["input_ids"], device=self.device)
        req.generated = []
        if self.window is not None and ids.numel() + self.max_new_tokens > self.window:
            self._alone(req, ids)
            return None
        prefill = DynamicCache()
        logits = self._forward(ids[None], prefill)
        cache.load(slot, prefill, ids.numel())
        return int(self._choose(logits)[0])

    def _alone(self, req: Answered, ids: torch.Tensor) -> None:
        """Decode `req`'s turn with its prompt alone and no mask of ours, so the model masks its sliding layers."""
        from transformers import DynamicCache

        own = DynamicCache(config=self.model.config)
        token = int(self._choose(self._forward(ids[None], own))[0])
        while not self._take(req, token):
            token = int(self._choose(self._forward(torch.tensor([[token]], device=self.device), own))[0])

    def _take(self, req: Answered, token: int) -> bool:
        """Add a token to `req`'s turn; True when the turn has ended (an end-of-turn token, or the cap)."""
        if token in self.eos:
            return True
        req.generated.append(token)
        if len(req.generated) >= self.max_new_tokens:
            req.finish = "length"
            return True
        return False

    def _end_turn(self, req: Answered) -> bool:
        """Close the turn; True when the record has no turn left."""
        text = self.tok.decode(req.generated, skip_special_tokens=True)
        req.answers.append(text)
        req.history.append({"role": "assistant", "content": text})
        req.new_tokens += len(req.generated)
        req.turn += 1
        return req.turn >= len(req.rec.turns)

    @torch.inference_mode()
    def run(self, recs: list[PromptRecord]) -> Iterator[Answered]:
        queue = deque(Answered(r) for r in recs)
        cache = SlotCache.for_model(self.model, self.slots)
        active: list[Answered | None] = [None] * self.slots
        last = torch.zeros(self.slots, 1, dtype=torch.long, device=self.device)
        while True:
            for s in range(self.slots):
                while active[s] is None and queue:
                    req = queue.popleft()
                    token = self._start(cache, s, req)
                    if token is not None and not self._take(req, token):
                        active[s], last[s, 0] = req, token
                    elif self._end_turn(req):
                        yield req
                    else:
                        queue.appendleft(req)
                if active[s] is None:
                    cache.release(s)
            if not any(active):
                return
            mask = cache.step_mask(self.dtype)
            logits = self._forward(last, cache, position_ids=cache.columns[:, None], attention_mask=mask)
            cache.advance()
            chosen = self._choose(logits)
            last[:, 0] = chosen
            for s, token in enumerate(chosen.tolist()):
                req = active[s]
                if req is None or not self._take(req, token):
                    continue
                active[s] = None
                if self._end_turn(req):
                    yield req
                else:
                    queue.appendleft(req)       # its next turn takes this slot
