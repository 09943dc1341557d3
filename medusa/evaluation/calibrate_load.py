"""Step costs by rows (`medusa calibrate`, after choosing the tree): the load table the decode loop sizes its
trees by (inference/load.py).

For B = 1, 2, 4, 8, 16 rows, time whole decoding steps of a batch whose every row verifies the calibrated
tree, each smaller calibrated tree, or nothing (plain one-token steps), each row `CONTEXT` tokens into its
text (a chat prompt and part of its answer: a tree's attention costs more against plain steps' as the context
grows, so a short context would favour trees); `rounds` passes over all of them, so
that a shared machine's drift and bursts fall on every way alike, and the median of each. With the tokens
each way gives per row and step (from the calibration), the decode loop then knows at each batch size which
way serves the most tokens per second, without trying them.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from medusa.inference.decode import Batch
from medusa.inference.load import LoadTable, StepCost

DEFAULT_ROWS = (1, 2, 4, 8, 16)
CONTEXT = 320           # tokens before the timed steps: the prompt, repeated to this length


@torch.inference_mode()
def time_batch(model, ids: torch.Tensor, paths, rows: int, *, steps: int = 6, context: int = CONTEXT) -> list[float]:
    """Seconds of `steps` decoding steps of `rows` copies of the prompt `ids` (1, T) repeated to `context`
    tokens (at least once, at most half the model's context), every row verifying the tree `paths` ([] = plain
    steps) with no context drafts, after one untimed step."""
    ids = ids.reshape(-1)
    context = max(min(context, model.engine.context_limit // 2), ids.numel())   # room left for the steps
    ids = ids.repeat(-(-context // ids.numel()))[:context]
    reqs, _ = model.requests([ids] * rows, tree=list(paths) or "root", lookup=0,
                             max_new_tokens=(steps + 2) * 16, eos_token_id=[])
    batch = Batch(model.engine, slots=rows, capacity=max(model.engine.capacity(r) for r in reqs),
                  trees_by_load=False)
    for r in reqs:
        batch.add(r)
    batch.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch.step()
        times.append(time.perf_counter() - t0)
    return times


def ways_to_time(result: dict, *, smaller: bool = True) -> list[tuple[list, float]]:
    """(tree, tokens per step) to time from a calibration's rows: plain steps, the static trees smaller than
    the best one (with `smaller`), and the best one (unless it is the root alone: plain steps already). None
    when the best tree is dynamic (its cost is its own per step: no table)."""
    best = result["best"]
    if best["dynamic"]:
        return []
    ways = [([], 1.0)]
    if smaller:
        sizes = sorted({r["nodes"]: r for r in result["rows"]
                        if not r["dynamic"] and 1 < r["nodes"] < best["nodes"]}.values(), key=lambda r: r["nodes"])
        ways += [(r["tree"], r["expected_tokens_per_step"]) for r in sizes]
    return ways + ([(best["tree"], best["expected_tokens_per_step"])] if best["nodes"] > 1 else [])


def saved_result(folder, device_type: str) -> dict:
    """The calibration saved in `folder`'s tree.json for `device_type`, as `calibrate` returned it (each smaller
    static budget's tree is the saved tree's first paths: the greedy construction adds paths in order), so
    that `medusa calibrate --load-only` times the load table of the tree already chosen."""
    from medusa.inference.load import TREE_FILE
    from medusa.inference.tree import load_tree

    path = Path(folder) / TREE_FILE
    entry = json.loads(path.read_text()).get("devices", {}).get(device_type) if path.is_file() else None
    if not entry or "calibration" not in entry:
        raise ValueError(f"{path} holds no calibrated tree for {device_type}: run `medusa calibrate` without "
                         f"--load-only first")
    tree = load_tree(entry["paths"]) if isinstance(entry["paths"], str) else [tuple(p) for p in entry["paths"]]
    best = {k: v for k, v in entry["calibration"].items() if k != "budgets"} | {"tree": tree}
    rows = [r | {"tree": None if r["dynamic"] else tree[:r["nodes"] - 1]} for r in entry["calibration"]["budgets"]]
    return {"best": best, "rows": rows}


def calibrate_load(model, ids: torch.Tensor, ways: list[tuple[list, float]], *, rows=DEFAULT_ROWS,
                   rounds: int = 3, steps: int = 6, machine: str = "", log=print) -> LoadTable:
    """The load table: each way's (tree, tokens per row and step) step seconds at each row count (medians)."""
    if rounds < 1 or not rows or min(rows) < 1:
        raise ValueError(f"rounds must be >= 1 and rows counts >= 1, got {rounds} and {rows}")
    rows = tuple(sorted(set(rows)))
    time_batch(model, ids, [], 1, steps=1)                 # warm-up
    times: dict[tuple[int, int], list[float]] = {(i, b): [] for i in range(len(ways)) for b in rows}
    for _ in range(rounds):
        for b in rows:
            for i, (paths, _) in enumerate(ways):
                times[i, b] += time_batch(model, ids, paths, b, steps=steps)
    table = LoadTable(machine, tuple(
        StepCost(tuple(tuple(p) for p in paths), tokens, rows, tuple(statistics.median(times[i, b]) for b in rows))
        for i, (paths, tokens) in enumerate(ways)))
    for w in table.ways:
        log(f"{len(w.paths) + 1:3d} nodes, {w.tokens_per_step:.2f} tokens/step: " + ", ".join(
            f"{b} rows {1000 * s:.0f} ms ({w.tokens_per_s(b):.0f} tok/s)" for b, s in zip(w.rows, w.seconds)))
    log("fastest by rows: " + ", ".join(f"{b}: {len(table.best(b).paths) + 1} nodes" for b in rows))
    return table
