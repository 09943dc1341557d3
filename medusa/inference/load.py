"""Trees sized to the load: which tree a batch's rows verify each step, or none (one token per step).

A step costs about the same for a few tokens as for one (reading the weights dominates), and then more and more
as the forward's tokens grow (the products turn compute-bound): on a 2-core CPU already past a few rows, on a
GPU past hundreds. So a tree that pays for one row can cost more than it gains for sixteen.

`LoadTable` is what `medusa calibrate` measured on a machine: for plain steps, the calibrated tree and smaller
calibrated trees, the seconds of a whole step by the number of rows, and the tokens each gives per row and step.
With a table, each step takes the way with the most expected tokens per second for its number of rows, from
the first step on, judging a way by the tokens per step it gives on this text: its calibrated figure counts as
`PRIOR_ROWS` row-steps beside those seen, and what was seen fades by `FORGET` a step, so one unlucky step does
not turn a tree off, and a tree turned off by text its heads guess poorly is tried again later. Without one,
`TreeByLoad` measures the tokens per second its steps give with trees and without them for each number of
rows as a batch runs, and takes the faster, trying the other now and then.
Only rows whose acceptance is exact (greedy, lossless sampling) follow it: their output is the same either way.
A lone row always keeps its tree.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

TREE_FILE = "tree.json"
PRIOR_ROWS = 16      # row-steps of evidence a way's calibrated tokens per step counts as
FORGET = 0.99        # what each step keeps of the tokens and row-steps seen before it


@dataclass(frozen=True)
class StepCost:
    """One way to step, as calibrated: its tree (() = plain steps), the tokens it gives per row and step, and
    the seconds of a step by rows (`rows` ascending, `seconds` one per row count)."""
    paths: tuple[tuple[int, ...], ...]
    tokens_per_step: float
    rows: tuple[int, ...]
    seconds: tuple[float, ...]

    def step_seconds(self, rows: int) -> float:
        """A step's seconds at `rows`: linear between the measured row counts, extended from the nearest two
        past them (a step's cost grows about linearly with its tokens)."""
        xs, ys = self.rows, self.seconds
        if len(xs) == 1:
            return ys[0] * rows / xs[0]
        i = min(max(bisect.bisect_left(xs, rows), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(y0 + (y1 - y0) * (rows - x0) / (x1 - x0), 1e-9)

    def tokens_per_s(self, rows: int) -> float:
        return rows * self.tokens_per_step / self.step_seconds(rows)


@dataclass(frozen=True)
class LoadTable:
    """Calibrated step costs by rows on one machine (`machine` says which), the largest tree last."""
    machine: str
    ways: tuple[StepCost, ...]

    @property
    def tree(self) -> tuple[tuple[int, ...], ...]:
        """The tree the table was calibrated for (the largest way)."""
        return self.ways[-1].paths

    def best(self, rows: int, tokens: dict | None = None) -> StepCost:
        """The way with the most tokens/s at `rows`; `tokens`: tokens per row and step seen, by a way's paths,
        in place of the calibrated ones."""
        tokens = tokens or {}
        return max(self.ways, key=lambda w: w.tokens_per_s(rows) * tokens.get(w.paths, w.tokens_per_step)
                   / w.tokens_per_step)

    def to_json(self) -> dict:
        return {"machine": self.machine,
                "ways": [{"paths": [list(p) for p in w.paths], "tokens_per_step": w.tokens_per_step,
                          "rows": list(w.rows), "step_ms": [round(s * 1000, 2) for s in w.seconds]}
                         for w in self.ways]}

    @classmethod
    def from_json(cls, data: dict) -> "LoadTable":
        ways = tuple(StepCost(tuple(tuple(p) for p in w["paths"]), float(w["tokens_per_step"]),
                              tuple(int(r) for r in w["rows"]), tuple(float(ms) / 1000 for ms in w["step_ms"]))
                     for w in data["ways"])
        if not ways or any(len(w.rows) != len(w.seconds) or list(w.rows) != sorted(set(w.rows)) for w in ways):
            raise ValueError("a load table has ways, each with ascending distinct rows and a step_ms per row")
        return cls(str(data.get("machine", "")), tuple(sorted(ways, key=lambda w: len(w.paths))))


def read_table(folder: str | Path, device_type: str) -> LoadTable | None:
    """The load table saved beside the heads' tree for `device_type` (tree.json's devices.TYPE.load), or None
    (none saved: an older tree.json, or another device's)."""
    path = Path(folder) / TREE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    entry = data.get("devices", {}).get(device_type) if isinstance(data, dict) else None
    if not isinstance(entry, dict) or "load" not in entry:
        return None
    try:
        return LoadTable.from_json(entry["load"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: devices.{device_type}.load: {e}") from None


class TreeByLoad:
    """`tree(rows)` -> the tree this step's exact rows verify; `record(...)` its outcome (online mode)."""

    def __init__(self, table: LoadTable | None = None, explore_every: int = 48, smoothing: float = 0.3):
        self.table = table
        self.rate: dict[tuple[int, bool], float] = {}     # (rows, trees) -> tokens/s, smoothed
        self.seen: dict[tuple, tuple[float, float]] = {}  # a table's way -> (tokens, row-steps) seen, fading
        self.explore_every, self.smoothing, self.steps = explore_every, smoothing, 0

    def tree(self, rows: int) -> tuple | None:
        """None: each row its own tree; (): plain one-token steps; else a calibrated tree's paths."""
        if rows <= 1:
            return None
        if self.table is not None:
            return self.table.best(rows, self.tokens).paths
        return None if self.use_trees(rows) else ()

    @property
    def tokens(self) -> dict[tuple, float]:
        """A table's ways -> tokens per row and step expected: the calibrated figure with what was seen."""
        if self.table is None:
            return {}
        return {w.paths: (PRIOR_ROWS * w.tokens_per_step + t) / (PRIOR_ROWS + n)
                for w in self.table.ways for t, n in [self.seen.get(w.paths, (0.0, 0.0))]}

    def calibrated(self, rows: int) -> bool:
        """Whether `tree(rows)` comes from the table, whose costs were measured without context drafts."""
        return self.table is not None and rows > 1

    def _trees_lost(self, rows: int) -> bool:
        """Whether plain steps were measured faster at this many rows or fewer: a step's cost grows with its
        tokens, so trees that lose for fewer rows lose for more."""
        return any(r <= rows and self.rate[(r, True)] < self.rate[(r, False)]
                   for r, trees in self.rate if trees and (r, False) in self.rate)

    def use_trees(self, rows: int) -> bool:
        """Online: whether rows verify their trees this step (measure each way, then the faster one, trying
        the other every `explore_every` steps)."""
        if rows <= 1:
            return True
        self.steps += 1
        explore = self.steps % self.explore_every == 0
        trees, plain = self.rate.get((rows, True)), self.rate.get((rows, False))
        if trees is None or plain is None:
            if self._trees_lost(rows):          # known to lose: plain, trying trees only now and then
                return explore
            return trees is None                # measure each way once
        better = trees >= plain
        return (not better) if explore else better

    def record(self, rows: int, trees: bool, tokens: int, seconds: float, paths: tuple | None = None) -> None:
        """A step's outcome: `tokens` from `rows` rows in `seconds`, with trees or not (`paths`: the tree, None
        for the rows' own). With a table, only the tokens per row and step the way gave count: the text served
        may be easier or harder to guess than the calibration's, and a way is judged by what it gives here."""
        if self.table is not None:
            self.seen = {w: (t * FORGET, n * FORGET) for w, (t, n) in self.seen.items()}
            way = self.table.tree if paths is None else paths
            if way and rows > 1:             # plain steps give one token per row; a lone row adds drafts
                t, n = self.seen.get(way, (0.0, 0.0))
                self.seen[way] = (t + tokens, n + rows)
            return
        if rows <= 1 or seconds <= 0:
            return
        key, rate = (rows, trees), tokens / seconds
        old = self.rate.get(key)
        self.rate[key] = rate if old is None else old + self.smoothing * (rate - old)
