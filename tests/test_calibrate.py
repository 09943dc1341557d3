"""Calibration: the greedy tree construction is optimal, and a calibrated tree is saved and used."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import OracleHeads, parent_heads_ignoring_parent, random_heads, tiny_model, tiny_tokenizer
from medusa import MedusaModel
from medusa.evaluation.calibrate import calibrate, expected_tokens, save_tree, time_steps
from medusa.inference.tree import DynamicTree, most_likely_paths, validate_tree
from medusa.training.data import Example


def _all_trees(K: int, R: int, n: int):
    nodes = [p for d in range(1, K + 1) for p in itertools.product(range(R), repeat=d)]
    for combo in itertools.combinations(nodes, n):
        if all(len(p) == 1 or p[:-1] in combo for p in combo):
            yield list(combo)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_tree_is_the_best_tree_of_its_size(seed):
    acc = torch.rand(2, 3, generator=torch.Generator().manual_seed(seed))
    acc = acc / acc.sum(1, keepdim=True) * 0.9           # rank accuracies of a head sum to at most 1
    acc = acc.sort(dim=1, descending=True).values        # better ranks are more often right
    for n in range(1, 6):
        tree = most_likely_paths(acc, n + 1)
        validate_tree(tree, num_heads=2)
        best = max(expected_tokens(t, acc) for t in _all_trees(2, 3, n))
        assert len(tree) == n and expected_tokens(tree, acc) == pytest.approx(best)


def test_confident_first_ranks_give_a_chain():
    acc = torch.tensor([[0.95, 0.01, 0.01], [0.9, 0.02, 0.01], [0.9, 0.01, 0.0]])
    assert most_likely_paths(acc, 4) == [(0,), (0, 0), (0, 0, 0)]
    assert expected_tokens(most_likely_paths(acc, 4), acc) == pytest.approx(1 + 0.95 + 0.95 * 0.9 + 0.95 * 0.9 * 0.9)


def test_calibrate_saves_a_tree_the_loader_uses(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = model.generate(prompt, max_new_tokens=150, min_new_tokens=150, do_sample=False, pad_token_id=0)[0]
    heads = OracleHeads(model, ref, max_rank=2, miss_every=4)
    m = MedusaModel(model, heads, tok, tree="chain")
    mask = torch.zeros(ref.numel(), dtype=torch.bool)
    mask[10:] = True
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        calibrate(m, [Example(ref, mask)], prompt, budgets=(1, 4), rounds=0, log=lambda s: None)
    result = calibrate(m, [Example(ref, mask)], prompt, budgets=(1, 4, 8), rounds=2, dynamic=False,
                       log=lambda s: None)
    acc = torch.tensor(result["rank_accuracy"])
    assert acc[:, :2].sum(1).min() > 0.5                  # the oracle puts the truth in its top 2 mostly
    assert [r["budget"] for r in result["rows"]] == [1, 4, 8]
    assert result["rows"][0]["expected_tokens_per_step"] == 1.0
    assert result["rows"][2]["expected_tokens_per_step"] > result["rows"][1]["expected_tokens_per_step"] > 1.5
    assert result["best"] in result["rows"]
    # the saved tree is what a loaded model uses by default
    from medusa.inference.checkpoint import save_heads
    from medusa.inference.heads import HeadsConfig, MedusaHeads
    folder = tmp_path / "heads"
    save_heads(folder, MedusaHeads(HeadsConfig(hidden_size=64, vocab_size=96, base_model_name_or_path="x")))
    (folder / "tree.json").write_text(json.dumps({"paths": [[0]], "devices": {"cuda": {"paths": [[0], [1]]}}}))
    save_tree(folder, result, "cpu")
    saved = json.loads((folder / "tree.json").read_text())      # this device type's tree added, the others kept
    assert saved["paths"] == [[0]] and saved["devices"]["cuda"] == {"paths": [[0], [1]]}
    assert saved["devices"]["cpu"]["calibration"]["budget"] == result["best"]["budget"]
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    loaded = MedusaModel.from_pretrained(folder, base_model=str(tmp_path / "base"))
    assert loaded.tree == [tuple(p) for p in result["best"]["tree"]]
    # a folder that does not exist yet (--save-to NEW) is made, not an error after the whole run
    saved = save_tree(tmp_path / "new" / "trees", result, "cuda")
    assert json.loads(saved.read_text())["devices"]["cuda"]["paths"] == [list(p) for p in result["best"]["tree"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_budgets_stop_where_this_machine_loses_exactness(dtype):
    from medusa.inference import tree_attention

    tree_attention.register()
    model = tiny_model("llama", attn=tree_attention.NAME).to(dtype)
    prompt = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)[0]
    m = MedusaModel(model, OracleHeads(model, ref, max_rank=2, miss_every=4), tiny_tokenizer(), tree="chain")
    mask = torch.zeros(ref.numel(), dtype=torch.bool)
    mask[10:] = True
    budgets = (1, 4, 16, 48, 96)
    exact = [b for b in budgets if tree_attention.rows_independent(model, b)]
    result = calibrate(m, [Example(ref, mask)], prompt, budgets=budgets, log=lambda s: None)
    assert sorted({r["budget"] for r in result["rows"]}) == exact and exact[0] == 1


def test_measured_tokens_count_the_deepest_right_path_static_or_dynamic():
    """Three positions, two heads, two ranks: what each tree would accept, counted by hand."""
    from medusa.evaluation.calibrate import measured_tokens

    hit = torch.tensor([[[1, 0], [0, 1], [0, 0]],       # head 1: right at rank 0, rank 1, nowhere
                        [[1, 0], [1, 0], [0, 1]]], dtype=torch.bool)
    probs = torch.tensor([[[0.9, 0.1], [0.4, 0.5], [0.5, 0.2]],
                          [[0.8, 0.1], [0.9, 0.1], [0.6, 0.3]]])
    assert measured_tokens([(0,), (0, 0)], probs, hit) == pytest.approx(1 + (2 + 0 + 0) / 3)
    assert measured_tokens([(0,), (1,), (1, 0)], probs, hit) == pytest.approx(1 + (1 + 2 + 0) / 3)
    # dynamic, 3 nodes: (0,) (0,0) at positions 0 and 2; position 1 trusts head 1's rank 1 (0.5): (1,) (1,0)
    assert measured_tokens(DynamicTree(3), probs, hit) == pytest.approx(1 + (2 + 2 + 0) / 3)


def test_calibrate_can_choose_a_dynamic_tree_and_the_loader_uses_it(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = model.generate(prompt, max_new_tokens=150, min_new_tokens=150, do_sample=False, pad_token_id=0)[0]
    m = MedusaModel(model, OracleHeads(model, ref, max_rank=3, miss_every=4), tok, tree="chain")
    mask = torch.zeros(ref.numel(), dtype=torch.bool)
    mask[10:] = True
    result = calibrate(m, [Example(ref, mask)], prompt, budgets=(1, 2, 6), rounds=1, log=lambda s: None)
    kinds = [(r["budget"], r["dynamic"]) for r in result["rows"]]
    assert kinds == [(1, False), (2, False), (6, False), (6, True)]      # no dynamic tree below 3 nodes
    assert all(r["expected_tokens_per_step"] >= 1 for r in result["rows"])
    dynamic = next(r for r in result["rows"] if r["dynamic"])
    static_only = calibrate(m, [Example(ref, mask)], prompt, budgets=(6,), rounds=1, dynamic=False, log=lambda s: None)
    assert [r["dynamic"] for r in static_only["rows"]] == [False]
    from medusa.inference.checkpoint import save_heads
    from medusa.inference.heads import HeadsConfig, MedusaHeads
    folder = tmp_path / "heads"
    save_heads(folder, MedusaHeads(HeadsConfig(hidden_size=64, vocab_size=96, base_model_name_or_path="x")))
    save_tree(folder, {"best": dynamic, "rows": result["rows"]}, "cpu")
    assert json.loads((folder / "tree.json").read_text())["devices"]["cpu"]["paths"] == "dynamic:6"
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    loaded = MedusaModel.from_pretrained(folder, base_model=str(tmp_path / "base"))
    assert loaded.tree == DynamicTree(6)


def test_dynamic_trees_of_parent_token_heads_are_measured_by_growing_them():
    """Parent-token heads whose parent weights are zero guess as plain heads: the level-by-level measure of
    their dynamic trees equals the one from the plain heads' probability table. The text follows head 0's
    rank (t mod 3) guess at each position, so depth-1 nodes are accepted when the tree holds that rank.
    calibrate measures dynamic trees for parent-token heads this way."""
    from medusa.evaluation.calibrate import measured_tokens
    from medusa.evaluation.calibrate import dynamic_parent_tokens
    from medusa.training.accuracy import guess_table

    model, tok = tiny_model("llama"), tiny_tokenizer()
    heads, plain = parent_heads_ignoring_parent()
    emb, text = model.get_input_embeddings(), [5, 9]
    with torch.no_grad():
        while len(text) < 120:
            hidden = model(torch.tensor([text[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
            top = plain.head_logits(0, hidden, model.lm_head, emb(torch.tensor(text[-1]))).topk(3).indices
            text.append(int(top[len(text) % 3]))
    ref = torch.tensor(text)
    mask = torch.zeros(ref.numel(), dtype=torch.bool)
    mask[2:] = True
    budgets = (3, 6, 10, 20)
    with torch.no_grad():
        grown = dynamic_parent_tokens(model, heads, [Example(ref, mask)], budgets)
        probs, hit, valid = guess_table(model, plain, [Example(ref, mask)])
    full = valid.all(0)
    flat = {b: measured_tokens(DynamicTree(b), probs[:, full], hit[:, full]) for b in budgets}
    assert grown == pytest.approx(flat)
    assert 1.3 < grown[3] < grown[6] < grown[10] < grown[20]
    m = MedusaModel(model, heads, tok, tree="chain")
    result = calibrate(m, [Example(ref, mask)], ref[None, :10], budgets=(1, 6), rounds=1, log=lambda s: None)
    row = next(r for r in result["rows"] if r["dynamic"])
    assert row["expected_tokens_per_step"] == pytest.approx(grown[6], abs=1e-3)


def test_timing_runs_only_the_steps_it_times():
    model = tiny_model("llama")
    m = MedusaModel(model, random_heads(), tree="cpu_small", lookup=0)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        times = time_steps(m, torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0)), "root", steps=5)
    finally:
        hook.remove()
    assert len(times) == 5 and all(t > 0 for t in times)
    # the untimed first step's two forwards (the prompt's and its own) and the 5 timed steps' forwards; not the
    # rest of the 40-token answer
    assert len(calls) == 7
