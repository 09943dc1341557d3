"""Decoding a batch: every row is exactly what it would be alone, whatever the other rows do."""
from __future__ import annotations

import pytest
import torch

from conftest import OracleHeads, random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference.decode import Batch

LENGTHS = (5, 12, 20, 9)


def _prompts(lengths=LENGTHS, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (n,), generator=gen) for n in lengths]


def _alone(model, prompt, n) -> torch.Tensor:
    """transformers' greedy decoding of one prompt: what each row must equal."""
    out = model.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, prompt.numel():]


def _left_padded(prompts, pad=0):
    width = max(p.numel() for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - p.numel(),), pad), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - p.numel() for p in prompts]).long()
    return ids, mask


@pytest.mark.parametrize("tree,lookup", [("cpu_small", 0), ("cpu_small", 4), ("dynamic:6", 0), ("dynamic:6", 4)])
def test_batched_greedy_equals_each_row_alone(arch, tree, lookup):
    """Ragged prompts, rows ending at different steps (their own token budgets), and more prompts than rows:
    the last ones join mid-flight as rows free up."""
    model = tiny_model(arch)
    m = MedusaModel(model, random_heads(), tree=tree, lookup=lookup)
    prompts = _prompts() + _prompts((7, 3), seed=1)
    budgets = [30, 12, 25, 40, 18, 22]
    out = m.generate(prompts, max_new_tokens=budgets, max_batch=4)
    for p, n, o in zip(prompts, budgets, out):
        assert torch.equal(o[:p.numel()], p)
        assert torch.equal(o[p.numel():], _alone(model, p, n)), f"{arch} {tree} lookup={lookup}"


@pytest.mark.parametrize("tree", ["cpu_small", "dynamic:6"])
def test_batched_parent_token_heads_equal_each_row_alone(tree):
    """Heads that take their parent's token propose level by level, per row."""
    model = tiny_model("qwen2")
    m = MedusaModel(model, random_heads(parent_token=True), tree=tree, lookup=3)
    prompts = _prompts()
    out = m.generate(prompts, max_new_tokens=25, max_batch=3)
    for p, o in zip(prompts, out):
        assert torch.equal(o[p.numel():], _alone(model, p, 25))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_heads_that_predict_well_accept_different_lengths_in_one_step(arch):
    model = tiny_model(arch)
    prompts = _prompts()
    n = 60
    refs = [torch.cat([p, _alone(model, p, n + 8)]) for p in prompts]
    m = MedusaModel(model, OracleHeads(model, refs, max_rank=3, miss_every=4), tree="cpu_small", lookup=0)
    steps = list(m.stream(prompts, max_new_tokens=n, trees_by_load=False))   # every step verifies the trees
    for row, (p, ref) in enumerate(zip(prompts, refs)):
        got = torch.cat([s.tokens for s in steps if s.row == row])
        assert torch.equal(got, ref[p.numel():p.numel() + n])
    per_row = [s for s in steps if s.row == 0]
    assert len(per_row) < n / 2                              # long accepted paths
    by_step: dict[int, list[int]] = {}
    seen = [0] * len(prompts)
    for s in steps:                                          # the k-th step of every row is the same batch step
        by_step.setdefault(seen[s.row], []).append(s.accepted)
        seen[s.row] += 1
    assert any(len(set(acc)) > 1 for acc in by_step.values() if len(acc) == len(prompts))


def test_left_padded_batch_returns_like_generate():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    m = MedusaModel(model, random_heads(), tree="cpu_small")
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    ref = _alone(model, prompts[1], 20)
    eos = int(ref[6])                                         # row 1 ends early, at its 7th token
    out = m.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                        pad_token_id=0)
    assert out.shape == hf.shape and torch.equal(out, hf)
    assert (out[1, ids.shape[1] + 7:] == 0).all()
    with pytest.raises(ValueError, match="left padding"):
        m.generate(ids, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="max_new_tokens has 2 values for 4 prompts"):
        m.generate(prompts, max_new_tokens=[3, 4])


def test_per_row_options_hold_inside_the_batch():
    model = tiny_model("qwen2")
    m = MedusaModel(model, random_heads(), tree="cpu_small")
    prompts = _prompts()[:3]
    opts = dict(max_new_tokens=[10, 25, 15], temperature=[0.0, 0.9, 0.7], top_p=[1.0, 0.9, 1.0], seed=[0, 5, 6])
    batched = m.generate(prompts, **opts)
    for i, p in enumerate(prompts):
        alone = m.generate(p, **{k: v[i] for k, v in opts.items()})[0]
        assert torch.equal(batched[i], alone), f"row {i}"
    assert batched[0].numel() == prompts[0].numel() + 10


