"""`medusa bench-serve --soak N`: the batching server under a bounded soak, and what it leaves behind.

The server (medusa's setting) starts on a free loopback port in this process; first each distinct prompt is
asked alone (its solo answer, greedy); then N requests come from C client threads: streaming and not, clients
that hang up after two chunks (cancellations), and malformed bodies. Reported: the status codes (any 5xx is a
failure), cross-talk (finished greedy answers that differ from their solo answer), whether the server is
healthy and idle at the end, and the process's resident memory at the start and at the end (after a second,
untimed soak of the same size warmed every path, so the figures compare a steady state with itself).
"""
from __future__ import annotations

import gc
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from medusa.interfaces.engine_worker import MAX_BATCH
from medusa.interfaces.server import LocalServer, create_app

CHAT = "/v1/chat/completions"
MALFORMED = (b'{"messages": [', b'{"messages": "hello"}', b'{"messages": []}',
             b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', b'[1, 2, 3]')


def rss_mib() -> float:
    """This process's resident memory (MiB), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0
    return round(kib / 1024, 1)


def soak_request(url: str, i: int, prompt: str, max_tokens: int) -> tuple[str, int, str | None]:
    """Request i of the soak: -> (kind, status code, the answer's text or None)."""
    import httpx

    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    with httpx.Client(base_url=url, timeout=600) as http:
        if i % 7 == 3:
            r = http.post(CHAT, content=MALFORMED[i % len(MALFORMED)], headers={"content-type": "application/json"})
            return "malformed", r.status_code, None
        if i % 5 == 1:                                  # hangs up after two chunks
            with http.stream("POST", CHAT, json={**body, "stream": True}) as r:
                for k, _ in enumerate(r.iter_lines()):
                    if k >= 2:
                        break
            return "cancelled", r.status_code, None
        if i % 2:
            with http.stream("POST", CHAT, json={**body, "stream": True}) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
            return "stream", r.status_code, text
        r = http.post(CHAT, json=body)
        return "whole", r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None


def _wait_idle(engine, timeout: float = 120.0) -> bool:
    """Whether the worker ran out of jobs within `timeout`; then half a second more, in which the idle worker
    hands its freed memory back (so that RSS read next is the idle server's)."""
    deadline = time.monotonic() + timeout
    while engine.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return engine.pending == 0


def run_soak(model, prompts: list[str], *, requests: int = 200, clients: int = 16, max_tokens: int = 64,
             max_batch: int = MAX_BATCH, log=print) -> dict:
    """The soak's figures (see the module's docstring)."""
    import httpx

    app = create_app(model, model_name="soak", max_batch=max_batch, queue_size=requests,
                     defaults={"max_new_tokens": max_tokens})
    with LocalServer(app) as s:
        rss_cold = rss_mib()
        alone = {p: soak_request(s.url, 0, p, max_tokens)[2] for p in prompts}

        def soak() -> list[tuple]:
            with ThreadPoolExecutor(clients) as pool:
                return list(pool.map(lambda i: soak_request(s.url, i, prompts[i % len(prompts)], max_tokens),
                                     range(requests)))

        soak()                                                   # every path warmed: the memory's baseline
        _wait_idle(s.engine)
        gc.collect()
        rss_start, t0 = rss_mib(), time.perf_counter()
        results = soak()
        seconds = time.perf_counter() - t0
        idle = _wait_idle(s.engine)
        gc.collect()
        rss_end = rss_mib()
        health = httpx.get(s.url + "/health", timeout=30)
        healthy = health.status_code == 200 and health.json().get("running") == 0 and s.engine._thread.is_alive()
    answered = [(prompts[i % len(prompts)], text) for i, (kind, code, text) in enumerate(results)
                if kind in ("stream", "whole") and code == 200]
    report = {"requests": requests, "clients": clients, "max_batch": max_batch, "max_tokens": max_tokens,
              "seconds": round(seconds, 1), "kinds": dict(Counter(k for k, _, _ in results)),
              "status": dict(Counter(str(c) for _, c, _ in results)),
              "server_errors": sum(c >= 500 for _, c, _ in results),
              "answered": len(answered), "cross_talk": sum(text != alone[p] for p, text in answered),
              "healthy_at_end": bool(healthy and idle), "rss_mib_cold": rss_cold, "rss_mib_start": rss_start,
              "rss_mib_end": rss_end}
    log(json.dumps(report))
    return report
