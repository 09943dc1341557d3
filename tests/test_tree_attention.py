"""medusa_tree attention: each tree node computed like a one-token step along its own path."""
from __future__ import annotations

import pytest
import torch

from conftest import random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference import tree_attention
from medusa.inference.cache import BatchCache
from medusa.inference.quantized import quantize_linears
from medusa.inference.tree import PRESETS, tree_buffers, with_drafts

PLAIN = ["llama", "mistral", "qwen2", "phi3", "gpt2"]   # Gemma-2 soft-caps its attention: refused


def _model(arch):
    tree_attention.register()
    return tiny_model(arch, attn=tree_attention.NAME)


def _prompt(seed=0, n=12):
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", PLAIN)
@pytest.mark.parametrize("drafted", [0, 5])
def test_tree_step_equals_each_path_decoded_alone(arch, drafted):
    model = _model(arch)
    prompt, tree = _prompt(1), with_drafts(tree_buffers(PRESETS["cpu_small"]), drafted)
    n, L = tree.num_nodes, prompt.shape[1]
    tokens = torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(2))
    groups = tree_attention.tree_paths(tree)
    with torch.no_grad():
        cache = BatchCache.for_model(model, capacity=64)
        model(prompt, past_key_values=cache, use_cache=True)
        tree_logits = model(tokens[None], past_key_values=cache, position_ids=(L + tree.depth)[None], use_cache=True,
                            medusa_tree=[tree_attention.step_index(groups, L)]).logits[0]
        for node in range(n):
            path = [j for j in range(n) if tree.attn_mask[node, j]]
            alone = BatchCache.for_model(model, capacity=64)
            model(prompt, past_key_values=alone, use_cache=True)
            for d, j in enumerate(path):          # one token at a time, as generate decodes it
                logits = model(tokens[j].view(1, 1), past_key_values=alone, position_ids=torch.tensor([[L + d]]),
                               use_cache=True).logits[0, -1]
            torch.testing.assert_close(tree_logits[node], logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("prefix", [12, 60, 63, 64, 125])
def test_tree_nodes_get_the_bits_of_one_token_steps(arch, prefix):
    """With row-independent (4-bit) products, every node's logits equal, bit for bit, those of its path decoded
    one token at a time, whatever the node's depth (paths up to 9 deep: a tree with context drafts) and the
    prefix's length (the products' and the softmax's vector tails fall differently)."""
    model = _model(arch)
    assert quantize_linears(model) > 0 and tree_attention.rows_independent(model, 32)
    prompt, tree = _prompt(4, prefix), with_drafts(tree_buffers(PRESETS["cpu_small"]), 6)
    n = tree.num_nodes
    tokens = torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(5))
    index = tree_attention.step_index(tree_attention.tree_paths(tree), prefix)
    with torch.no_grad():
        cache = BatchCache.for_model(model, capacity=prefix + n)
        model(prompt, past_key_values=cache, use_cache=True)
        tree_logits = model(tokens[None], past_key_values=cache, position_ids=(prefix + tree.depth)[None],
                            use_cache=True, medusa_tree=[index]).logits[0]
        for node in range(n):
            alone = BatchCache.for_model(model, capacity=prefix + n)
            model(prompt, past_key_values=alone, use_cache=True)
            for d, j in enumerate(tree.attn_mask[node].nonzero().flatten().tolist()):
                logits = model(tokens[j].view(1, 1), past_key_values=alone, position_ids=torch.tensor([[prefix + d]]),
                               use_cache=True).logits[0, -1]
            assert torch.equal(tree_logits[node], logits), f"node {node} (depth {int(tree.depth[node])})"


@pytest.mark.parametrize("arch", PLAIN)
@pytest.mark.parametrize("tree", ["cpu_small", "mc_sim_7b_63"])
def test_greedy_equals_generate_with_tree_attention(arch, tree):
    model = _model(arch)
    m = MedusaModel(model, random_heads(), tree=tree)
    for seed in range(2):
        ids = _prompt(seed)
        ref = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
        assert torch.equal(m.generate(ids, max_new_tokens=40), ref), f"{arch}/{tree} seed {seed}"


def test_plain_steps_are_eager_attention():
    """Outside tree steps it is eager attention: same logits as the model loaded with `eager`."""
    ids = _prompt(3, 20)
    with torch.no_grad():
        ours = _model("llama")(ids).logits
        eager = tiny_model("llama", attn="eager")(ids).logits
    torch.testing.assert_close(ours, eager, atol=1e-6, rtol=1e-6)