def test_a_cancelled_row_leaves_the_others_unchanged():
    model = tiny_model("mistral")
    m = MedusaModel(model, random_heads(), tree="dynamic:6")
    prompts = _prompts()
    reqs, _ = m.requests(prompts, max_new_tokens=30)
    batch = Batch(m.engine, slots=4, capacity=64)
    for r in reqs:
        batch.add(r)
    got: dict[int, list[int]] = {i: [] for i in range(4)}
    for k in range(40):
        if k == 3:
            assert batch.cancel(1) and not batch.cancel(1)
        if not batch.rows:
            break
        for s in batch.step():
            got[s.row] += s.tokens.tolist()
    for i in (0, 2, 3):
        assert got[i] == _alone(model, prompts[i], 30).tolist()
    assert 0 < len(got[1]) < 30


def test_one_forward_per_step_for_the_whole_batch():
    model = tiny_model("llama")
    m = MedusaModel(model, random_heads(), tree="cpu_small", lookup=0)
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        steps = list(m.stream(_prompts(), max_new_tokens=8))
    finally:
        hook.remove()
    prefills, forwards = calls[:4], calls[4:]
    assert [s[1] for s in prefills] == list(LENGTHS) and all(s[0] == 1 for s in prefills)
    assert all(s[0] == 4 for s in forwards[:2])              # every row in one forward while all run
    assert len(forwards) <= max(sum(1 for s in steps if s.row == r) for r in range(4))


def test_trees_by_load_takes_the_faster_way_and_tries_the_other_now_and_then():
    from medusa.inference.load import TreeByLoad

    load = TreeByLoad(explore_every=4)
    assert load.use_trees(1)                                  # a lone row keeps its tree
    assert load.use_trees(8)                                  # nothing measured: trees first...
    load.record(8, True, tokens=16, seconds=0.4)              # 40 tokens/s
    assert not load.use_trees(8)                              # ...then plain steps
    load.record(8, False, tokens=8, seconds=0.1)              # 80 tokens/s
    picks = [load.use_trees(8) for _ in range(8)]
    assert picks.count(True) == 2 and not picks[0]            # plain, trying trees every 4th step
    load.record(8, True, tokens=40, seconds=0.2)              # trees got faster: 200 tokens/s, smoothed
    load.record(8, True, tokens=40, seconds=0.2)
    assert load.rate[(8, True)] > 80 and load.use_trees(8)
    assert load.use_trees(4)                                  # each row count is measured on its own
    lost = TreeByLoad(explore_every=1000)
    lost.record(4, True, tokens=10, seconds=1.0)
    lost.record(4, False, tokens=50, seconds=1.0)
    assert not lost.use_trees(8) and lost.use_trees(3)        # lost at 4 rows: not tried first at 8


def test_rows_sampling_typically_keep_their_trees_in_a_batch():
    model = tiny_model("llama")
    m = MedusaModel(model, random_heads(), tree="cpu_small")
    batch = Batch(m.engine, slots=4, capacity=64)
    reqs, _ = m.requests(_prompts(), max_new_tokens=20, temperature=[0.0, 0.7, 0.0, 0.0], seed=3)
    for r in reqs:
        batch.add(r)
    batch.load.rate.update({(4, True): 1.0, (4, False): 100.0, (3, True): 1.0, (3, False): 100.0})
    batch.load.explore_every = 10 ** 9                        # plain steps are measured faster: never trees
    sizes: dict[int, set] = {i: set() for i in range(4)}
    while batch.rows:
        for s in batch.step():
            sizes[s.row].add(s.tree_size)
    assert min(sizes[1] - {0}) >= 15 and all(sizes[i] <= {0, 1} for i in (0, 2, 3))


