"""Replaying a greedy answer with a tree gives the steps decoding with that tree took."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import OracleHeads, random_heads, tiny_model, tiny_tokenizer
from medusa import MedusaModel
from medusa.evaluation.calibrate import answer_example
from medusa.evaluation.replay import replay, walk
from medusa.inference.tree import DynamicTree, load_tree
from medusa.training.accuracy import assistant_positions

TREES = {"chain": "chain", "small": [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], "dynamic:6": DynamicTree(6)}


def test_walk_counts_steps_from_accepted_depths():
    assert walk(torch.tensor([2, 0, 0, 1, 0]), 6) == 3          # 3 tokens, then 1 at j=3, then 2 at j=4
    assert walk(torch.tensor([0, 0]), 4) == 4                   # past the depths: a token a step
    assert walk(torch.tensor([3]), 2) == 1 and walk(torch.tensor([]), 0) == 0


def _decoded_and_replayed(model, heads, prompt, tree, new=60):
    m = MedusaModel(model, heads, tiny_tokenizer(), tree=tree)
    steps = list(m.stream(prompt, max_new_tokens=new, lookup=0, eos_token_id=[]))
    answer = torch.cat([s.tokens for s in steps])[:new]
    return len(steps), replay(m, prompt, answer, {"t": load_tree(tree, heads.num_heads)})["t"]


@pytest.mark.parametrize("prompt_len", [10, 3])          # 3: shorter than the heads' reach before the answer
@pytest.mark.parametrize("tree", list(TREES))
def test_replay_gives_the_decoded_steps(tree, prompt_len):
    model = tiny_model("llama")
    prompt = torch.randint(3, 90, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    ref = model.generate(prompt, max_new_tokens=80, min_new_tokens=80, do_sample=False, pad_token_id=0)[0]
    decoded, replayed = _decoded_and_replayed(model, OracleHeads(model, ref, max_rank=2, miss_every=4), prompt,
                                              TREES[tree])
    assert decoded < 45                                   # long paths were accepted: a real test of the walk
    assert replayed == decoded


def _fitted_parent_heads(model, sequence: torch.Tensor, steps: int = 300):
    """Heads that take their parent's token, fitted to one greedy sequence (the reference they will decode)."""
    heads = random_heads(next_token=True, parent_token=True).train()
    with torch.no_grad():
        (h, tgt, inputs), = assistant_positions(model, heads, [answer_example(sequence[:10], sequence[10:])],
                                                batch_size=1)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = heads(h, model.get_output_embeddings(), **inputs)                    # (K, n, V)
        loss = F.cross_entropy(logits[tgt >= 0], tgt[tgt >= 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return heads.eval()


def test_replay_of_parent_token_heads_with_a_dynamic_tree():
    """Heads that take their parent's token: the tree grows from each node's own token, right or wrong."""
    model = tiny_model("llama")
    prompt = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = model.generate(prompt, max_new_tokens=80, min_new_tokens=80, do_sample=False, pad_token_id=0)[0]
    heads = _fitted_parent_heads(model, ref)
    for nodes in (3, 24):
        decoded, replayed = _decoded_and_replayed(model, heads, prompt, DynamicTree(nodes), new=80)
        assert decoded < 50 and replayed == decoded
