"""The decode loop: tree verification is exact, cache compaction is exact, greedy equals plain greedy."""
from __future__ import annotations

import pytest
import torch

from conftest import HIDDEN, VOCAB, OracleHeads, parent_heads_ignoring_parent, random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference.cache import BatchCache
from medusa.inference.decode import PromptTooLongError
from medusa.inference.tree import PRESETS, tree_buffers, with_drafts


def _prompt(seed=0, n=12):
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("drafted", [0, 5])
def test_tree_forward_equals_each_path_alone(arch, attn, drafted):
    if arch == "gemma2" and attn == "sdpa":
        pytest.skip("Gemma-2 has no sdpa attention (logit soft-capping)")
    model = tiny_model(arch, attn=attn)
    prompt = _prompt(1)
    tree = with_drafts(tree_buffers(PRESETS["cpu_small"]), drafted)
    n = tree.num_nodes
    tokens = torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(2))
    cache = BatchCache.for_model(model, capacity=64)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        L = prompt.shape[1]
        dtype = model.dtype
        mask = torch.full((1, 1, n, L + n), torch.finfo(dtype).min)
        mask[..., :L] = 0
        mask[0, 0, :, L:] = torch.where(tree.attn_mask, 0.0, torch.finfo(dtype).min)
        tree_logits = model(tokens[None], past_key_values=cache, attention_mask=mask,
                            position_ids=(L + tree.depth)[None], use_cache=True).logits[0]
        for node in range(n):
            ancestors = [j for j in range(n) if tree.attn_mask[node, j]]        # root..node, in depth order
            seq = torch.cat([prompt[0], tokens[ancestors]])[None]
            alone = model(seq).logits[0, -1]
            torch.testing.assert_close(tree_logits[node], alone, atol=2e-4, rtol=2e-4)


def test_decoding_after_compaction_equals_no_cache(arch):
    model = tiny_model(arch)
    prompt = _prompt(3)
    tree = tree_buffers(PRESETS["cpu_small"])
    n, L = tree.num_nodes, prompt.shape[1]
    tokens = torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(4))
    cache = BatchCache.for_model(model, capacity=64)
    leaf_path = tree.retrieve[3]
    path = leaf_path[leaf_path >= 0]
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        mask = torch.full((1, 1, n, L + n), torch.finfo(model.dtype).min)
        mask[..., :L] = 0
        mask[0, 0, :, L:] = torch.where(tree.attn_mask, 0.0, torch.finfo(model.dtype).min)
        model(tokens[None], past_key_values=cache, attention_mask=mask, position_ids=(L + tree.depth)[None],
              use_cache=True)
        cache.compact(L, path)
        assert cache.get_seq_length() == L + path.numel()
        nxt = torch.tensor([[5, 17, 42]])
        pos = torch.arange(cache.get_seq_length(), cache.get_seq_length() + 3)[None]
        cached = model(nxt, past_key_values=cache, position_ids=pos, use_cache=True).logits[0]
        full = model(torch.cat([prompt[0], tokens[path], nxt[0]])[None]).logits[0, -3:]
    torch.testing.assert_close(cached, full, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "cpu_small", "chain"])
def test_greedy_equals_plain_greedy_random_heads(arch, tree):
    model = tiny_model(arch)
    m = MedusaModel(model, random_heads(), tree=tree)
    for seed in range(2):
        ids = _prompt(seed)
        ref = _hf_greedy(model, ids, 40)
        out = m.generate(ids, max_new_tokens=40)
        assert torch.equal(out, ref), f"{arch}/{tree} seed {seed}"


def test_greedy_equals_plain_greedy_next_token_heads(arch):
    """Heads that also take the root's embedding: still exactly greedy, and their guesses really use it."""
    model = tiny_model(arch)
    heads = random_heads(next_token=True)
    m = MedusaModel(model, heads, tree="cpu_small", lookup=0)
    ids = _prompt(3)
    assert torch.equal(m.generate(ids, max_new_tokens=40), _hf_greedy(model, ids, 40))
    nodes = lambda: [s.nodes for s in m.stream(ids, max_new_tokens=40)]
    before = nodes()
    with torch.no_grad():
        for h in heads.heads:
            h.token.weight.zero_()
    assert nodes() != before        # with U = 0 the root is ignored: the same decode accepts other nodes


