"""`medusa bench-serve`: the server under C concurrent clients, medusa against plain decoding.

Each setting starts `medusa serve`'s app on a free loopback port in this process and runs C client threads
over the prompts in a process of their own (serve_clients.py; each client takes the next prompt when its
answer is done; streaming chat completions, greedy). Settings, side by side in one run for each concurrency,
in an order that rotates:
  medusa         the batching server with the model's tree and context drafts (load-sized trees)
  plain          the same server with no candidates (tree "root", no drafts): plain batched decoding
  one-at-a-time  medusa with one row (`--max-batch 1`): requests served in turn
Per setting and concurrency: total output tokens/s (all answers' tokens / wall time; with `rounds`, each
cell run that many times and the median round kept: a shared machine's speed drifts by tens of percent
between minutes), time to first token and time per output token after it (p50, p90), and how many answers
equal the prompt's answer served alone.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
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


def clients(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """`concurrency` clients over `prompts` in a process of their own (serve_clients.py): {"seconds", "answers"}."""
    job = json.dumps({"url": url, "prompts": prompts, "clients": concurrency, "max_tokens": max_tokens})
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("serve_clients.py"))], input=job,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the benchmark's clients failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def run_serve_bench(model, prompts: list[str], concurrencies: list[int], max_tokens: int, *,
                    max_batch: int = MAX_BATCH, rounds: int = 1, log=print) -> dict:
    """Every setting at every concurrency over `prompts`, `rounds` times (the settings' order rotating each
    time); returns the figures (rows: the median round's tokens/s, latencies over every round's answers, and
    answers equal to the solo ones in the worst round) and the settings used."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    with _server(model, max_batch=1, defaults={}, max_tokens=max_tokens) as s:
        clients(s.url, prompts[:1], 1, 8)                           # warm-up
        alone = [a["text"] for a in clients(s.url, prompts, 1, max_tokens)["answers"]]
    rows = []
    for i, c in enumerate(concurrencies):
        runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        for k in range(rounds):
            names = list(SETTINGS)
            turn = (i + k) % len(names)
            for name in names[turn:] + names[:turn]:         # the order rotates: drift falls on all alike
                setting = SETTINGS[name]
                with _server(model, max_batch=setting["max_batch"] or max_batch, defaults=setting["defaults"],
                             max_tokens=max_tokens) as s:
                    runs[name].append(clients(s.url, prompts, c, max_tokens))
                if rounds > 1:
                    run = runs[name][-1]
                    log(f"C={c:>2} {name:<13} round {k + 1}: "
                        f"{sum(a['tokens'] for a in run['answers']) / run['seconds']:.1f} tokens/s")
        for name in SETTINGS:
            rows.append(_row(c, name, runs[name], alone))
            log(format_row(rows[-1]))
    return {"rows": rows}


def _row(clients: int, setting: str, runs: list[dict], alone: list[str]) -> dict:
    speeds = sorted(((sum(a["tokens"] for a in r["answers"]) / r["seconds"], r) for r in runs), key=lambda s: s[0])
    speed, median = speeds[(len(speeds) - 1) // 2]
    answers = [a for r in runs for a in r["answers"]]
    tpot = [(a["seconds"] - a["ttft"]) / (a["tokens"] - 1) for a in answers if a["tokens"] > 1]
    return {"clients": clients, "setting": setting, "tokens": sum(a["tokens"] for a in median["answers"]),
            "seconds": round(median["seconds"], 2), "tokens_per_s": round(speed, 2),
            "rounds_tokens_per_s": [round(s, 2) for s, _ in speeds],
            "ttft_p50": round(statistics.median(a["ttft"] for a in answers), 3),
            "ttft_p90": round(_pct([a["ttft"] for a in answers], 0.9), 3),
            "tpot_p50": round(statistics.median(tpot), 4) if tpot else None,
            "tpot_p90": round(_pct(tpot, 0.9), 4) if tpot else None,
            "same_as_alone": min(sum(a["text"] == t for a, t in zip(r["answers"], alone)) for r in runs),
            "prompts": len(alone)}


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
