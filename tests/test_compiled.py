"""torch.compile'd decoding (compile=True): same tokens as `generate`, and warm_up compiles every graph."""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from conftest import random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference import packed_linear


def test_compiled_greedy_equals_generate_and_warm_up_covers_every_graph():
    torch._dynamo.reset()
    model = tiny_model("llama")
    packed_linear.pack_linears(model)            # PackedLinear must step aside under compilation
    m = MedusaModel(model, random_heads(), tree="cpu_small", compile=True)
    assert m.is_compiled and not any(mod is m._compiled[0] for mod in m.modules())
    before = counters["stats"]["unique_graphs"]
    assert m.warm_up() > 0
    compiled_graphs = counters["stats"]["unique_graphs"] - before
    assert compiled_graphs >= 3                  # the prompt, tree steps, one-token steps
    for seed in range(3):
        ids = torch.randint(3, 90, (1, 10 + 9 * seed), generator=torch.Generator().manual_seed(seed))
        ref = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
        assert torch.equal(m.generate(ids, max_new_tokens=40), ref)
        assert torch.equal(m.generate(ids, max_new_tokens=40, tree="root", lookup=0), ref)
        assert torch.equal(m.generate(ids, max_new_tokens=40, lookup=0), ref)
    # nothing left to compile after the warm-up: new prompt lengths, tree sizes and drafts reuse its graphs
    assert counters["stats"]["unique_graphs"] - before == compiled_graphs