def test_greedy_equals_plain_greedy_parent_token_heads(arch):
    """Heads whose guesses follow their parent node's token (proposed level by level; see the next test):
    still exactly greedy, with and without context drafts."""
    model = tiny_model(arch)
    ids = _prompt(4)
    for lookup in (0, 6):
        m = MedusaModel(model, random_heads(parent_token=True), tree="cpu_small", lookup=lookup)
        assert torch.equal(m.generate(ids, max_new_tokens=40), _hf_greedy(model, ids, 40))
        assert any(len(s.nodes) > 1 for s in m.stream(ids, max_new_tokens=40))


def test_parent_token_heads_propose_each_node_after_its_own_parent():
    """Every node's token is its head's rank-th guess given the hidden state, the root, and that node's parent
    token, computed here one node at a time; a draft vocabulary maps output rows to tokens."""
    from medusa.inference.draft_head import DraftProjection, Int4DraftProjection
    from medusa.inference.heads import propose

    model = tiny_model("llama")
    heads = random_heads(parent_token=True)
    tree = tree_buffers([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 3), (0, 0, 0), (1, 0, 2)])
    hidden, root, emb = torch.randn(HIDDEN), torch.tensor(7), model.get_input_embeddings()
    seen = torch.arange(5, VOCAB, 2)
    drafts = (DraftProjection(model.lm_head, seen, torch.float32), Int4DraftProjection(model.lm_head, seen, exact=4))
    for draft in (model.lm_head, *drafts):
        ids = getattr(draft, "token_ids", torch.arange(VOCAB))
        with torch.no_grad():
            tokens = propose(heads, tree, hidden, root, draft, emb)
            assert tokens.shape == (tree.num_nodes,) and int(tokens[0]) == 7
            for i in range(1, tree.num_nodes):
                d, parent = int(tree.depth[i]), int(tree.parent[i])
                par = emb(tokens[parent]) if d > 1 else None
                logits = heads.head_logits(d - 1, hidden, draft, emb(root), par)
                assert int(tokens[i]) == int(ids[logits.topk(int(tree.rank[i]) + 1).indices[-1]]), tree.paths[i - 1]
        assert len(set(tokens[tree.depth == 2].tolist())) > 2     # different parents, different guesses


def test_greedy_equals_plain_greedy_oracle_heads(arch):
    """Heads that predict well: long paths are accepted, every node of the tree is used at least once."""
    model = tiny_model(arch)
    ids = _prompt(5)
    n_new = 120
    ref = _hf_greedy(model, ids, n_new + 8)
    oracle = OracleHeads(model, ref[0], tree=PRESETS["cpu_small"])
    m = MedusaModel(model, oracle, tree="cpu_small", lookup=0)   # every node must come from the heads
    steps = list(m.stream(ids, max_new_tokens=n_new))
    out = torch.cat([ids[0], *[s.tokens for s in steps]])
    assert torch.equal(out, ref[0, : ids.shape[1] + n_new])
    assert max(s.accepted for s in steps) >= 4
    assert len(steps) < n_new / 2.5          # on average more than 2.5 tokens per step
    used = {node for s in steps for node in s.nodes}
    assert used == set(range(tree_buffers(PRESETS["cpu_small"]).num_nodes))


def test_typical_acceptance_samples_reproducibly():
    model = tiny_model("llama")
    m = MedusaModel(model, random_heads(), tree="cpu_small")
    ids = _prompt(6)
    a = m.generate(ids, max_new_tokens=30, temperature=0.8, top_p=0.9, seed=11)
    b = m.generate(ids, max_new_tokens=30, temperature=0.8, top_p=0.9, seed=11)
    c = m.generate(ids, max_new_tokens=30, temperature=0.8, top_p=0.9, seed=12)
    greedy = m.generate(ids, max_new_tokens=30)
    assert torch.equal(a, b) and a.shape == (1, ids.shape[1] + 30)
    assert not torch.equal(a, c) or not torch.equal(a, greedy)


def test_typical_acceptance_accepts_confident_candidates():
    """With oracle heads and a near-greedy temperature, typical acceptance keeps multi-token paths."""
    model = tiny_model("qwen2")
    ids = _prompt(7)
    ref = _hf_greedy(model, ids, 80)
    m = MedusaModel(model, OracleHeads(model, ref[0], tree=PRESETS["cpu_small"]), tree="cpu_small")
    steps = list(m.stream(ids, max_new_tokens=60, temperature=0.05, seed=0))
    assert sum(s.accepted for s in steps) == 60
    assert max(s.accepted for s in steps) >= 3


