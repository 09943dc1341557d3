"""One engine for every client: a worker thread owns a batch of the decode engine (decode.Batch) and runs the
requests in it together, continuous batching: between two steps it admits waiting jobs into free rows (each
prompt prefilled alone, so the running rows are untouched; a long one `prefill_chunk` tokens per step, so they
are not stalled for all of it) and drops finished or cancelled ones at once. Text
pieces go back to the asyncio event loop per job. A bounded queue sheds load. Each row decodes exactly as it
would alone, so nothing a client receives depends on who else is in the batch. The thread that makes the worker
gives back its OpenMP team (medusa.inference.native), so that the worker's team decodes at full speed; torch
work on other threads while the worker runs slows both. When the batch empties, the heap's free pages go back
to the system."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import torch

from medusa.inference.decode import Batch
from medusa.inference.native import release_heap, release_team
from medusa.inference.stops import StopCutter
from medusa.interfaces.textstream import RunStats, TextStream


MAX_BATCH = 16          # rows decoded together (bench-serve at 16 clients on the 2-core EPYC: 16 > 8, 4)
PREFILL_CHUNK = 256     # prompt tokens prefilled per step while other rows decode


class QueueFullError(RuntimeError):
    pass


@dataclass
class JobReport:
    """What the worker did with one job (kept for /health and tests)."""
    id: str
    prompt_tokens: int
    new_tokens: int
    steps: int
    seconds: float
    finish_reason: str | None       # the decode loop's: eos, stop, length, context; or cancelled, error
    cancelled: bool


@dataclass
class Job:
    id: str
    ids: torch.Tensor                   # (1, T) prompt
    options: dict                       # keyword options for model.stream
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)   # ("text", str) | ("done", RunStats) | ("error", exc)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value) -> None:
        """From the worker thread: queue an event for the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:          # the event loop is closed: the server is shutting down
            self.cancel()

    async def stream(self, is_disconnected: Callable[[], Awaitable[bool]], poll: float = 0.25) -> AsyncIterator[tuple]:
        """Events until ("done", stats) or ("error", exc). Cancels the job if the client goes away, whether
        we notice by polling or by being cancelled / closed mid-iteration."""
        finished, checked = False, time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.events.get(), poll)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= poll:
                    if await is_disconnected():
                        return
                    checked = time.monotonic()
                if event is None:
                    continue
                finished = event[0] in ("done", "error")
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.cancel()


class _Running:
    """A job in the batch: its text so far, its stop strings, its figures."""

    def __init__(self, job: Job, tokenizer):
        self.job, self.text, self.cutter = job, TextStream(tokenizer), StopCutter(job.stop)
        self.stats, self.t0 = RunStats(), time.perf_counter()

    def feed(self, step) -> bool:
        """Add a step's tokens; emit what text is safe; True when the job is done."""
        st = self.stats
        st.add(step)
        out = self.cutter.push(self.text.push(step.tokens.tolist()))
        if self.cutter.stopped:
            st.finish_reason = "stop"
        elif step.finish_reason:
            out += self.cutter.flush()
        st.seconds = time.perf_counter() - self.t0
        if out:
            self.job.emit("text", out)
        return st.finish_reason is not None


class EngineWorker:
    """Runs jobs on a worker thread, up to `max_batch` of them at once in one batch. At most `queue_size` jobs
    wait while the batch is full; more are refused at once (QueueFullError). `prefill_chunk`: see Batch."""

    def __init__(self, model, *, queue_size: int = 16, max_batch: int = MAX_BATCH, history: int = 64,
                 prefill_chunk: int | None = PREFILL_CHUNK):
        if queue_size < 0 or max_batch < 1 or (prefill_chunk is not None and prefill_chunk < 1):
            raise ValueError(f"queue_size must be >= 0, max_batch and prefill_chunk >= 1, got {queue_size}, "
                             f"{max_batch} and {prefill_chunk}")
        self.model, self.queue_size, self.max_batch = model, queue_size, max_batch
        self.prefill_chunk = prefill_chunk
        self.reports: deque[JobReport] = deque(maxlen=history)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0               # running + waiting
        self.running = 0                # jobs in the batch
        self._thread = threading.Thread(target=self._run, name="medusa-engine", daemon=True)
        release_team()
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job_id: str, ids: torch.Tensor, options: dict, stop: tuple[str, ...] = ()) -> Job:
        """Queue a job (call from the event loop). Raises QueueFullError at once when the queue is full."""
        with self._lock:
            if self._pending >= self.max_batch + self.queue_size:
                raise QueueFullError(f"the server is busy: {self._pending} requests are running or waiting")
            self._pending += 1
        job = Job(job_id, ids, options, stop, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def close(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        batch, running, stepped = self._batch(), {}, False
        while True:
            if not running and stepped and self._jobs.empty():    # idle after work: its freed memory goes back
                release_heap()
                stepped = False
            while len(running) < self.max_batch:          # admit waiting jobs into free rows
                try:
                    job = self._jobs.get(block=not running)
                except queue.Empty:
                    break
                if job is None:
                    for r in running.values():
                        self._end(r, error=None, cancelled=True)
                    return
                self._admit(batch, running, job)
            for key, r in list(running.items()):         # clients that went away free their rows now
                if r.job.cancelled.is_set():
                    batch.cancel(key)
                    self.running = len(running) - 1
                    self._end(running.pop(key), error=None, cancelled=True)
            self.running = len(running)
            if not running:
                continue
            try:
                stepped = True
                steps = batch.step()
            except Exception as e:  # reported to every client in the batch; the worker keeps serving
                self.running = 0
                for r in running.values():
                    self._end(r, error=e, cancelled=False)
                batch, running = self._batch(), {}
                continue
            for step in steps:
                r = running[step.row]
                if r.feed(step):
                    if step.finish_reason is None:      # a stop string ended it: the row still runs
                        batch.cancel(step.row)
                    self.running = len(running) - 1
                    self._end(running.pop(step.row), error=None, cancelled=False)

    def _batch(self) -> Batch:
        return Batch(self.model.engine, slots=self.max_batch, prefill_chunk=self.prefill_chunk)

    def _admit(self, batch: Batch, running: dict, job: Job) -> None:
        r = _Running(job, self.model.tokenizer)
        if job.cancelled.is_set():
            return self._end(r, error=None, cancelled=True)
        try:
            (req,), _ = self.model.requests(job.ids, **job.options)
            req.key = job.id
            batch.add(req)
        except Exception as e:  # a request the engine cannot take: its client is told, the others go on
            return self._end(r, error=e, cancelled=False)
        running[job.id] = r

    def _end(self, r: _Running, *, error: Exception | None, cancelled: bool) -> None:
        job, stats = r.job, r.stats
        cancelled = cancelled and stats.finish_reason is None
        finish = "error" if error else "cancelled" if cancelled else stats.finish_reason
        self.reports.append(JobReport(job.id, job.ids.shape[1], stats.new_tokens, stats.steps,
                                      time.perf_counter() - r.t0, finish, cancelled))
        job.emit("error", error) if error else job.emit("done", stats)
        with self._lock:
            self._pending -= 1
