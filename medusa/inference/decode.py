"""The decode loop, in one place: requests join a batch, then propose -> verify -> accept -> compact, one step
at a time for every row at once.

Each step every row proposes its candidates (its heads' tree and its context drafts), ONE forward pass of the
stock transformers model verifies all rows' trees (a cache row each, a 4D additive float mask and position ids
per row; verify.py), each row accepts by its own rule and keeps only its accepted entries, and each row's stops
apply. Rows finish independently; a finished row leaves the batch at once and, between steps, a waiting
request takes its place, its prompt prefilled alone so the other rows are untouched (a long one a chunk per
step, so they are not stalled for all of it). Batch size 1 is a batch of one. All per-request state lives in the rows; nothing is stored on the model.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch.profiler import record_function

from medusa.inference.cache import BatchCache
from medusa.inference.engine import DecodeOptions, Engine, PromptTooLongError, Request, Row, Step
from medusa.inference.load import TreeByLoad
from medusa.inference.tree_attention import PREFILL_BLOCK

__all__ = ["Batch", "DecodeOptions", "PromptTooLongError", "Request", "Step", "decode"]


@dataclass
class _Prefill:
    """A long prompt joining a running batch, prefilled a chunk per step into a cache of its own."""
    req: Request
    cache: BatchCache
    done: int = 0                      # prompt tokens in its cache
    seconds: float = 0.0


class Batch:
    """Rows decoding together over one BatchCache of `slots` rows. A scheduler (`decode`, the server) adds
    requests while `free` and calls `step` until no row is left (`busy`). `prefill_chunk`: a prompt longer than
    this joining running rows is prefilled that many tokens per step, between their steps (None: at once;
    under medusa_tree attention rounded up to a multiple of its PREFILL_BLOCK)."""

    def __init__(self, engine: Engine, slots: int = 1, capacity: int = 256, trees_by_load: bool = True,
                 prefill_chunk: int | None = None):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if prefill_chunk is not None and engine.verifier.tree_attention:
            # chunks of whole prefill blocks give a prompt the bits of a prefill at once (tree_attention._prefill)
            prefill_chunk = -(-prefill_chunk // PREFILL_BLOCK) * PREFILL_BLOCK
        self.engine, self.prefill_chunk = engine, prefill_chunk
        self.cache = BatchCache(engine.num_layers, slots, capacity)
        self.rows: list[Row] = []          # rows[i] decodes in cache row i
        self.prefilling: deque[_Prefill] = deque()
        table = engine.load_table
        if table is not None and set(table.tree) != set(getattr(engine.tree.tree, "paths", ())):
            table = None                   # calibrated for another tree: measure as the batch runs
        self.load = TreeByLoad(table) if trees_by_load else None   # None: every row its own tree, every step

    @property
    def free(self) -> int:
        return self.cache.slots - len(self.rows) - len(self.prefilling)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.prefilling)

    @torch.inference_mode()
    def add(self, req: Request) -> Row | None:
        """Prefill `req` alone into a free cache row; it decodes from the next step on. A prompt longer than
        `prefill_chunk` while rows decode waits instead (None): `step` prefills it a chunk at a time."""
        self.engine.check(req)
        if self.free < 1:
            raise RuntimeError(f"all {self.cache.slots} rows of the batch are taken")
        n = req.ids.numel()
        if self.prefill_chunk is not None and n > self.prefill_chunk and self.rows:
            self.prefilling.append(_Prefill(req, BatchCache(self.engine.num_layers, 1, n)))
            self.prefilling[-1].cache.add()
            return None
        t0 = time.perf_counter()
        slot = self.cache.add()
        self.cache.reserve(n, row=slot)
        with record_function("medusa.prefill"), self.cache.focus(slot):
            logits, hidden = self.engine.verifier.prefill(req.ids, self.cache)
        return self._join(req, slot, logits, hidden, time.perf_counter() - t0)

    def _join(self, req: Request, slot: int, logits, hidden, seconds: float) -> Row:
        row = Row(self.engine, req, slot, logits, hidden, seconds)
        self.rows.append(row)
        return row

    def _prefill_chunk(self) -> None:
        """The next chunk of the oldest waiting prompt (the rest of it when no row decodes); a prompt done
        moves into a row of the batch's cache."""
        p = self.prefilling[0]
        n = p.req.ids.numel()
        end = min(n, p.done + self.prefill_chunk) if self.rows else n
        t0 = time.perf_counter()
        with record_function("medusa.prefill"):
            logits, hidden = self.engine.verifier.prefill(p.req.ids[p.done:end], p.cache, start=p.done)
        p.done, p.seconds = end, p.seconds + time.perf_counter() - t0
        if end == n:
            self.prefilling.popleft()
            slot = self.cache.add()
            self.cache.copy_in(slot, p.cache)
            self._join(p.req, slot, logits, hidden, p.seconds)

    @torch.inference_mode()
    def cancel(self, key) -> bool:
        """Drop the request reported as `key` (between steps); the other rows go on unchanged."""
        waiting = next((p for p in self.prefilling if p.req.key == key), None)
        if waiting is not None:
            self.prefilling.remove(waiting)
            return True
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
        """One decoding step of every row (after a chunk of a waiting prompt's prefill): a Step each (Step.row
        says whose)."""
        t0 = time.perf_counter()
        if self.prefilling:
            self._prefill_chunk()
        t1 = time.perf_counter()
        steps = []
        for row in list(self.rows):           # rows whose last token needs no forward end here
            if (last := row.choose_root()) is not None:
                steps.append(last)
                self._drop(row)
        rows, ended = list(self.rows), len(steps)
        if rows:
            paths = self.load.tree(len(rows)) if self.load is not None else None
            if paths is not None and not any(r.exact for r in rows):
                paths = None                  # rows that sample typically keep their trees
            tree = None if paths is None else self.engine.shapes(list(paths))
            drafts = self.load is None or not self.load.calibrated(len(rows))
            with record_function("medusa.propose"):
                cands = self.engine.proposer.propose([r.proposal(tree, drafts) for r in rows])
            with record_function("medusa.verify"):
                self.cache.reserve(max(c.tokens.numel() for c in cands))
                verified = self.engine.verifier.verify(self.cache, [r.length for r in rows], cands,
                                                       [r.greedy for r in rows])
            with record_function("medusa.accept"):
                kept = [r.accept(c, v) for r, c, v in zip(rows, cands, verified)]
            with record_function("medusa.compact"):
                self.cache.compact_rows([r.slot for r in rows], [r.length for r in rows], kept)
            for r, c, path in zip(rows, cands, kept):
                steps.append(r.advance(c, path))
                if steps[-1].finish_reason:
                    self._drop(r)
            if self.load is not None:
                self.load.record(len(rows), paths != (), sum(s.accepted for s in steps[ended:]),
                                 time.perf_counter() - t1, paths)
        seconds = time.perf_counter() - t0
        for s in steps:
            s.seconds += seconds
        return steps


@torch.inference_mode()
def decode(engine: Engine, requests: Iterable[Request], *, slots: int = 1, capacity: int | None = None,
           trees_by_load: bool = True, prefill_chunk: int | None = None) -> Iterator[Step]:
    """Decode `requests` with up to `slots` rows at a time: one Step per row per step, in step order. A request
    waits until a row is free; `requests` may be a deque the caller appends to while iterating (a next turn).
    `trees_by_load`: exact rows of a batch take the tree, or none, the load makes fastest (load.py);
    `prefill_chunk`: see Batch."""
    pending = requests if isinstance(requests, deque) else deque(requests)
    if capacity is None:
        capacity = max((engine.capacity(r) for r in pending), default=256)
    batch = Batch(engine, slots, capacity, trees_by_load, prefill_chunk)
    while True:
        while pending and batch.free:
            batch.add(pending.popleft())
        if not batch.busy:
            return
        yield from batch.step()