def test_eos_and_max_new_tokens_stop_like_generate():
    model = tiny_model("llama")
    ids = _prompt(8)
    ref = _hf_greedy(model, ids, 30)
    eos = int(ref[0, ids.shape[1] + 9])                 # the 10th generated token acts as EOS
    m = MedusaModel(model, random_heads(), tree="chain")
    out = m.generate(ids, max_new_tokens=30, eos_token_id=eos)
    hf = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, hf)
    assert torch.equal(m.generate_baseline(ids, max_new_tokens=30, eos_token_id=eos), hf)
    steps = list(m.stream(ids, max_new_tokens=7))
    assert sum(s.accepted for s in steps) == 7 and steps[-1].finish_reason == "length"


class _CharTokenizer:
    eos_token_id = None

    def decode(self, ids, **_):
        return "".join(chr(65 + (i % 26)) for i in ids)


def test_stop_strings_trim_after_the_completing_token():
    model = tiny_model("llama")
    ids = _prompt(9)
    m = MedusaModel(model, random_heads(), _CharTokenizer(), tree="chain")
    full = m.generate(ids, max_new_tokens=30)[0, ids.shape[1]:].tolist()
    text = _CharTokenizer().decode(full)
    stop = text[12:14]
    first = text.find(stop)
    out = m.generate(ids, max_new_tokens=30, stop=[stop])[0, ids.shape[1]:].tolist()
    assert out == full[: first + 2]


def test_context_limit_stops_and_long_prompt_is_refused():
    model = tiny_model("llama")                        # max_position_embeddings = 256
    m = MedusaModel(model, random_heads())
    ids = torch.randint(3, 90, (1, 240))
    steps = list(m.stream(ids, max_new_tokens=100))
    assert steps[-1].finish_reason == "context"
    assert ids.shape[1] + sum(s.accepted for s in steps) == 256
    out = torch.cat([ids[0], *[s.tokens for s in steps]])
    assert torch.equal(out[None], _hf_greedy(model, ids, 16))
    with pytest.raises(PromptTooLongError, match="300 tokens .* context is 256"):
        m.generate(torch.randint(3, 90, (1, 300)))


def test_a_tokenizers_batch_encoding_is_taken_with_its_padding():
    m = MedusaModel(tiny_model("llama"), random_heads())
    ids = torch.tensor([[0, 7, 8, 9], [4, 5, 6, 7]])
    out = m.generate({"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])},
                     max_new_tokens=5)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids)
    assert torch.equal(out[0, 4:], m.generate(ids[0, 1:], max_new_tokens=5)[0, 3:])


def test_no_state_left_on_model_between_calls():
    model = tiny_model("llama")
    m = MedusaModel(model, random_heads(), tree="cpu_small")
    before = set(vars(m)) | set(vars(model))
    a, b = _prompt(10), _prompt(11)
    ref_b = m.generate(b, max_new_tokens=20)
    gen_a = m.stream(a, max_new_tokens=20)
    next(gen_a)                                         # a request in flight...
    assert torch.equal(m.generate(b, max_new_tokens=20), ref_b)   # ...does not disturb another
    assert set(vars(m)) | set(vars(model)) == before



def test_cpu_guesses_come_from_4_bit_draft_rows_rescored(monkeypatch):
    """An fp32 base on a CPU (a quantized one: test_quantized.py): the heads guess through 4-bit codes of the
    lm_head's rows, each guess's best rescored from bf16 rows; bf16 rows alone without torch's int4 kernel; a
    bf16 base, and heads with their own projections, through the lm_head itself."""
    from medusa.inference import draft_head
    from medusa.inference.draft_head import DraftProjection, Int4DraftProjection, draft_projection

    model = tiny_model("llama")
    lm_head = model.get_output_embeddings()
    m = MedusaModel(model, random_heads())
    assert isinstance(m.draft_head, Int4DraftProjection) and m.draft_head.rows.dtype == torch.bfloat16
    torch.testing.assert_close(m.draft_head.rows.float(), lm_head.weight, atol=1e-2, rtol=1e-2)
    hidden = torch.randn(50, lm_head.in_features)
    agree = (m.heads(hidden, m.draft_head).argmax(-1) == m.heads(hidden, lm_head).argmax(-1)).float().mean()
    assert agree > 0.95
    assert draft_projection(lm_head, random_heads(shared=False)) is lm_head      # own projections: untouched
    monkeypatch.setattr(draft_head, "available", lambda: False)
    assert type(draft_projection(lm_head, random_heads())) is DraftProjection
    monkeypatch.undo()
    assert MedusaModel(model.to(torch.bfloat16), random_heads()).draft_head is lm_head


