"""What one forward of N new tokens costs the base model over a cache of C tokens, per weight packing: the
figure a tree of N nodes pays per step (packed_linear.py), timed on the engine's own verify forward. Medians
of --repeat runs, in ms.

    python scripts/forward_cost.py [--model HEADS] [--cached 300] [--nodes 1,2,3,4,5,6,8,10,12,16]
                                   [--packs none,onednn,16,4+8+16] [--min-rows 4] [--repeat 9] [--threads 2]
                                   [--compile]

Packings: none (the stock product), onednn, or MKL row counts joined by + (16, 4+8+16); or gguf (the GGUF
file's 4-bit weights kept, quantize="gguf", with its default attention medusa_tree) and gguf+sdpa.

--compile adds, for each packing, the same model as `compile=True` runs it (compiled.py: dynamic shapes, frozen
weights; PackedLinear steps aside there); compiling happens in an untimed first call per N.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from medusa import MedusaModel
from medusa.inference import packed_linear
from medusa.inference.cache import BatchCache
from medusa.inference.compiled import compile_forward
from medusa.inference.engine import build_engine
from medusa.inference.propose import Candidates
from medusa.interfaces.cli_args import add_threads, set_threads


@torch.inference_mode()
def cost_ms(model, cached: int, n: int, repeat: int, forward=None) -> float:
    """The verify forward decoding runs (the engine's Verifier, its mask and positions) for a chain of n nodes,
    the root and n - 1 below it, over a cache of `cached` tokens: median ms of `repeat` runs. `forward`: a
    compiled forward to run instead of the model's."""
    engine = build_engine(model, forward=forward)
    ids = torch.randint(100, 20000, (cached + n,), generator=torch.Generator().manual_seed(0))
    cache = BatchCache.for_model(model, capacity=cached + n)
    cache.reserve(cached, row=cache.add())
    engine.verifier.prefill(ids[:cached], cache)
    tree, shape = engine.shapes([(0,) * d for d in range(1, n)]).get(0)
    chain = Candidates(tree, ids[cached:], shape)
    times = []
    for _ in range(repeat + 1):      # the first, untimed: allocation, kernel choice, compilation
        t0 = time.perf_counter()
        engine.verifier.verify(cache, [cached], [chain], [False])
        times.append(time.perf_counter() - t0)
        cache.truncate(cached)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--cached", type=int, default=300)
    p.add_argument("--nodes", default="1,2,3,4,5,6,8,10,12,16")
    p.add_argument("--packs", default="none,onednn,4+8+16",
                   help="packings to compare: none, onednn, or MKL row counts joined by +")
    p.add_argument("--min-rows", type=int, default=4, help="fewest rows that use a packed copy (sizes != 16)")
    p.add_argument("--repeat", type=int, default=9)
    add_threads(p)
    p.add_argument("--compile", action="store_true", help="also time each packing under torch.compile")
    a = p.parse_args()
    set_threads(a)
    nodes = [int(x) for x in a.nodes.split(",")]
    rows = {}
    for packing in a.packs.split(","):
        if packing.startswith("gguf"):
            m = MedusaModel.from_pretrained(a.model, quantize="gguf",
                                            attn_implementation="sdpa" if packing == "gguf+sdpa" else None)
        else:
            m = MedusaModel.from_pretrained(a.model, pack_weights="off", quantize="none")
        if packing.startswith("gguf"):
            pass
        elif packing == "onednn":
            packed_linear.pack_linears(m.base_model, backend="onednn")
        elif packing != "none":
            sizes = tuple(int(x) for x in packing.split("+"))
            lean_sizes, lean_min = packed_linear.LEAN
            packed_linear.pack_linears(m.base_model, sizes, lean_min if sizes == lean_sizes else a.min_rows)
        rows[packing] = [cost_ms(m.base_model, a.cached, n, a.repeat) for n in nodes]
        if a.compile:
            rows[packing + " c"] = [cost_ms(m.base_model, a.cached, n, a.repeat, compile_forward(m.base_model))
                                     for n in nodes]
        del m
    print(f"{'N':>4} " + " ".join(f"{k:>10}" for k in rows))
    for i, n in enumerate(nodes):
        print(f"{n:>4} " + " ".join(f"{rows[k][i]:>10.1f}" for k in rows))


if __name__ == "__main__":
    main()
