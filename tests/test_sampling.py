"""Lossless sampling over the tree follows plain sampling's distribution exactly (chi-square test against
the model's exact sequence probabilities); typical acceptance, which is not lossless, fails the same test."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from conftest import OracleHeads, random_heads, tiny_model
from medusa import MedusaModel
from medusa.inference.acceptance import SamplingOptions, sampling_probs

N_SAMPLES, N_NEW = 1200, 3


def _chi2_pvalue(stat: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty normal approximation)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@torch.no_grad()
def _exact_prob(model, prompt: torch.Tensor, seq: tuple, opts: SamplingOptions) -> float:
    full = torch.cat([prompt[0], torch.tensor(seq)])[None]
    logits = model(full).logits[0, prompt.shape[1] - 1: -1]
    return math.prod(sampling_probs(logits[k], opts)[tok].item() for k, tok in enumerate(seq))


def _goodness_of_fit(model, prompt, samples: list[tuple], opts) -> tuple[float, int]:
    """Chi-square p-value of the observed sequences against their exact probabilities; bins with an
    expected count below 5 are pooled with everything unseen into one 'other' bin."""
    counts = Counter(samples)
    expected = {s: _exact_prob(model, prompt, s, opts) * len(samples) for s in counts}
    bins = [s for s in counts if expected[s] >= 5]
    obs = [counts[s] for s in bins]
    exp = [expected[s] for s in bins]
    obs.append(len(samples) - sum(obs))
    exp.append(len(samples) - sum(exp))
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return _chi2_pvalue(stat, len(obs) - 1), len(obs)


def _sample(m, prompt, mode, temperature=0.8, top_p=1.0):
    out, accepted_any = [], 0
    for seed in range(N_SAMPLES):
        steps = list(m.stream(prompt, max_new_tokens=N_NEW, temperature=temperature, top_p=top_p,
                              sampling=mode, seed=seed))
        out.append(tuple(torch.cat([s.tokens for s in steps]).tolist()))
        accepted_any += steps[0].accepted > 1
    return out, accepted_any / N_SAMPLES


def _medusa_with_good_guesses(tree="cpu_small"):
    """A tiny model and heads that put its greedy continuation near the top: many candidates get accepted
    under sampling too, so both acceptance and rejection are exercised."""
    model = tiny_model("qwen2", seed=3)
    prompt = torch.tensor([[5, 17, 42, 8, 23, 61]])
    ref = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    return model, MedusaModel(model, OracleHeads(model, ref[0], max_rank=2, miss_every=1000), tree=tree), prompt


@pytest.mark.parametrize("temperature,top_p,tree", [(0.8, 1.0, "cpu_small"), (0.6, 0.9, "cpu_small"),
                                                    (0.8, 1.0, "dynamic:8")])
def test_lossless_sampling_follows_plain_sampling(temperature, top_p, tree):
    """Also with a dynamic tree: its shape is a function of the context alone, so acceptance stays lossless."""
    model, m, prompt = _medusa_with_good_guesses(tree)
    samples, accept_rate = _sample(m, prompt, "lossless", temperature=temperature, top_p=top_p)
    assert 0.2 < accept_rate < 0.9             # candidates were accepted and rejected
    p, n_bins = _goodness_of_fit(model, prompt, samples, SamplingOptions(temperature=temperature, top_p=top_p))
    assert n_bins >= 8
    assert p > 1e-3, f"lossless samples deviate from plain sampling (p={p:.2e}, {n_bins} bins)"


def test_typical_acceptance_is_not_lossless_and_the_test_notices():
    model, m, prompt = _medusa_with_good_guesses()
    samples, _ = _sample(m, prompt, "typical", temperature=0.8)
    p, _ = _goodness_of_fit(model, prompt, samples, SamplingOptions(temperature=0.8))
    assert p < 1e-6


def test_lossless_sampling_with_context_drafts_follows_plain_sampling():
    """Drafts copied from the context are candidates like any other: a prompt ending in a loop the model
    continues gets its drafts accepted often, and the samples still follow plain sampling."""
    model = tiny_model("llama", seed=1)
    prompt = torch.tensor([[52, 35, 15, 68, 64, 4, 20, 12, 79, 23, 54, 64, 64, 64]])
    m = MedusaModel(model, random_heads(), tree="root", lookup=3)
    samples, accept_rate = _sample(m, prompt, "lossless", temperature=0.8)
    assert 0.3 < accept_rate < 0.95            # drafts were accepted and rejected
    p, n_bins = _goodness_of_fit(model, prompt, samples, SamplingOptions(temperature=0.8))
    assert n_bins >= 8
    assert p > 1e-3, f"lossless samples with drafts deviate from plain sampling (p={p:.2e}, {n_bins} bins)"


def test_typical_acceptance_takes_the_likeliest_of_the_longest_paths():
    """Two children of the root both pass the threshold: the second in retrieve order is likelier and wins
    (taking the first one, the earlier rule, fails here)."""
    from medusa.inference.acceptance import accept_typical
    from medusa.inference.tree import tree_buffers

    tree = tree_buffers([(0,), (1,)])
    tokens = torch.tensor([5, 10, 20])
    probs = torch.full((3, 32), 0.2 / 30)
    probs[0, 10], probs[0, 20] = 0.3, 0.5
    row, accepted = accept_typical(probs.log(), tokens, tree, SamplingOptions(temperature=1.0))
    assert accepted == 1 and tree.retrieve[row, 1] == 2
    probs[0, 10], probs[0, 20] = 0.5, 0.3
    row, _ = accept_typical(probs.log(), tokens, tree, SamplingOptions(temperature=1.0))
    assert tree.retrieve[row, 1] == 1


def test_lossless_sampling_in_a_batch_follows_plain_sampling_per_row():
    """Two prompts decoded together, each with its own seed: each row's samples follow plain sampling of its
    own prompt."""
    model = tiny_model("qwen2", seed=3)
    prompts = [torch.tensor([[5, 17, 42, 8, 23, 61]]), torch.tensor([[9, 33, 71, 12]])]
    refs = [model.generate(p, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)[0]
            for p in prompts]
    m = MedusaModel(model, OracleHeads(model, refs, max_rank=2, miss_every=1000), tree="cpu_small")
    samples: list[list[tuple]] = [[], []]
    for seed in range(N_SAMPLES):
        out = m.generate([p[0] for p in prompts], max_new_tokens=N_NEW, temperature=0.8, sampling="lossless",
                         seed=[2 * seed, 2 * seed + 1])
        for row, (p, o) in enumerate(zip(prompts, out)):
            samples[row].append(tuple(o[p.shape[1]:].tolist()))
    for row, p in enumerate(prompts):
        pvalue, n_bins = _goodness_of_fit(model, p, samples[row], SamplingOptions(temperature=0.8))
        assert n_bins >= 8
        assert pvalue > 1e-3, f"row {row}: lossless samples deviate from plain sampling (p={pvalue:.2e})"
