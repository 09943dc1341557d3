"""Context drafts (prompt lookup as one more tree branch): the index drafts what followed the context's
suffix; the tree with drafts has the right shape; decoding with drafts stays exactly greedy and lossless."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference.lookup import DEFAULT, ContextIndex, LookupOptions, with_max_tokens
from medusa.inference.packed_linear import pack_linears, padded_rows
from medusa.inference.tree import PRESETS, tree_buffers, with_drafts


def _index(tokens, max_tokens=5, max_ngram=3, min_ngram=1):
    return ContextIndex(tokens, LookupOptions(max_tokens=max_tokens, max_ngram=max_ngram, min_ngram=min_ngram))


def test_draft_copies_what_followed_the_latest_occurrence():
    idx = _index([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 6, 0, 2], min_ngram=2)
    assert idx.draft(3) == [7, 8, 6, 6, 0]         # "2 3" last seen before "7 8 ..." (not "4 5")
    assert idx.draft(3, limit=2) == [7, 8]
    assert idx.draft(4) == []                       # "2 4" never occurred
    assert _index([1, 2, 3, 4, 5], min_ngram=2).draft(9) == []


def test_longer_ngrams_win_over_shorter_ones():
    #            "5 1" -> 7        "8 5 1" -> 3           "5 1" -> 4 (latest)  context ends "... 8 5", root 1
    idx = _index([5, 1, 7, 0, 8, 5, 1, 3, 0, 9, 5, 1, 4, 0, 8, 5])
    assert idx.draft(1)[:1] == [3]
    assert _index([5, 1, 7, 0, 8, 5, 1, 3, 0, 9, 5, 1, 4, 0, 8, 5], max_ngram=2).draft(1)[:1] == [4]
    assert _index([2, 6, 2, 7], min_ngram=1).draft(2) == [7, 2, 7, 2, 7]   # one-token match, copied on


def test_a_repeating_span_is_drafted_in_full():
    """A copy running past the end continues into the root and the draft (period-3 loop)."""
    idx = _index([9, 4, 5, 6, 4, 5, 6, 4, 5], max_tokens=7, min_ngram=2)
    assert idx.draft(6) == [4, 5, 6, 4, 5, 6, 4]


def test_growing_the_index_equals_building_it_at_once():
    seq = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    grown = _index(seq[:10])
    for i in range(10, 300, 7):
        grown.extend(seq[i:i + 7])
    whole = _index(seq)
    assert grown.tokens == whole.tokens and grown.follows == whole.follows
    assert all(grown.draft(r) == whole.draft(r) for r in range(6))


def test_draft_length_follows_the_strength_of_the_match():
    """max_tokens after a match of long_match+ tokens, short_tokens after a shorter one; `fill` lengthens the
    draft (rows the step pays for anyway) and `limit` (room in the cache) caps it."""
    opts = LookupOptions(max_tokens=6, short_tokens=2, long_match=4, max_ngram=3, min_ngram=2)
    #        "1 2 3" agrees 3 tokens back only ("0" vs "5" before it), so the draft is short
    weak = ContextIndex([0, 1, 2, 3, 7, 8, 9, 4, 6, 5, 1, 2], opts)
    assert weak.draft(3) == [7, 8]
    #        "0 1 2 3" agrees 4 tokens back: the long draft
    strong = ContextIndex([0, 1, 2, 3, 7, 8, 9, 4, 6, 5, 0, 1, 2], opts)
    assert strong.draft(3) == [7, 8, 9, 4, 6, 5]
    assert weak.draft(3, fill=lambda n: n + 3) == [7, 8, 9, 4, 6]
    assert strong.draft(3, limit=4, fill=lambda n: n + 3) == [7, 8, 9, 4]
    assert ContextIndex([0, 1, 2, 3, 7, 8, 5, 1, 2], opts).draft(3, fill=lambda n: 16) == [7, 8, 5, 1, 2, 3, 7, 8, 5, 1, 2, 3, 7, 8, 5, 1]
    plain = LookupOptions(max_tokens=6)             # no short_tokens: every match drafts max_tokens
    assert ContextIndex([0, 1, 2, 3, 7, 8, 9, 4, 6, 5, 1, 2], plain).draft(3) == [7, 8, 9, 4, 6, 5]


def test_an_int_lookup_keeps_the_default_policy():
    assert with_max_tokens(10) == DEFAULT and DEFAULT.short_tokens < DEFAULT.max_tokens
    assert with_max_tokens(1).short_tokens == 1 and not with_max_tokens(0).enabled
    assert MedusaModel(tiny_model("llama"), random_heads(), lookup=7).lookup == with_max_tokens(7)


def test_lookup_is_an_int_or_lookup_options():
    from medusa.inference.lookup import as_lookup

    assert as_lookup(None) == DEFAULT and as_lookup(None, with_max_tokens(3)) == with_max_tokens(3)
    assert as_lookup(7) == with_max_tokens(7) and not as_lookup(0).enabled
    opts = LookupOptions(max_tokens=4, min_ngram=1)
    assert as_lookup(opts) is opts
    for wrong in (True, "5", 2.5):
        with pytest.raises(TypeError, match="lookup is an int"):
            as_lookup(wrong)
    m = MedusaModel(tiny_model("llama"), random_heads(), lookup=opts)
    assert m.lookup is opts and m.requests([5, 6, 7], lookup=3)[0][0].lookup == with_max_tokens(3)
    assert m.requests([5, 6, 7])[0][0].lookup is opts                   # None: the model's own


def test_cli_lookup_options():
    from medusa.interfaces.cli_args import LoadOptions

    opts = lambda **kw: LoadOptions(**kw).lookup_options()
    assert opts() is None and opts(lookup=5) == 5                   # the model's default policy
    assert opts(lookup=10, lookup_short=10) == LookupOptions(max_tokens=10, short_tokens=10)
    assert opts(lookup_short=0) == LookupOptions(max_tokens=DEFAULT.max_tokens, short_tokens=0,
                                                 long_match=DEFAULT.long_match)
    with pytest.raises(ValueError, match="short draft"):
        opts(lookup=3, lookup_short=5)


def test_padded_rows_rounds_up_to_the_packed_row_counts():
    model = tiny_model("llama")
    assert padded_rows(model) is None                              # nothing packed: a row costs a row
    if not pack_linears(model, (4, 8, 16), 4):
        pytest.skip("no MKL packed products in this torch build")
    pad = padded_rows(model)
    assert [pad(n) for n in (1, 3, 4, 5, 8, 9, 16, 17, 40)] == [1, 3, 4, 8, 8, 16, 16, 17, 40]


@pytest.mark.parametrize("options, message", [
    (dict(max_tokens=-1), "draft length"), (dict(max_tokens=3, short_tokens=4), "short draft"), (dict(min_ngram=0), "n-gram"), (dict(min_ngram=4, max_ngram=3), "n-gram"),
])
def test_bad_lookup_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LookupOptions(**options)


@pytest.mark.parametrize("paths", [PRESETS["cpu_small"], PRESETS["root"], [(0,), (1,)], PRESETS["mc_sim_7b_63"]])
def test_tree_with_drafts_adds_one_chain_under_the_root(paths):
    heads_tree = tree_buffers(paths)
    n, d = heads_tree.num_nodes, 6
    t = with_drafts(heads_tree, d)
    assert t.num_nodes == n + d and t.head_nodes == n and t.drafted == d
    assert t.max_depth == heads_tree.max_depth                     # the heads that run are unchanged
    assert torch.equal(t.attn_mask[:n, :n], heads_tree.attn_mask) and not t.attn_mask[:n, n:].any()
    for k in range(d):                                             # chain node k sees the root and chain 0..k
        assert t.attn_mask[n + k].nonzero().flatten().tolist() == [0, *range(n, n + k + 1)]
        assert t.depth[n + k] == k + 1 and t.parent[n + k] == (0 if k == 0 else n + k - 1)
    assert t.retrieve[-1].tolist() == [0, *range(n, n + d)]
    assert torch.equal(t.retrieve[:-1, : heads_tree.retrieve.shape[1]], heads_tree.retrieve)
    assert t.children[0] == heads_tree.children[0] + (n,)          # tried after the heads' guesses
    assert with_drafts(heads_tree, 0) is heads_tree
    with pytest.raises(ValueError):
        with_drafts(t, 2)


def _looping(arch):
    """Tiny weights: greedy output falls into a loop at once, which context drafts predict."""
    return tiny_model(arch, initializer_range=0.02)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_drafts_equals_generate_and_accepts_drafts(arch):
    for model in (tiny_model(arch), _looping(arch)):
        m = MedusaModel(model, random_heads(), tree="cpu_small", lookup=8)
        ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(1))
        ref = model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False, pad_token_id=0)
        steps = list(m.stream(ids, max_new_tokens=60))
        assert torch.equal(torch.cat([ids[0], *[s.tokens for s in steps]]), ref[0]), arch
    head_nodes = tree_buffers(PRESETS["cpu_small"]).num_nodes
    drafted = [s for s in steps if s.tree_size > head_nodes]
    assert drafted and any(max(s.nodes) >= head_nodes and s.accepted >= 5 for s in drafted)
    off = list(MedusaModel(model, random_heads(), tree="cpu_small", lookup=0).stream(ids, max_new_tokens=60))
    assert len(steps) < len(off) and all(s.tree_size == head_nodes for s in off[:-1])


def test_drafts_fill_the_packed_rows_and_greedy_stays_exact():
    """With packed weights a step's rows are padded up to 4, 8 or 16 anyway: drafts take those rows."""
    model = _looping("llama")
    if not pack_linears(model, (4, 8, 16), 4):
        pytest.skip("no MKL packed products in this torch build")
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False, pad_token_id=0)
    m = MedusaModel(model, random_heads(), tree=[(0,), (0, 0)], lookup=LookupOptions(4, short_tokens=1))
    steps = list(m.stream(ids, max_new_tokens=60))
    assert torch.equal(torch.cat([ids[0], *[s.tokens for s in steps]]), ref[0])
    sizes = {s.tree_size for s in steps[:-1]}
    assert sizes <= {3, 4, 8} and 8 in sizes                      # 3 + 4 drafts -> 8 rows; 3 + 1 -> 4


def test_drafts_alone_on_a_root_only_tree():
    model = _looping("llama")
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    m = MedusaModel(model, random_heads(), tree="root", lookup=6)
    steps = list(m.stream(ids, max_new_tokens=40))
    assert torch.equal(torch.cat([ids[0], *[s.tokens for s in steps]]), ref[0])
    assert len(steps) < 40 * 0.6                   # without drafts: 40 steps

