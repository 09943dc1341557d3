"""The decode loop, in one place: requests join a batch, then propose -> verify -> accept -> compact, one step
at a time for every row at once.

Each step every row proposes its candidates (its heads' tree and its context drafts), ONE forward pass of the
stock transformers model verifies all rows' trees (a cache row each, a 4D additive float mask and position ids
per row; verify.py), each row accepts by its own rule and keeps only its accepted entries, and each row's stops
apply. Rows finish independently; a finished row leaves the batch at once and, between steps, a waiting
request takes its place, its prompt prefilled alone so the other rows are untouched. Batch size 1 is a batch
of one. All per-request state lives in the rows; nothing is stored on the model.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Iterator

import torch
from torch.profiler import record_function

from medusa.inference.cache import BatchCache
from medusa.inference.engine import DecodeOptions, Engine, PromptTooLongError, Request, Row, Step
from medusa.inference.load import TreeByLoad

__all__ = ["Batch", "DecodeOptions", "PromptTooLongError", "Request", "Step", "decode"]


class Batch:
    """Rows decoding together over one BatchCache of `slots` rows. A scheduler (`decode`, the server) adds
    requests while `free` and calls `step` until no row is left."""

    def __init__(self, engine: Engine, slots: int = 1, capacity: int = 256, trees_by_load: bool = True):
        self.engine = engine
        self.cache = BatchCache(engine.num_layers, slots, capacity)
        self.rows: list[Row] = []          # rows[i] decodes in cache row i
        self.load = TreeByLoad() if trees_by_load else None   # else every row verifies its tree every step

    @property
    def free(self) -> int:
        return self.cache.slots - len(self.rows)

    @torch.inference_mode()
    def add(self, req: Request) -> Row:
        """Prefill `req` alone into a free cache row; it decodes from the next step on."""
        self.engine.check(req)
        t0 = time.perf_counter()
        slot = self.cache.add()
        self.cache.reserve(req.ids.numel(), row=slot)
        with record_function("medusa.prefill"), self.cache.focus(slot):
            logits, hidden = self.engine.verifier.prefill(req.ids, self.cache)
        row = Row(self.engine, req, slot, logits, hidden, time.perf_counter() - t0)
        self.rows.append(row)
        return row

    @torch.inference_mode()
    def cancel(self, key) -> bool:
        """Drop the request reported as `key` (between steps); the other rows go on unchanged."""
        row = next((r for r in self.rows if r.key == key), None)
        if row is not None:
            self._drop(row)
        return row is not None

    def _drop(self, row: Row) -> None:
        moved = self.cache.remove(row.slot)   # the last row moves into the freed one
        last = self.rows.pop()
        if moved is not None:
            self.rows[row.slot], last.slot = last, row.slot

    @torch.inference_mode()
    def step(self) -> list[Step]:
        """One decoding step of every row: a Step each (Step.row says whose)."""
        t0 = time.perf_counter()
        steps = []
        for row in list(self.rows):           # rows whose last token needs no forward end here
            if (last := row.choose_root()) is not None:
                steps.append(last)
                self._drop(row)
        rows = list(self.rows)
        if rows:
            trees = self.load is None or self.load.use_trees(len(rows))
            trees = trees or not any(r.exact for r in rows)      # rows that sample typically keep their trees
            with record_function("medusa.propose"):
                cands = self.engine.proposer.propose([r.proposal(plain=not trees and r.exact) for r in rows])
            with record_function("medusa.verify"):
                self.cache.reserve(max(c.tokens.numel() for c in cands))
                verified = self.engine.verifier.verify(self.cache, [r.length for r in rows], cands,
                                                       [r.greedy for r in rows])
            with record_function("medusa.accept"):
                paths = [r.accept(c, v) for r, c, v in zip(rows, cands, verified)]
            with record_function("medusa.compact"):
                self.cache.compact_rows([r.slot for r in rows], [r.length for r in rows], paths)
            for r, c, path in zip(rows, cands, paths):
                steps.append(r.advance(c, path))
                if steps[-1].finish_reason:
                    self._drop(r)
        seconds = time.perf_counter() - t0
        if rows and self.load is not None:
            self.load.record(len(rows), trees, sum(s.accepted for s in steps), seconds)
        for s in steps:
            s.seconds += seconds
        return steps


@torch.inference_mode()
def decode(engine: Engine, requests: Iterable[Request], *, slots: int = 1, capacity: int | None = None,
           trees_by_load: bool = True) -> Iterator[Step]:
    """Decode `requests` with up to `slots` rows at a time: one Step per row per step, in step order. A request
    waits until a row is free; `requests` may be a deque the caller appends to while iterating (a next turn).
    `trees_by_load`: exact rows of a batch skip their trees on steps where that is faster (load.py)."""
    pending = requests if isinstance(requests, deque) else deque(requests)
    if capacity is None:
        capacity = max((engine.capacity(r) for r in pending), default=256)
    batch = Batch(engine, slots, capacity, trees_by_load)
    while True:
        while pending and batch.free:
            batch.add(pending.popleft())
        if not batch.rows:
            return
        yield from batch.step()