def _windowed(arch: str):
    """Tiny models whose layers see only their last 16 positions: Mistral's every layer, Qwen2's second, Gemma
    3's first (a sliding layer and a full one, as Gemma-3-270M has 5 : 1, each taking its own mask)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    if arch == "gemma3":
        torch.manual_seed(0)
        cfg = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                               sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                               tie_word_embeddings=False, initializer_range=1.0, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():   # Gemma's norms start at 1 + 0, and then its greedy text repeats one token
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.5)
        model.generation_config.eos_token_id = None
        return model
    extra = dict(use_sliding_window=True, layer_types=["full_attention", "sliding_attention"]) if arch == "qwen2" else {}
    return tiny_model(arch, sliding_window=16, **extra)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3"])
def test_sliding_window_layers_see_their_window_past_it(arch):
    """Prompts and answers far longer than the window, alone and in a batch, with trees and drafts: each row
    is generate's on its prompt alone, and the context is the model's position limit, not the window."""
    model = _windowed(arch)
    m = MedusaModel(model, random_heads(), tree="cpu_small", lookup=4)
    assert m.context_limit == 256
    prompts = _prompts((5, 30, 20))
    refs = [_alone(model, p, 40) for p in prompts]
    for out in (m.generate(prompts, max_new_tokens=40, trees_by_load=False),
                [m.generate(p, max_new_tokens=40)[0] for p in prompts]):
        for p, o, ref in zip(prompts, out, refs):
            assert torch.equal(o[p.numel():], ref), arch
    oracle = MedusaModel(model, OracleHeads(model, [torch.cat([p, r]) for p, r in zip(prompts, refs)]),
                         tree="cpu_small", lookup=0)                   # long accepted paths across the window
    for p, ref in zip(prompts, refs):
        steps = list(oracle.stream(p, max_new_tokens=40, eos_token_id=[]))
        assert torch.equal(torch.cat([s.tokens.reshape(-1) for s in steps]), ref) and len(steps) < 25, arch


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3"])
def test_sliding_window_masks_give_every_tree_node_its_own_logits(arch):
    """A batch's tree step past the window: every node's logits are the model's on that node's path alone."""
    model = _windowed(arch)
    m = MedusaModel(model, random_heads(), tree="cpu_small", lookup=0)
    prompts = _prompts((30, 20))
    reqs, _ = m.requests(prompts, max_new_tokens=5)
    batch = Batch(m.engine, slots=2, capacity=64)
    for r in reqs:
        batch.add(r)
    with torch.inference_mode():
        for r in batch.rows:
            r.choose_root()
        cands = m.engine.proposer.propose([r.proposal() for r in batch.rows])
        batch.cache.reserve(max(c.tokens.numel() for c in cands))
        verified = m.engine.verifier.verify(batch.cache, [r.length for r in batch.rows], cands, [False, False])
        for p, c, v in zip(prompts, cands, verified):
            for node in range(c.tokens.numel()):
                path = c.tree.attn_mask[node].nonzero().flatten()
                alone = model(torch.cat([p, c.tokens[path]])[None]).logits[0, -1]
                torch.testing.assert_close(v.logits[node], alone, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_long_prompt_joins_a_chunk_per_step_while_the_rows_step(arch):
    """A 100-token prompt joining a running row with prefill_chunk=16: the running row steps once per chunk
    (7 steps, not stalled for the whole prompt), and the long row, prefilled in chunks into a cache of its own,
    then decodes exactly as a prompt prefilled at once (generate's answer). A waiting prompt can be cancelled."""
    model = tiny_model(arch)
    m = MedusaModel(model, random_heads(), tree="cpu_small", lookup=4)
    short, long = _prompts((6,))[0], _prompts((100,), seed=2)[0]
    reqs, _ = m.requests([short, long, long], max_new_tokens=[90, 30, 30])
    batch = Batch(m.engine, slots=2, capacity=32, prefill_chunk=16)
    assert batch.add(reqs[0]) is not None
    out = {0: [], 1: []}
    for s in batch.step():
        out[s.row] += s.tokens.tolist()
    assert batch.add(reqs[1]) is None and batch.free == 0        # waits for its chunks
    rows = []
    while batch.prefilling:
        steps = batch.step()
        rows.append(sorted({s.row for s in steps}))
        for s in steps:
            out[s.row] += s.tokens.tolist()
    assert rows == [[0]] * 6 + [[0, 1]]                          # ceil(100 / 16) chunks, one per step
    while batch.busy:
        for s in batch.step():
            out[s.row] += s.tokens.tolist()
    assert torch.equal(torch.tensor(out[0]), _alone(model, short, 90))
    assert torch.equal(torch.tensor(out[1]), _alone(model, long, 30))
    batch.add(reqs[0])
    reqs[2].key = 2
    assert batch.add(reqs[2]) is None and batch.cancel(2) and not batch.prefilling and batch.free == 1
