"""MKL-packed fp32 weights for tree steps: same products (to rounding), same decoding, same parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference import packed_linear
from medusa.inference.packed_linear import MIN_ROWS, PACK_SIZES, PackedLinear, pack_linears

PACK_ROWS = PACK_SIZES[-1]

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="torch built without MKL")


@torch.inference_mode()
@pytest.mark.parametrize("sizes,min_rows", [(PACK_SIZES, MIN_ROWS), ((4, 8, 16), 3)])
def test_packed_products_match_the_stock_ones(sizes, min_rows):
    torch.manual_seed(0)
    lin = nn.Linear(96, 200)
    ref = nn.Linear(96, 200)
    ref.load_state_dict(lin.state_dict())
    assert pack_linears(lin, sizes, min_rows) == 1 and isinstance(lin, PackedLinear)
    assert {n for n, _ in lin.named_buffers()} == {f"packed_{n}" for n in sizes}
    for rows in range(1, max(sizes) + 5):
        x = torch.randn(2, rows, 96)[:1]                     # a (1, rows, in) slice, as tree steps pass
        out, want = lin(x), ref(x)
        assert out.shape == want.shape == (1, rows, 200)
        if min_rows <= rows <= max(sizes):
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(out, want), rows                 # the stock product, bit for bit


def test_packing_keeps_parameters_ties_and_state_dict():
    model = tiny_model("llama")
    model.tie_weights()
    keys = set(model.state_dict())
    before = {n: p for n, p in model.named_parameters()}
    n = pack_linears(model)
    assert n == sum(isinstance(m, nn.Linear) for m in model.modules()) > 0
    assert set(model.state_dict()) == keys                       # the packed copies are not saved
    assert all(p is before[k] for k, p in model.named_parameters())
    assert pack_linears(model) == 0                              # already packed


def test_greedy_with_packed_weights_equals_generate():
    model = tiny_model("qwen2")
    pack_linears(model)
    m = MedusaModel(model, random_heads(), tree="cpu_small")     # 15 nodes: tree steps use the packed copies
    for seed in range(2):
        ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(seed))
        ref = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
        assert torch.equal(m.generate(ids, max_new_tokens=40), ref)


def test_training_bypasses_the_packed_copy():
    lin = nn.Linear(8, 4)
    pack_linears(lin)
    x = torch.randn(PACK_ROWS, 8)
    lin(x).sum().backward()                                      # stock product: gradients flow
    assert lin.weight.grad is not None
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(4, 8))
    assert torch.equal(lin(x).detach(), F.linear(x, lin.weight, lin.bias).detach())


def test_fitting_takes_as_many_copies_as_the_budget_holds():
    lin = nn.Linear(8, 4)                                        # 128 bytes of fp32 weight
    one = 8 * 4 * 4
    assert packed_linear.fitting(lin, one * len(PACK_SIZES)) == (PACK_SIZES, MIN_ROWS)
    assert packed_linear.fitting(lin, one * len(PACK_SIZES) - 1) == packed_linear.LEAN
    assert packed_linear.fitting(lin, one - 1) is None
