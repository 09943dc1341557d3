"""Greedy verification from a bf16 copy of the output projection: always the fp32 argmax, used only where
the projection's output is the model's logits, and decoding with it equals decoding without it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference.greedy_head import GreedyHead, greedy_head_for, native_bf16


def _projection(vocab=512, hidden=64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lm = nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        lm.weight.copy_(torch.randn(vocab, hidden, generator=g))
        # near-twins bf16 cannot tell apart (fp32 can): row 2k+1 is row 2k moved by ~1e-4 of its size
        lm.weight[1:200:2] = lm.weight[0:200:2] * (1 + 1e-4 * torch.randn(100, 1, generator=g))
        if bias:
            lm.bias.copy_(torch.randn(vocab, generator=g))
    return lm


def test_argmax_equals_the_fp32_one_even_between_near_twins():
    for bias in (False, True):
        lm = _projection(bias=bias)
        head = GreedyHead(lm)
        g = torch.Generator().manual_seed(1)
        random = torch.randn(300, 64, generator=g) * 20
        twins = lm.weight[0:200:2].detach() * 3 + 0.01 * torch.randn(100, 64, generator=g)   # a twin pair on top
        for h in (random, twins):
            want = F.linear(h, lm.weight, lm.bias).argmax(dim=-1)
            assert torch.equal(head(h), want)
        approx = F.linear(twins.bfloat16(), lm.weight.bfloat16(), None if lm.bias is None else lm.bias.bfloat16())
        assert not torch.equal(approx.float().argmax(-1), want)     # bf16 alone gets some twins wrong


def test_used_only_where_the_projection_gives_the_logits_and_bf16_is_fast():
    assert isinstance(greedy_head_for(tiny_model("llama"), fast_bf16=True), GreedyHead)
    assert greedy_head_for(tiny_model("gemma2"), fast_bf16=True) is None            # soft-capped logits
    assert greedy_head_for(tiny_model("llama").to(torch.bfloat16), fast_bf16=True) is None
    assert greedy_head_for(tiny_model("llama"), fast_bf16=False) is None            # AVX2-only CPUs
    # the default follows this machine
    assert (greedy_head_for(tiny_model("llama")) is not None) == native_bf16()


def test_decoding_with_it_equals_decoding_without():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(5))
    runs = []
    for use in (True, False):
        m = MedusaModel(model, random_heads(), tree="cpu_small", lookup=6)
        m.greedy_head = greedy_head_for(model, fast_bf16=True) if use else None
        assert (m.greedy_head is not None) is use
        runs.append([(s.tokens.tolist(), s.nodes) for s in m.stream(ids, max_new_tokens=48)])
    assert runs[0] == runs[1]
    ref = model.generate(ids, max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0)
    assert sum((t for t, _ in runs[0]), []) == ref[0, 12:].tolist()
