"""Packed fp32 weights (oneDNN, MKL) for the decode loop: same products (to rounding) inside `engaged()`, the
stock product bit for bit outside it, same decoding, same parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference import packed_linear
from medusa.inference.packed_linear import MIN_ROWS, PACK_SIZES, OneDNNLinear, PackedLinear, engaged, pack_linears

PACK_ROWS = PACK_SIZES[-1]
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not packed_linear.available(b), reason=f"torch without {b}"))
            for b in packed_linear.BACKENDS]


@torch.inference_mode()
@pytest.mark.parametrize("backend,sizes,min_rows", [("mkl", PACK_SIZES, MIN_ROWS), ("mkl", (4, 8, 16), 3),
                                                    ("onednn", None, None)])
def test_packed_products_match_the_stock_ones(backend, sizes, min_rows):
    if not packed_linear.available(backend):
        pytest.skip(f"torch without {backend}")
    torch.manual_seed(0)
    lin = nn.Linear(96, 200)
    ref = nn.Linear(96, 200)
    ref.load_state_dict(lin.state_dict())
    assert pack_linears(lin, sizes, min_rows, backend=backend) == 1
    assert isinstance(lin, OneDNNLinear if backend == "onednn" else PackedLinear)
    buffers = {"packed_onednn"} if backend == "onednn" else {f"packed_{n}" for n in sizes}
    assert {n for n, _ in lin.named_buffers()} == buffers
    packed_rows = range(1, 10**9) if backend == "onednn" else range(min_rows, max(sizes) + 1)
    differs = 0
    for rows in [*range(0, max(sizes or PACK_SIZES) + 5), 70]:
        x = torch.randn(2, rows, 96)[:1]                     # a (1, rows, in) slice, as tree steps pass
        want = ref(x)
        assert torch.equal(lin(x), want), rows                 # outside engaged(): the stock product, bit for bit
        with engaged():
            out = lin(x)
        assert out.shape == want.shape == (1, rows, 200)
        if rows in packed_rows:
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
            differs += not torch.equal(out, want)
        else:
            assert torch.equal(out, want), rows
    assert differs > 0                                           # the packed product really ran (other rounding)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packing_keeps_parameters_ties_and_state_dict(backend):
    model = tiny_model("llama")
    model.tie_weights()
    keys = set(model.state_dict())
    before = {n: p for n, p in model.named_parameters()}
    n = pack_linears(model, backend=backend)
    assert n == sum(isinstance(m, nn.Linear) for m in model.modules()) > 0
    assert set(model.state_dict()) == keys                       # the packed copies are not saved
    assert all(p is before[k] for k, p in model.named_parameters())
    assert pack_linears(model, backend=backend) == 0            # already packed


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_with_packed_weights_equals_generate(backend):
    model = tiny_model("qwen2")
    stock = tiny_model("qwen2")
    stock.load_state_dict(model.state_dict())
    pack_linears(model, backend=backend)
    m = MedusaModel(model, random_heads(), tree="cpu_small")     # 15 nodes: tree steps use the packed copies
    for seed in range(2):
        ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(seed))
        ref = stock.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
        # generate on the packed model itself is the stock model's, bit for bit: its logits too
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        want = stock.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, want.logits))
        assert torch.equal(m.generate(ids, max_new_tokens=40), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_bypasses_the_packed_copy(backend):
    lin = nn.Linear(8, 4)
    pack_linears(lin, backend=backend)
    x = torch.randn(PACK_ROWS, 8)
    with engaged():
        y = lin(x)
    y.sum().backward()                                           # stock product: gradients flow
    assert lin.weight.grad is not None
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(4, 8))
    assert torch.equal(y.detach(), F.linear(x, lin.weight, lin.bias).detach())


def test_an_unknown_or_missing_packing_is_refused():
    with pytest.raises(ValueError, match="unknown weight packing 'blas'"):
        packed_linear.available("blas")
    with pytest.raises(ValueError, match="unknown weight packing"):
        packed_linear.pack_for_inference(tiny_model("llama"), "blas", print)   # from_pretrained(pack_weights="blas")


def test_fitting_takes_as_many_copies_as_the_budget_holds():
    lin = nn.Linear(8, 4)                                        # 128 bytes of fp32 weight
    one = 8 * 4 * 4
    assert packed_linear.fitting(lin, one * len(PACK_SIZES), "mkl") == {"sizes": PACK_SIZES, "min_rows": MIN_ROWS}
    lean = packed_linear.fitting(lin, one * len(PACK_SIZES) - 1, "mkl")
    assert (lean["sizes"], lean["min_rows"]) == packed_linear.LEAN
    assert packed_linear.fitting(lin, one - 1, "mkl") is None
    assert packed_linear.fitting(lin, one, "onednn") == {}
    assert packed_linear.fitting(lin, one - 1, "onednn") is None


def test_onednn_refuses_mkl_row_counts():
    if not packed_linear.available("onednn"):
        pytest.skip("torch without onednn")
    with pytest.raises(ValueError, match="sizes and min_rows are MKL's"):
        pack_linears(nn.Linear(8, 4), PACK_SIZES, backend="onednn")


def test_pack_weights_is_one_string_and_the_older_values_map_onto_it():
    packing = packed_linear.packing
    assert [packing(p) for p in packed_linear.PACKINGS] == list(packed_linear.PACKINGS) and packing(None) == "auto"
    with pytest.warns(DeprecationWarning, match='pack_weights="off"'):
        assert packing(False) == "off"
    with pytest.warns(DeprecationWarning, match="pack_weights=True is deprecated"):
        assert packing(True) == (packed_linear.default_backend() or "off")   # the auto backend, no memory cap
    with pytest.raises(ValueError, match="unknown weight packing 'none'"):
        packing("none")
    model = tiny_model("llama")
    assert packed_linear.pack_for_inference(model, "off") is None and not packed_linear.is_packed(model)
    if packed_linear.default_backend() is not None:
        assert packed_linear.pack_for_inference(model, "auto") == packed_linear.default_backend()
        assert packed_linear.is_packed(model)


def test_a_packed_model_refuses_to_move_and_a_plain_one_moves_whole():
    if packed_linear.default_backend() is None:
        pytest.skip("torch without oneDNN or MKL")
    base = tiny_model("llama")
    packed_linear.pack_for_inference(base, "auto")
    m = MedusaModel(base, random_heads())
    assert m.to("cpu") is m and m.to(torch.float32) is m                  # nothing to move: allowed
    with pytest.raises(RuntimeError, match='load it with device=... / dtype=... instead, or with pack_weights="off"'):
        m.to(torch.float64)
    with pytest.raises(RuntimeError, match="packed"):
        m.double()
    assert base.get_input_embeddings().weight.dtype == torch.float32      # refused before anything moved

    model, ids = tiny_model("llama"), torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    plain = MedusaModel(model, random_heads(), tree="chain")
    plain.to(torch.float64)
    assert plain.heads.heads[0].blocks[0].linear.weight.dtype == torch.float64
    assert plain.engine.verifier.dtype == torch.float64                   # the engine follows the weights
    want = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(plain.generate(ids, max_new_tokens=12), want)
