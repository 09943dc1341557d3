"""Candidate trees: the buffers spell every root-to-leaf path, every node sees exactly its ancestors;
presets, JSON files and lists load; malformed trees are refused with a message that says why."""
from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from conftest import random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference.tree import (DEFAULT_TREE, PRESETS, DynamicTree, fit_tree_to_heads, load_tree, most_likely_paths,
                                   tree_buffers, tree_nodes, trees_from_json, trees_to_json)

# Copied from the original Medusa repository (FasterDecoding/Medusa, medusa/model/medusa_choices.py).
ORIGINAL_MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9],
    [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1],
    [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0],
    [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]


def _random_tree(seed: int, size: int = 25, max_depth: int = 5, max_rank: int = 6) -> list[tuple[int, ...]]:
    """A random well-formed tree (every node's parent present), in random order."""
    rng = random.Random(seed)
    nodes = {()}
    while len(nodes) < size + 1:
        parent = rng.choice(sorted(nodes))
        if len(parent) < max_depth:
            nodes.add(parent + (rng.randrange(max_rank),))
    paths = sorted(nodes - {()})
    rng.shuffle(paths)
    return paths


HAND_MADE = {
    "one_node": [(0,)],
    "wide": [(r,) for r in range(10)],
    "deep_chain": [(0,) * d for d in range(1, 7)],
    "sparse_ranks": [(3,), (3, 5), (1,), (1, 0), (1, 0, 2)],      # ranks skipped: topk is still max + 1
    "unsorted": [(0, 1, 0), (2,), (0,), (0, 1), (1,), (0, 0), (2, 3)],
    "random_a": _random_tree(1),
    "random_b": _random_tree(2, size=40, max_depth=3),
}
TREES = {**{f"preset_{k}": v for k, v in PRESETS.items()}, **HAND_MADE}


def _node_paths(buf) -> list[tuple[int, ...]]:
    """Node index -> its path (root is the empty path)."""
    return [()] + list(buf.paths)


@pytest.mark.parametrize("name", TREES)
def test_buffers_describe_the_tree(name):
    paths = TREES[name]
    buf = tree_buffers(paths)
    nodes = _node_paths(buf)
    n = len(paths) + 1
    assert buf.num_nodes == n and buf.attn_mask.shape == (n, n)
    assert sorted(buf.paths) == sorted(tuple(p) for p in paths)
    assert list(buf.paths) == sorted(buf.paths, key=lambda p: (len(p), p))     # by depth, then rank order
    index = {p: i for i, p in enumerate(nodes)}
    for i, p in enumerate(nodes):
        ancestors = {index[p[:d]] for d in range(len(p) + 1)}                # root .. p itself
        assert set(torch.nonzero(buf.attn_mask[i]).flatten().tolist()) == ancestors, f"node {p}"
        assert buf.depth[i] == len(p)
        if p:
            assert buf.head[i] == len(p) - 1 and buf.rank[i] == p[-1]
            assert buf.parent[i] == index[p[:-1]]
        else:
            assert buf.parent[i] == -1
    assert buf.topk == max((r for p in paths for r in p), default=-1) + 1


@pytest.mark.parametrize("name", TREES)
def test_retrieve_spells_every_root_to_leaf_path_once(name):
    paths = [tuple(p) for p in TREES[name]]
    buf = tree_buffers(paths)
    nodes = _node_paths(buf)
    leaves = {p for p in nodes if not any(q[:-1] == p for q in paths)}
    max_depth = max((len(p) for p in paths), default=0)
    assert buf.retrieve.shape == (len(leaves), max_depth + 1)
    seen = []
    for row in buf.retrieve.tolist():
        used = [i for i in row if i >= 0]
        assert row == used + [-1] * (len(row) - len(used)), f"-1 padding only at the end: {row}"
        assert used[0] == 0                                             # starts at the root
        for a, b in zip(used, used[1:]):
            assert buf.parent[b] == a, f"{nodes[a]} -> {nodes[b]} is not parent -> child"
        assert nodes[used[-1]] in leaves
        seen.append(nodes[used[-1]])
    assert sorted(seen) == sorted(leaves)                               # each leaf exactly once


