"""`medusa bench-serve`'s clients, run as a script in a process of their own (as real clients are): C threads
stream chat completions from a server, each taking the next prompt when its answer is done.

Reads {"url", "prompts", "clients", "max_tokens"} as JSON on stdin; writes {"seconds": wall time of the run,
"answers": [{"text", "tokens", "ttft", "seconds"}, ...] in prompt order} as JSON on stdout. It imports neither
torch nor medusa: the server's process keeps its CPU time and its interpreter lock to itself.
"""
from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def ask(url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming chat completion: its text, tokens, time to first token and total time."""
    import httpx

    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, text, tokens = time.perf_counter(), None, [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"text": "".join(text), "tokens": tokens, "ttft": (first or end) - t0, "seconds": end - t0}


def run(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda p: ask(url, p, max_tokens), prompts))
    return {"seconds": time.perf_counter() - t0, "answers": answers}


if __name__ == "__main__":
    job = json.load(sys.stdin)
    json.dump(run(job["url"], job["prompts"], job["clients"], job["max_tokens"]), sys.stdout)