def _draft_vocab_heads(seen):
    from medusa.inference.heads import set_draft_vocab

    heads = random_heads()
    counts = torch.zeros(VOCAB, dtype=torch.long)
    counts[seen] = 5
    set_draft_vocab(heads, counts)
    return heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draft_vocabulary_guesses_are_the_best_seen_tokens(dtype):
    """Heads trained on some tokens guess only among them: the same top-k as the full product with the other
    tokens masked out, read from only their rows (4-bit codes and bf16 rows of them for an fp32 CPU base)."""
    from medusa.inference.draft_head import DraftProjection
    from medusa.inference.heads import guess

    seen = torch.arange(3, VOCAB, 2)                  # odd tokens: a guess left unmapped would show as even
    heads = _draft_vocab_heads(seen)
    model = tiny_model("llama").to(dtype)
    m = MedusaModel(model, heads)
    assert m.draft_head.out_features == seen.numel() == heads.config.draft_vocab_size
    hidden = torch.randn(50, HIDDEN, dtype=dtype)
    got = guess(heads, hidden, m.draft_head, 5)                                       # (K, 50, 5)
    full = heads(hidden, DraftProjection(model.get_output_embeddings(), None, torch.bfloat16))
    masked = torch.full_like(full, float("-inf"))
    masked[..., seen] = full[..., seen]
    best = masked.topk(5, dim=-1)
    assert torch.isin(got, seen).all()
    assert (got == best.indices).float().mean() > 0.95          # bf16 rounding may swap near-ties
    torch.testing.assert_close(full.gather(-1, got).float(), best.values.float(), atol=0.05, rtol=0)


def test_greedy_equals_plain_greedy_with_a_draft_vocabulary(arch):
    model = tiny_model(arch)
    m = MedusaModel(model, _draft_vocab_heads(torch.arange(3, 40)), tree="cpu_small", lookup=0)
    for seed in range(2):
        ids = _prompt(seed)
        assert torch.equal(m.generate(ids, max_new_tokens=40), _hf_greedy(model, ids, 40))


def test_a_small_draft_vocabulary_is_filled_up_to_any_trees_ranks():
    from medusa.inference.heads import MIN_DRAFT_VOCAB

    heads = _draft_vocab_heads(torch.tensor([5, 9]))
    assert heads.config.draft_vocab_size == MIN_DRAFT_VOCAB and {5, 9} <= set(heads.draft_vocab.tolist())
    everything = random_heads()
    from medusa.inference.heads import set_draft_vocab
    set_draft_vocab(everything, torch.ones(VOCAB))    # every token seen: nothing to restrict
    assert everything.config.draft_vocab_size == 0 and not hasattr(everything, "draft_vocab")


def test_only_the_heads_a_tree_reaches_are_run():
    heads, lm_head = random_heads(), tiny_model("llama").get_output_embeddings()
    hidden = torch.randn(3, lm_head.in_features)
    full = heads(hidden, lm_head)
    torch.testing.assert_close(heads(hidden, lm_head, upto=2), full[:2], rtol=1e-5, atol=1e-5)  # other shapes: rounding
    assert tree_buffers(PRESETS["cpu_small"]).max_depth == 4 and tree_buffers([(0,), (1,)]).max_depth == 1


@pytest.mark.parametrize("lookup", [0, 6])
def test_greedy_equals_plain_greedy_dynamic_tree(arch, lookup):
    """A tree chosen each step from the heads' probabilities: still exactly greedy, with and without context
    drafts, and its shape really changes from step to step."""
    model = tiny_model(arch)
    for heads in (random_heads(), random_heads(next_token=True), random_heads(parent_token=True)):
        m = MedusaModel(model, heads, tree="dynamic:6", lookup=lookup)
        ids = _prompt(6)
        assert torch.equal(m.generate(ids, max_new_tokens=40), _hf_greedy(model, ids, 40))
        assert {s.tree_size for s in m.stream(ids, max_new_tokens=40, lookup=0)} <= {0, 6}