def test_buffers_do_not_depend_on_input_order():
    paths = _random_tree(3)
    a, b = tree_buffers(paths), tree_buffers(list(reversed(paths)))
    assert a.paths == b.paths and a.topk == b.topk
    for field in ("attn_mask", "depth", "head", "rank", "parent", "retrieve"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_root_only_tree():
    buf = tree_buffers(PRESETS["root"])
    assert buf.num_nodes == 1 and buf.topk == 0
    assert buf.retrieve.tolist() == [[0]] and buf.attn_mask.tolist() == [[True]]


def test_mc_sim_7b_63_is_the_original_tree_in_the_original_order():
    tree = PRESETS["mc_sim_7b_63"]
    assert DEFAULT_TREE == "mc_sim_7b_63"
    assert len(tree) == 63
    assert [list(p) for p in tree[:7]] == [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0]]
    assert list(tree[-1]) == [0, 7, 0]
    assert [list(p) for p in tree] == ORIGINAL_MC_SIM_7B_63
    assert max(len(p) for p in tree) == 4
    assert [list(p) for p in load_tree("mc_sim_7b_63")] == ORIGINAL_MC_SIM_7B_63
    assert tree_buffers(tree).num_nodes == 64 and tree_buffers(tree).topk == 10


# ---------------------------------------------------------------- load_tree: sources


def test_load_tree_from_every_source(tmp_path):
    want = [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([list(p) for p in want]))
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"paths": [list(p) for p in want], "note": "from a tree search"}))
    assert load_tree(str(as_list)) == want
    assert load_tree(as_list) == want                                   # a pathlib.Path works too
    assert load_tree(str(as_dict)) == want
    assert load_tree([list(p) for p in want]) == want
    assert load_tree("cpu_small") == PRESETS["cpu_small"]
    assert load_tree(None) == PRESETS[DEFAULT_TREE]
    assert load_tree("chain", num_heads=4) == PRESETS["chain"]


@pytest.mark.parametrize("paths, message", [
    ([[0], [0, 0], [1, 0]], r"\[1, 0\] has no parent \[1\]"),
    ([[0], [0, 0, 0]], r"\[0, 0, 0\] has no parent \[0, 0\]"),
    ([[0], [1], [0]], "duplicate"),
    ([[0], [0, 1], [0, 1]], "duplicate"),
    ([[0], [-1]], "negative rank"),
    ([[0], [0, -2]], "negative rank"),
    ([["a"]], r"tree path \['a'\] is not a list of whole-number ranks"),
    ([[0.5]], r"tree path \[0.5\] is not a list of whole-number ranks"),
    ([[0], [0, True]], r"tree path \[0, True\] is not"),
    ([0, 1], r"tree path 0 is not"),
])
def test_malformed_trees_are_refused(tmp_path, paths, message):
    with pytest.raises(ValueError, match=message):
        load_tree(paths)
    file = tmp_path / "tree.json"
    file.write_text(json.dumps(paths))
    with pytest.raises(ValueError, match=message):
        load_tree(str(file))


def test_a_tree_file_that_is_not_json_names_itself(tmp_path):
    file = tmp_path / "tree.json"
    file.write_text("[[0], [1")
    with pytest.raises(ValueError, match=f"tree file {file} is not valid JSON"):
        load_tree(str(file))


def test_unknown_tree_name_is_refused():
    with pytest.raises(ValueError, match=r"unknown tree 'mc_sim_7b_64'.*mc_sim_7b_63"):
        load_tree("mc_sim_7b_64")


def test_tree_deeper_than_the_heads_is_refused():
    with pytest.raises(ValueError, match=r"4 levels deep but there are only 3 Medusa heads"):
        load_tree("mc_sim_7b_63", num_heads=3)
    with pytest.raises(ValueError, match=r"6 levels deep but there are only 5"):
        load_tree(HAND_MADE["deep_chain"], num_heads=5)
    assert load_tree(HAND_MADE["deep_chain"], num_heads=6) == HAND_MADE["deep_chain"]


