"""`medusa bench --batch-size 1,2,4,8,16`: total throughput of many requests at several batch sizes.

The same prompts (the first turns of the questions), greedy, at each batch size B, by three methods side by
side in one run (their order rotates from one batch size to the next, so slow drift of the machine falls on
all of them alike):
  medusa    the engine with the model's tree and context drafts, B rows at a time (a finished row's slot
            takes the next prompt at once)
  plain     the same engine with no candidates (tree "root", no drafts): plain batched decoding
  generate  transformers `generate` on B prompts at a time, left-padded (the transformers way: a batch runs
            until its longest answer ends)
Each answer is compared with the prompt decoded alone by `generate` (exact match per row).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from medusa.evaluation.report import write_result

METHODS = ("medusa", "plain", "generate")


def _engine(model, prompts, batch: int, n: int, **kw) -> tuple[list[list[int]], int]:
    """-> (each prompt's new tokens, row-steps that added tokens)."""
    out: list[list[int]] = [[] for _ in prompts]
    steps = 0
    for s in model.stream(prompts, max_new_tokens=n, max_batch=batch, **kw):
        out[s.row] += s.tokens.tolist()
        steps += s.accepted > 0
    return out, steps


def _generate(model, prompts, batch: int, n: int) -> tuple[list[list[int]], int]:
    eos = set(model.decode_options().eos_token_ids)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(p.numel() for p in chunk)
        for row in model.generate_baseline(chunk, max_new_tokens=n)[:, width:].tolist():
            end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            out.append(row[:end])
    return out, sum(len(o) for o in out)


RUNNERS = {
    "medusa": lambda model, prompts, b, n: _engine(model, prompts, b, n),
    "plain": lambda model, prompts, b, n: _engine(model, prompts, b, n, tree="root", lookup=0),
    "generate": _generate,
}


def run_batch_bench(model, prompts: list[torch.Tensor], batch_sizes: list[int], max_new_tokens: int, *,
                    warmup: bool = True, log=print) -> dict:
    """Every method at every batch size over `prompts` (1-D token tensors); returns the figures."""
    n = max_new_tokens
    if warmup:
        for runner in RUNNERS.values():
            runner(model, prompts[:2], 2, 8)
    with torch.inference_mode():
        alone = [model.generate_baseline(p[None], max_new_tokens=n)[0, p.numel():].tolist() for p in prompts]
    eos = set(model.decode_options().eos_token_ids)
    alone = [a[:next((k + 1 for k, t in enumerate(a) if t in eos), len(a))] for a in alone]
    rows = []
    for i, b in enumerate(batch_sizes):
        order = METHODS[i % 3:] + METHODS[:i % 3]
        for method in order:
            t0 = time.perf_counter()
            answers, steps = RUNNERS[method](model, prompts, b, n)
            seconds = time.perf_counter() - t0
            tokens = sum(len(a) for a in answers)
            rows.append({"batch_size": b, "method": method, "tokens": tokens, "seconds": round(seconds, 3),
                         "tokens_per_s": round(tokens / seconds, 2), "tokens_per_step": round(tokens / steps, 3),
                         "exact": sum(a == r for a, r in zip(answers, alone)), "prompts": len(prompts)})
            log(format_row(rows[-1]))
    return {"rows": rows}


def format_row(r: dict) -> str:
    return (f"B={r['batch_size']:>3} {r['method']:<9} {r['tokens_per_s']:8.1f} tokens/s  "
            f"{r['tokens_per_step']:5.2f} tokens/step  {r['exact']}/{r['prompts']} exact  "
            f"({r['tokens']} tokens in {r['seconds']:.1f} s)")


def format_table(result: dict) -> str:
    by = {(r["batch_size"], r["method"]): r for r in result["rows"]}
    sizes = sorted({r["batch_size"] for r in result["rows"]})
    lines = ["| batch | medusa tok/s | plain tok/s | generate tok/s | medusa / plain | medusa / generate "
             "| medusa tok/step | exact (medusa, plain, generate) |", "|---|---|---|---|---|---|---|---|"]
    for b in sizes:
        m, p, g = (by[(b, k)] for k in METHODS)
        lines.append(f"| {b} | {m['tokens_per_s']} | {p['tokens_per_s']} | {g['tokens_per_s']} | "
                     f"{m['tokens_per_s'] / p['tokens_per_s']:.2f}x | {m['tokens_per_s'] / g['tokens_per_s']:.2f}x | "
                     f"{m['tokens_per_step']} | {m['exact']}, {p['exact']}, {g['exact']} of {m['prompts']} |")
    return "\n".join(lines)


def write(out: Path, result: dict, *, log=print) -> None:
    write_result(out, "batch", result, x="batch_size", series="method", xlabel="batch size",
                 ylabel="total new tokens / s", log=log)