def test_soft_capped_attention_is_refused():
    model = _model("gemma2")
    with pytest.raises(ValueError, match="softcap.*sdpa' or 'eager'"):
        model(_prompt())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_batch_under_tree_attention_equals_each_row_alone(arch):
    """Each row's tree gathers its own prefix and path; rows of other lengths and tree sizes (drafts) around
    it change nothing."""
    model = _model(arch)
    m = MedusaModel(model, random_heads(), tree="cpu_small", lookup=4)
    prompts = [_prompt(seed, n)[0] for seed, n in ((0, 5), (1, 17), (2, 9))]
    out = m.generate(prompts, max_new_tokens=[30, 12, 24])
    for p, n, o in zip(prompts, (30, 12, 24), out):
        ref = model.generate(p[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert torch.equal(o, ref[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_exactness_is_checked_on_this_machines_kernels(dtype, monkeypatch):
    """The check at load sees the kernels' row property: keys as the product's rows pass here; queries as its
    rows (q kᵀ, as eager attention writes it) give a tree node other bits than a one-token step."""
    model = _model("llama").to(dtype)
    assert tree_attention.attention_exact(model, 12)

    def queries_as_rows(q, k, v, scaling, mask=None, pad=None):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        if pad is not None:
            scores = scores.masked_fill(pad, float("-inf"))
        return torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype), v)

    monkeypatch.setattr(tree_attention, "_attend_rows", queries_as_rows)
    assert not tree_attention.attention_exact(model, 12)


@pytest.mark.parametrize("length", [5, 63, 64, 100])
def test_a_padded_row_read_from_the_caches_own_memory_equals_zeros_appended(length):
    """A one-token step over a BatchCache row reads its filler keys from the row's memory past the length
    (earlier, rejected entries: any finite values) instead of copying the row; blocked, they change no bit."""
    gen = torch.Generator().manual_seed(0)
    width = tree_attention.padded(length + 1)
    keys, values = torch.randn(2, 2, 3, width, 16, generator=gen)         # 2 slots, 3 kv heads, stale past length
    query = torch.randn(1, 6, 1, 16, generator=gen)
    key, value = keys[1:2, :, :length], values[1:2, :, :length]
    assert tree_attention._room(key, tree_attention.padded(length))
    assert length % 64 == 0 or not tree_attention._room(key.contiguous(), tree_attention.padded(length))
    module = torch.nn.Module().eval()
    ours, _ = tree_attention.tree_attention(module, query, key, value, None, 0.25)
    copied, _ = tree_attention.tree_attention(module, query, key.contiguous(), value.contiguous(), None, 0.25)
    assert torch.equal(ours, copied)


@pytest.mark.parametrize("length", [198, 205])
@pytest.mark.parametrize("chunk", [64, 128])
def test_a_prompt_prefilled_in_chunks_gets_the_bits_of_one_prefilled_at_once(length, chunk):
    """A long prompt joining a running batch is prefilled a chunk per step; with 4-bit products its logits and
    cache entries equal, bit for bit, those of the prompt prefilled in one forward (as alone, or `generate`).
    (Attention over the whole prompt's shapes gave these two prompts other bits in chunks of 64 on Zen 4.)"""
    model = _model("llama")
    assert quantize_linears(model) > 0
    m = MedusaModel(model, random_heads())
    ids = torch.randint(3, 90, (length,), generator=torch.Generator().manual_seed(length))
    with torch.inference_mode():
        whole = BatchCache.for_model(model, capacity=length)
        whole.add()
        logits, hidden = m.engine.verifier.prefill(ids, whole)
        parts = BatchCache.for_model(model, capacity=length)
        parts.add()
        for start in range(0, length, chunk):
            part_logits, part_hidden = m.engine.verifier.prefill(ids[start:start + chunk], parts, start=start)
    assert torch.equal(part_logits, logits) and torch.equal(part_hidden, hidden)
    for a, b in zip(whole.layers, parts.layers):
        assert torch.equal(a.keys[0, :, :length], b.keys[0, :, :length])
        assert torch.equal(a.values[0, :, :length], b.values[0, :, :length])


def test_a_long_prompt_joining_a_batch_in_chunks_decodes_as_alone():
    """Through the batch: a 180-token prompt joins a running row with prefill_chunk=50 (whole prefill blocks:
    64 under medusa_tree), and both rows' greedy tokens equal generate's for each prompt alone."""
    from medusa.inference.decode import Batch

    model = _model("llama")
    assert quantize_linears(model) > 0
    m = MedusaModel(model, random_heads(), tree="cpu_small")
    short, long = _prompt(8, 6)[0], _prompt(9, 180)[0]
    reqs, _ = m.requests([short, long], max_new_tokens=[40, 30])
    batch = Batch(m.engine, slots=2, capacity=64, prefill_chunk=50)
    assert batch.prefill_chunk == 64
    out = {0: [], 1: []}
    batch.add(reqs[0])
    for s in batch.step():
        out[s.row] += s.tokens.tolist()
    assert batch.add(reqs[1]) is None                  # waits for its chunks
    while batch.busy:
        for s in batch.step():
            out[s.row] += s.tokens.tolist()
    for prompt, n, row in ((short, 40, 0), (long, 30, 1)):
        ref = model.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out[row] == ref[0, prompt.numel():].tolist(), f"row {row}"
