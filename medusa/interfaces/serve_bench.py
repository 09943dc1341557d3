"""`medusa bench-serve`: the server under C concurrent clients, medusa against plain decoding.

Each setting starts `medusa serve`'s app on a free loopback port in this process and runs C client threads
over the prompts (each client takes the next prompt when its answer is done; streaming chat completions,
greedy). Settings, side by side in one run for each concurrency, in an order that rotates:
  medusa         the batching server with the model's tree and context drafts (load-sized trees)
  plain          the same server with no candidates (tree "root", no drafts): plain batched decoding
  one-at-a-time  medusa with one row (`--max-batch 1`): requests served in turn
Per setting and concurrency: total output tokens/s (all answers' tokens / wall time), time to first token and
time per output token after it (p50, p90), and how many answers equal the prompt's answer served alone.
"""
from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medusa.evaluation.report import line_plot, write_result
from medusa.interfaces.engine_worker import MAX_BATCH
from medusa.interfaces.server import LocalServer, create_app

SETTINGS = {
    "medusa": {"max_batch": None, "defaults": {}},
    "plain": {"max_batch": None, "defaults": {"tree": "root", "lookup": 0}},
    "one-at-a-time": {"max_batch": 1, "defaults": {}},
}


def _server(model, *, max_batch: int, defaults: dict, max_tokens: int) -> LocalServer:
    app = create_app(model, model_name="bench", max_batch=max_batch, queue_size=256,
                     defaults={"max_new_tokens": max_tokens, **defaults})
    return LocalServer(app)


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


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def run_serve_bench(model, prompts: list[str], concurrencies: list[int], max_tokens: int, *,
                    max_batch: int = MAX_BATCH, log=print) -> dict:
    """Every setting at every concurrency over `prompts`; returns the figures (rows) and the settings used."""
    with _server(model, max_batch=1, defaults={}, max_tokens=max_tokens) as s:
        ask(s.url, prompts[0], 8)                                   # warm-up
        alone = [ask(s.url, p, max_tokens)["text"] for p in prompts]
    rows = []
    for i, c in enumerate(concurrencies):
        names = list(SETTINGS)
        for name in names[i % 3:] + names[:i % 3]:          # the order rotates: drift falls on all alike
            setting = SETTINGS[name]
            with _server(model, max_batch=setting["max_batch"] or max_batch, defaults=setting["defaults"],
                         max_tokens=max_tokens) as s:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    answers = list(pool.map(lambda p: ask(s.url, p, max_tokens), prompts))
                wall = time.perf_counter() - t0
            tokens = sum(a["tokens"] for a in answers)
            tpot = [(a["seconds"] - a["ttft"]) / (a["tokens"] - 1) for a in answers if a["tokens"] > 1]
            rows.append({"clients": c, "setting": name, "tokens": tokens, "seconds": round(wall, 2),
                         "tokens_per_s": round(tokens / wall, 2),
                         "ttft_p50": round(statistics.median(a["ttft"] for a in answers), 3),
                         "ttft_p90": round(_pct([a["ttft"] for a in answers], 0.9), 3),
                         "tpot_p50": round(statistics.median(tpot), 4) if tpot else None,
                         "tpot_p90": round(_pct(tpot, 0.9), 4) if tpot else None,
                         "same_as_alone": sum(a["text"] == t for a, t in zip(answers, alone)),
                         "prompts": len(prompts)})
            log(format_row(rows[-1]))
    return {"rows": rows}


def format_row(r: dict) -> str:
    return (f"C={r['clients']:>2} {r['setting']:<13} {r['tokens_per_s']:7.1f} tokens/s  TTFT p50 {r['ttft_p50']:.2f} s"
            f" p90 {r['ttft_p90']:.2f} s  TPOT p50 {1000 * (r['tpot_p50'] or 0):.0f} ms  "
            f"{r['same_as_alone']}/{r['prompts']} as alone")


def format_table(result: dict) -> str:
    by = {(r["clients"], r["setting"]): r for r in result["rows"]}
    lines = ["| clients | " + " | ".join(f"{s} tok/s" for s in SETTINGS) + " | medusa / plain | medusa / one-at-a-time "
             "| medusa TTFT p50 / p90 (s) | medusa TPOT p50 (ms) | as alone |",
             "|---" * (len(SETTINGS) + 6) + "|"]
    for c in sorted({r["clients"] for r in result["rows"]}):
        m, p, o = (by[(c, s)] for s in SETTINGS)
        lines.append(f"| {c} | {m['tokens_per_s']} | {p['tokens_per_s']} | {o['tokens_per_s']} | "
                     f"{m['tokens_per_s'] / p['tokens_per_s']:.2f}x | {m['tokens_per_s'] / o['tokens_per_s']:.2f}x | "
                     f"{m['ttft_p50']} / {m['ttft_p90']} | {1000 * (m['tpot_p50'] or 0):.0f} | "
                     f"{m['same_as_alone']}, {p['same_as_alone']}, {o['same_as_alone']} of {m['prompts']} |")
    return "\n".join(lines)


def write(out: Path, result: dict, *, log=print) -> None:
    write_result(out, "serve", result, x="clients", series="setting", xlabel="concurrent clients",
                 ylabel="total output tokens / s", log=log)