def test_fit_tree_to_heads_keeps_the_shallow_part_in_order():
    fitted = fit_tree_to_heads(PRESETS["mc_sim_7b_63"], 2)
    assert fitted == [p for p in PRESETS["mc_sim_7b_63"] if len(p) <= 2]
    assert len(fitted) == 10 + 28 == len(load_tree(fitted, num_heads=2))    # depth 1: 10 nodes, depth 2: 28
    assert max(len(p) for p in fitted) == 2


def test_medusa_model_checks_the_tree_against_its_heads():
    base = tiny_model("llama")
    two = random_heads(num_heads=2)
    with pytest.raises(ValueError, match=r"4 levels deep but there are only 2 Medusa heads"):
        MedusaModel(base, two, tree="mc_sim_7b_63")
    m = MedusaModel(base, two)                                         # no tree: the default, cut to 2 levels
    assert m.tree == [p for p in PRESETS[DEFAULT_TREE] if len(p) <= 2]
    assert max(len(p) for p in m.tree) == 2
    assert MedusaModel(base, random_heads(num_heads=4)).tree == PRESETS[DEFAULT_TREE]


def _brute_force_best(probs: list[list[float]], budget: int) -> list[tuple[int, ...]]:
    K, R = len(probs), len(probs[0])
    every = [p for d in range(1, K + 1) for p in itertools.product(range(R), repeat=d)]
    score = lambda p: math.prod(probs[d][r] for d, r in enumerate(p))
    return sorted(every, key=lambda p: (-score(p), p))[: budget - 1]


@pytest.mark.parametrize("seed", range(4))
def test_most_likely_paths_are_the_best_by_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(3, 4, generator=g).sort(descending=True).values.tolist()
    for budget in (1, 2, 5, 12, 30):
        got = most_likely_paths(probs, budget)
        assert got == _brute_force_best(probs, budget)
        assert all(len(p) == 1 or p[:-1] in got for p in got)          # every parent is in
        load_tree(got)


def test_a_dynamic_tree_goes_deep_where_the_heads_are_sure_and_wide_where_they_are_not():
    sure = [[0.9, 0.05, 0.01], [0.9, 0.05, 0.01], [0.8, 0.1, 0.01]]
    unsure = [[0.3, 0.25, 0.2], [0.9, 0.05, 0.01], [0.8, 0.1, 0.01]]
    assert most_likely_paths(sure, 4) == [(0,), (0, 0), (0, 0, 0)]
    assert most_likely_paths(unsure, 4) == [(0,), (0, 0), (1,)]


def test_dynamic_trees_load_save_and_refuse_bad_sizes(tmp_path):
    assert load_tree("dynamic:6") == DynamicTree(6)
    assert load_tree(DynamicTree(3), num_heads=2) == DynamicTree(3)
    assert tree_nodes(DynamicTree(6)) == 6 and tree_nodes([(0,), (1,)]) == 3
    trees = {"cpu": DynamicTree(6), "cuda": [(0,), (0, 0)]}
    assert trees_to_json(trees) == {"devices": {"cpu": {"paths": "dynamic:6"}, "cuda": {"paths": [[0], [0, 0]]}}}
    assert trees_from_json(trees_to_json(trees)) == trees
    file = tmp_path / "tree.json"
    file.write_text(json.dumps(trees_to_json(trees)))
    assert load_tree(str(file), device_type="cpu") == DynamicTree(6)
    for bad, message in [("dynamic:0", "nodes >= 1"), ("dynamic:six", "dynamic:N"), ("dynamic:", "dynamic:N")]:
        with pytest.raises(ValueError, match=message):
            load_tree(bad)
    file.write_text(json.dumps({"paths": "dynamic-6"}))
    with pytest.raises(ValueError, match=r'a list of paths or "dynamic:N"'):
        load_tree(str(file))
