"""Replaying greedy answers with trees: the steps any tree would take, from one decode.

A greedy answer does not depend on the tree it was decoded with, so once it is known the steps of any other
tree follow from the heads' guesses along it: a step at the answer's last accepted token accepts 1 (the base
model's own next token) + the depth of the tree's deepest path whose guesses are all the answer's next tokens
(heads that take their parent's token see the true one: that is what an accepted path holds); the next step
starts at the new last token. One pass of the base model over the answer serves every tree, 256-node ones
included. Replaying the tree an answer was decoded with (heads alone, no context drafts) gives that decode's
steps, which tests/test_replay.py checks. `scripts/replay_trees.py` runs it over a prompt file.
"""
from __future__ import annotations

import torch

from medusa.evaluation.calibrate import accepted_depths, answer_example, dynamic_accepted
from medusa.inference.draft_head import draft_projection
from medusa.inference.tree import DynamicTree
from medusa.training.accuracy import assistant_positions, guess_table


def answer_depths(model, prompt_ids: torch.Tensor, answer: torch.Tensor, trees: dict) -> dict[str, torch.Tensor]:
    """{name: (len(answer) - 1,) candidates each tree accepts at a step whose last accepted token is the
    prompt's last token (index 0) or the answer's token j - 1 (index j)}. `prompt_ids` (1, P) or (P,),
    `answer` (new,): the greedy answer; `trees`: {name: static paths or DynamicTree}."""
    base, heads = model.base_model, model.heads
    new = answer.numel()
    parent_dynamic = {k: t for k, t in trees.items()
                      if isinstance(t, DynamicTree) and heads.config.parent_token_input}
    table = {k: t for k, t in trees.items() if k not in parent_dynamic}      # judged from guess_table's hits
    ranks = 1 + max([r for t in table.values() if not isinstance(t, DynamicTree) for p in t for r in p]
                    + [t.topk - 1 for t in table.values() if isinstance(t, DynamicTree)], default=0)
    with torch.inference_mode():
        (h, tgt, inputs), = assistant_positions(base, heads, [answer_example(prompt_ids, answer)], batch_size=1)
        # the positions where some head has a target start up to K (heads) before the prompt's last token (head K-1
        # there guesses the answer's first token); decoding's steps start at the prompt's last token
        skip = h.shape[0] - (new - 1)
        h, tgt, inputs = h[skip:], tgt[:, skip:], {k: v[..., skip:, :] for k, v in inputs.items()}
        out = {}
        if table:
            probs, hit, _ = guess_table(base, heads, [], max_rank=ranks, positions=[(h, tgt, inputs)])
            out = {k: accepted_depths(t, probs, hit) for k, t in table.items()}
        lm_head, embedding = draft_projection(base.get_output_embeddings(), heads), base.get_input_embeddings()
        for topk in {t.topk for t in parent_dynamic.values()}:      # one growth serves every size
            group = {k: t for k, t in parent_dynamic.items() if t.topk == topk}
            width = max(t.nodes for t in group.values()) - 1
            grown = dynamic_accepted(heads, h, inputs["next_embeds"], tgt, lm_head, embedding, width=max(width, 1),
                                     topk=topk, chunk=16)
            out |= {k: grown[:, : t.nodes - 1].amax(1) if t.nodes > 1 else torch.zeros(len(grown), dtype=torch.long)
                    for k, t in group.items()}
    return out


def walk(depths: torch.Tensor, new_tokens: int) -> int:
    """Steps to produce `new_tokens` when a step at answer index j accepts 1 + depths[j] tokens."""
    j = steps = 0
    while j < new_tokens:
        j, steps = j + 1 + (int(depths[j]) if j < len(depths) else 0), steps + 1
    return steps


def replay(model, prompt_ids: torch.Tensor, answer: torch.Tensor, trees: dict) -> dict[str, int]:
    """{name: the steps each tree takes to decode `answer` (the model's greedy answer to `prompt_ids`)}."""
    return {k: walk(d, answer.numel()) for k, d in answer_depths(model, prompt_ids, answer, trees).items()}