def test_dynamic_tree_follows_the_heads():
    """Each step's paths are the most probable under the heads' softmax (computed here directly) and each
    node's token its head's rank-th guess."""
    from medusa.inference.dynamic import propose_dynamic
    from medusa.inference.draft_head import DraftProjection
    from medusa.inference.tree import DynamicTree, most_likely_paths

    model = tiny_model("llama")
    heads = random_heads(next_token=True)
    hidden, root, emb = torch.randn(HIDDEN), torch.tensor(7), model.get_input_embeddings()
    draft = DraftProjection(model.lm_head, torch.arange(5, VOCAB, 2), torch.float32)
    shapes = set()
    for seed in range(6):
        hidden = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * 4
        with torch.no_grad():
            paths, pick = propose_dynamic(heads, DynamicTree(8), hidden, root, draft, emb)
            probs = heads(hidden, draft, next_embeds=emb(root)).softmax(-1)        # (K, V')
            assert list(paths) == most_likely_paths(probs.sort(descending=True).values[:, :10], 8)
            t = tree_buffers(list(paths))
            tokens = pick(t)
            for i in range(1, t.num_nodes):
                d, r = int(t.head[i]), int(t.rank[i])
                assert int(tokens[i]) == int(draft.token_ids[probs[d].topk(r + 1).indices[-1]])
        shapes.add(paths)
    assert len(shapes) > 1


def _all_paths(heads, hidden, root, draft, emb, depth: int, k: int) -> dict:
    """Brute force for parent-token heads: every path of up to `depth` ranks below k -> (its probability, its
    token), each node's guesses computed after its own parent's token, one node at a time."""
    out, ids = {(): (1.0, root)}, getattr(draft, "token_ids", torch.arange(VOCAB))
    for d in range(depth):
        for path in [p for p in list(out) if len(p) == d]:
            p, tok = out[path]
            par = emb(tok) if d > 0 else None
            probs = heads.head_logits(d, hidden, draft, emb(root), par).softmax(-1)
            top = probs.topk(k)
            for r in range(k):
                out[path + (r,)] = (p * float(top.values[r]), ids[top.indices[r]])
    del out[()]
    return out


@pytest.mark.parametrize("nodes", [3, 6, 12])
def test_dynamic_tree_of_parent_token_heads_is_the_most_probable_by_brute_force(nodes):
    """Heads whose guesses follow their parent's token: the tree grown level by level holds the `nodes - 1`
    paths of highest probability among all paths (each node's children computed after its own token), and
    each node's token is its head's rank-th guess after its parent."""
    from medusa.inference.dynamic import propose_dynamic
    from medusa.inference.draft_head import DraftProjection
    from medusa.inference.tree import DynamicTree

    model = tiny_model("llama")
    heads = random_heads(num_heads=3, parent_token=True)
    root, emb = torch.tensor(7), model.get_input_embeddings()
    shapes = set()
    for draft in (model.lm_head, DraftProjection(model.lm_head, torch.arange(5, VOCAB, 2), torch.float32)):
        for seed in range(4):
            hidden = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * 4
            with torch.no_grad():
                paths, pick = propose_dynamic(heads, DynamicTree(nodes, topk=4), hidden, root, draft, emb)
                every = _all_paths(heads, hidden, root, draft, emb, depth=min(3, nodes - 1), k=4)
            best = sorted(every, key=lambda p: -every[p][0])[: nodes - 1]
            assert set(paths) == set(best)
            t = tree_buffers(list(paths))
            tokens = pick(t)
            assert [int(x) for x in tokens[1:]] == [int(every[p][1]) for p in t.paths]
            shapes.add(paths)
    assert len(shapes) > 1 or nodes == 3     # 3 nodes: these confident heads always pick the chain


def test_dynamic_tree_of_parent_token_heads_that_ignore_the_parent_is_the_plain_one():
    """With the parent's weights at zero, parent-token heads guess as heads without them: the tree grown level
    by level is the one built from all heads' probabilities at once."""
    from medusa.inference.dynamic import propose_dynamic
    from medusa.inference.tree import DynamicTree

    model = tiny_model("llama")
    heads, plain = parent_heads_ignoring_parent()
    emb = model.get_input_embeddings()
    for seed in range(4):
        hidden = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * 4
        with torch.no_grad():
            grown, pick = propose_dynamic(heads, DynamicTree(10), hidden, torch.tensor(9), model.lm_head, emb)
            flat, pick_flat = propose_dynamic(plain, DynamicTree(10), hidden, torch.tensor(9), model.lm_head, emb)
        t = tree_buffers(list(flat))
        assert set(grown) == set(flat) and torch.equal(pick(t), pick_flat(t))
