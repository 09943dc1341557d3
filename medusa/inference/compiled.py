"""torch.compile for the base model's forward passes in the decode loop (opt-in: `compile=True`, `--compile`).

One compiled callable per MedusaModel, with dynamic shapes, so that the tree's node count, the number of
context drafts and the cache length do not each cost a recompilation: `warm_up` compiles a handful of graphs
(the prompt, one-token steps, tree steps) that serve the whole process. `freezing` lets inductor treat the
weights as constants and pack them for oneDNN's matrix product, fast for any row count, so PackedLinear
steps aside under compilation (packed_linear.py). Compiling pays most for steps of several tokens (bigger
trees, larger machines); `scripts/forward_cost.py --compile` times one forward per node count on yours, and
benchmarks/README.md ("Component timings") has the default model's figures.

Compiling takes minutes on a small CPU (inductor writes C++ and builds it; its disk cache shortens a later
process's compile only a little), so `warm_up` pays for it before any timed or interactive use. The eager
model stays as it was: `generate` and anything else calling it directly never touch the compiled graphs.
"""
from __future__ import annotations

import torch

# prompt and answer lengths for `warm_up`: long enough for context drafts to appear, short to run
_WARM_PROMPT, _WARM_TOKENS = 48, 24


def compile_forward(model):
    """The model's forward under torch.compile (inductor, dynamic shapes, frozen weights). Inference only:
    later changes to the weights are not seen by the compiled graphs."""
    return torch.compile(model, dynamic=True, options={"freezing": True})


def warm_up(stream, vocab_size: int) -> int:
    """Run every kind of forward pass decoding meets once, untimed (with a compiled forward: compile them).
    `stream(ids, **options)` is MedusaModel.stream. Returns the number of steps run."""
    gen = torch.Generator().manual_seed(0)
    phrase = torch.randint(min(100, vocab_size - 1), vocab_size, (_WARM_PROMPT // 2,), generator=gen)
    ids = phrase.repeat(2)[None]            # a repeated phrase: context drafts appear from the first step
    steps = 0
    for tree, lookup in ((None, None), ("root", 0)):    # the model's tree (+ drafts), and one-token steps
        steps += sum(1 for _ in stream(ids, tree=tree, lookup=lookup, max_new_tokens=_WARM_TOKENS, eos_token_id=[]))
    return steps
