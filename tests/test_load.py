"""Trees sized to the load: calibrated step costs by rows pick each step's tree; output stays exact."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference.decode import Batch
from medusa.inference.load import LoadTable, StepCost, TreeByLoad, read_table
from test_batch import _alone, _prompts

TREE = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
SMALL = ((0,), (0, 0))


def _table(tree=TREE) -> LoadTable:
    """Made-up costs: the whole tree pays for 1-2 rows, the 3-node one for 3-4, plain steps past that."""
    rows = (1, 2, 4, 8)
    return LoadTable("test machine", (
        StepCost((), 1.0, rows, (0.010, 0.011, 0.012, 0.016)),
        StepCost(SMALL, 1.5, rows, (0.011, 0.013, 0.016, 0.032)),
        StepCost(tuple(tree), 2.0, rows, (0.012, 0.014, 0.030, 0.060))))


def test_step_costs_interpolate_between_rows_and_extend_past_them():
    way = StepCost((), 1.0, (1, 2, 4, 8), (0.010, 0.012, 0.016, 0.032))
    assert way.step_seconds(2) == pytest.approx(0.012)
    assert way.step_seconds(3) == pytest.approx(0.014)                  # between 2 and 4 rows
    assert way.step_seconds(16) == pytest.approx(0.064)                 # the last segment, extended
    assert way.tokens_per_s(4) == pytest.approx(4 / 0.016)
    table = _table()
    assert [len(table.best(b).paths) + 1 for b in (1, 2, 3, 4, 6, 16)] == [7, 7, 3, 3, 1, 1]
    assert LoadTable.from_json(json.loads(json.dumps(table.to_json()))) == table
    with pytest.raises(ValueError, match="ascending"):
        LoadTable.from_json({"ways": [{"paths": [], "tokens_per_step": 1, "rows": [2, 1], "step_ms": [1, 2]}]})


def test_a_table_decides_from_the_first_step_without_trying():
    load = TreeByLoad(_table())
    assert load.tree(1) is None and load.tree(2) == tuple(TREE)         # the row's own, the calibrated tree
    assert load.tree(4) == SMALL and load.tree(8) == ()                 # a smaller tree, then plain steps
    load.record(8, False, tokens=1, seconds=100.0)                      # nothing measured, nothing explored
    assert [load.tree(8) for _ in range(200)] == [()] * 200 and not load.rate


def test_a_way_is_judged_by_the_tokens_it_gives_on_this_text():
    """The small tree, calibrated at 1.5 tokens per step, gives 1.0 here (text its heads do not guess). One such
    step keeps it at 4 rows (the calibration still counts); a few turn 4 rows to plain steps, the whole tree, not
    seen yet, keeping its calibrated figure; once what was seen has faded, the small tree is tried again."""
    load = TreeByLoad(_table())
    assert load.tree(4) == SMALL
    load.record(4, True, tokens=4, seconds=0.01, paths=SMALL)
    assert load.tree(4) == SMALL
    bad = 1
    while load.tree(4) == SMALL and bad < 100:
        load.record(4, True, tokens=4, seconds=0.01, paths=SMALL)
        bad += 1
    assert 2 <= bad <= 5 and load.tree(4) == () and load.tree(2) == tuple(TREE)
    load.record(1, True, tokens=9, seconds=0.01)                        # a lone row's drafts do not count
    assert load.tokens[tuple(TREE)] == 2.0 and 1.0 < load.tokens[SMALL] < 4 / 3
    plain = 0
    while load.tree(4) == () and plain < 10_000:
        load.record(4, False, tokens=4, seconds=0.01, paths=())
        plain += 1
    assert 20 <= plain <= 200 and load.tree(4) == SMALL


def test_rows_step_by_the_table_and_give_their_solo_answers():
    """A batch shrinking from 6 rows to 1 (budgets end rows one by one): each step verifies what the table
    picks for its rows (plain, the small tree, the whole tree; context drafts only for a lone row) and every
    row is generate's answer alone."""
    model = tiny_model("llama")
    m = MedusaModel(model, random_heads(), tree=TREE, lookup=4)
    m.load_table = _table()
    prompts = _prompts((5, 12, 20, 9, 7, 3))
    budgets = [8, 14, 20, 26, 32, 40]
    reqs, _ = m.requests(prompts, max_new_tokens=budgets)
    batch = Batch(m.engine, slots=6, capacity=128)
    for r in reqs:
        batch.add(r)
    out = {i: [] for i in range(6)}
    sizes: dict[int, set] = {}
    while batch.busy:
        steps = batch.step()
        batch.load.seen.clear()              # by the calibrated figures alone (random heads guess worse)
        verified = [s.tree_size for s in steps if s.tree_size]     # rows in the step's forward
        sizes.setdefault(len(verified), set()).update(verified)
        for s in steps:
            out[s.row] += s.tokens.tolist()
    want = {6: {1}, 5: {1}, 4: {3}, 3: {3}, 2: {7}}              # the calibrated ways: no context drafts
    sizes.pop(0, None)
    assert min(sizes.pop(1)) == 7                                   # a lone row: its tree, and its drafts
    assert sizes and all(sizes[n] == want[n] for n in sizes)
    assert {1, 3, 7} <= set().union(*sizes.values())
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        assert torch.equal(torch.tensor(out[i]), _alone(model, p, n))


