"""One engine, one request at a time: a worker thread runs the (synchronous) decode loop for queued jobs and
hands text pieces back to the asyncio event loop. A bounded queue sheds load; a job whose client has gone is
cancelled between decoding steps, so the engine is free for the next one at once."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Iterable, Iterator

import torch

from medusa.interfaces.textstream import RunStats, stream_text


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


def until_cancelled(steps: Iterator, cancelled: threading.Event) -> Iterator:
    """Pass decoding steps through, stopping between steps once `cancelled` is set."""
    try:
        for step in steps:
            yield step
            if cancelled.is_set():
                return
    finally:
        close = getattr(steps, "close", None)
        if close:
            close()


def cut_at_stop(pieces: Iterable[str], stop: tuple[str, ...], stats: RunStats) -> Iterator[str]:
    """Drop a stop string and all after it (OpenAI semantics), holding back any tail that may begin one."""
    if not stop:
        yield from pieces
        return
    held = ""
    for piece in pieces:
        held += piece
        hits = [i for i in (held.find(s) for s in stop) if i >= 0]
        if hits:
            if min(hits):
                yield held[:min(hits)]
            stats.finish_reason = "stop"
            return
        keep = max((k for s in stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held


class EngineWorker:
    """Runs jobs one at a time on a worker thread. At most `queue_size` jobs wait behind the running one."""

    def __init__(self, model, *, queue_size: int = 16, history: int = 64):
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.model, self.queue_size = model, queue_size
        self.reports: deque[JobReport] = deque(maxlen=history)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0               # running + waiting
        self._thread = threading.Thread(target=self._run, name="medusa-engine", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job_id: str, ids: torch.Tensor, options: dict, stop: tuple[str, ...] = ()) -> Job:
        """Queue a job (call from the event loop). Raises QueueFullError at once when the queue is full."""
        with self._lock:
            if self._pending > self.queue_size:
                raise QueueFullError(f"the server is busy: {self._pending} requests are running or waiting")
            self._pending += 1
        job = Job(job_id, ids, options, stop, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def close(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._serve(job)
            except Exception as e:  # never let the worker die: every later request would wait forever
                job.emit("error", e)
            finally:
                with self._lock:
                    self._pending -= 1

    def _serve(self, job: Job) -> None:
        stats, t0 = RunStats(), time.perf_counter()
        error = None
        if not job.cancelled.is_set():
            try:
                steps = until_cancelled(self.model.stream(job.ids, **job.options), job.cancelled)
                for piece in cut_at_stop(stream_text(steps, self.model.tokenizer, stats), job.stop, stats):
                    job.emit("text", piece)
            except Exception as e:  # reported to the client; the worker keeps serving
                error = e
        cancelled = job.cancelled.is_set() and stats.finish_reason is None
        finish = "error" if error else "cancelled" if cancelled else stats.finish_reason
        self.reports.append(JobReport(job.id, job.ids.shape[1], stats.new_tokens, stats.steps,
                                      time.perf_counter() - t0, finish, cancelled))
        job.emit("error", error) if error else job.emit("done", stats)