def test_a_table_for_another_tree_is_not_used():
    m = MedusaModel(tiny_model("llama"), random_heads(), tree="chain", lookup=0)
    m.load_table = _table()
    batch = Batch(m.engine, slots=4)
    assert batch.load.table is None                                     # measured as the batch runs instead


def test_tree_json_keeps_loading_with_and_without_a_table(tmp_path):
    from medusa.inference.tree import read_tree_file

    old = {"devices": {"cpu": {"paths": [[0], [0, 0]], "calibration": {"budget": 3}}}}
    (tmp_path / "tree.json").write_text(json.dumps(old))
    assert read_table(tmp_path, "cpu") is None and read_table(tmp_path / "none", "cpu") is None
    new = {"devices": {"cpu": {**old["devices"]["cpu"], "load": _table().to_json()}}}
    (tmp_path / "tree.json").write_text(json.dumps(new))
    assert read_table(tmp_path, "cpu") == _table() and read_table(tmp_path, "cuda") is None
    assert read_tree_file(tmp_path / "tree.json")["cpu"] == [(0,), (0, 0)]


@pytest.mark.parametrize("context, expect", [(100, 100), (1000, 128)])
def test_steps_are_timed_context_tokens_into_each_row(context, expect, monkeypatch):
    """The load table's steps run `context` tokens into every row (the prompt repeated), capped at half the
    model's context (256 here) so that the steps have room: a tree's attention costs grow with the context."""
    from medusa.evaluation.calibrate_load import time_batch

    m = MedusaModel(tiny_model("llama"), random_heads(), tree=TREE, lookup=0)
    seen, verify = [], m.engine.verifier.verify
    monkeypatch.setattr(m.engine.verifier, "verify", lambda cache, lengths, *a: seen.append(list(lengths)) or
                        verify(cache, lengths, *a))
    times = time_batch(m, _prompts((9,))[0][None], list(SMALL), 2, steps=3, context=context)
    assert len(times) == 3 and len(seen) == 4 and all(len(lengths) == 2 for lengths in seen)
    assert all(expect <= n <= expect + 4 * 3 for lengths in seen for n in lengths)


def test_calibrate_times_steps_by_rows_and_saves_the_table(tmp_path):
    from medusa.evaluation.calibrate import save_tree
    from medusa.evaluation.calibrate_load import calibrate_load, ways_to_time

    m = MedusaModel(tiny_model("llama"), random_heads(), tree=TREE, lookup=0)
    best = {"budget": 7, "nodes": 7, "dynamic": False, "expected_tokens_per_step": 2.0, "tree": TREE}
    result = {"best": best, "rows": [
        {"budget": 1, "nodes": 1, "dynamic": False, "expected_tokens_per_step": 1.0, "tree": []},
        {"budget": 3, "nodes": 3, "dynamic": False, "expected_tokens_per_step": 1.5, "tree": list(SMALL)},
        {"budget": 3, "nodes": 3, "dynamic": True, "expected_tokens_per_step": 1.6, "tree": None}, best]}
    ways = ways_to_time(result)
    assert [(len(t), k) for t, k in ways] == [(0, 1.0), (2, 1.5), (6, 2.0)]
    assert ways_to_time(result | {"best": result["rows"][2]}) == []   # a dynamic tree: no table
    assert ways_to_time(result | {"best": result["rows"][0]}) == [([], 1.0)]   # the root alone: timed once
    table = calibrate_load(m, _prompts((9,))[0][None], ways, rows=(1, 3), rounds=1, steps=2, machine="here",
                           log=lambda s: None)
    assert [w.rows for w in table.ways] == [(1, 3)] * 3 and all(s > 0 for w in table.ways for s in w.seconds)
    assert table.tree == tuple(TREE) and table.machine == "here"
    save_tree(tmp_path, result | {"load": table}, "cpu")
    assert read_table(tmp_path, "cpu") == LoadTable.from_json(table.to_json())
