"""Where a decoding step's time goes, per tree: the base model's forward (verify) against the loop's own
work (propose = heads + top-k, accept, compact, and everything else between).

    python scripts/profile_step.py [--model HEADS] [--trees root,chain,cpu_small,mc_sim_7b_63] [--tokens 64]
                                   [--lookup N] [--pack auto|onednn|mkl|off] [--dtype D] [--attn A] [--threads N]
                                   [--quantize none|gguf|int4|int8]

"nodes" is the mean number of nodes verified per step (the tree, plus context drafts where there were some).
The prompt's forward (prefill) is left out of the step time.
"""
from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from medusa import MedusaModel
from medusa.chat_format import encode_prompt
from medusa.inference.packed_linear import PACKINGS
from medusa.interfaces.cli_args import add_threads, set_threads

LABELS = ("medusa.propose", "medusa.verify", "medusa.accept", "medusa.compact")
PREFILL = "medusa.prefill"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--dtype")
    p.add_argument("--attn", help="attention implementation (sdpa, eager, medusa_tree)")
    p.add_argument("--trees", default="root,chain,cpu_small,mc_sim_7b_63")
    p.add_argument("--tokens", type=int, default=64)
    add_threads(p)
    p.add_argument("--quantize", help="base weights (loading.QUANTIZE; default: gguf for the default model on a CPU)")
    p.add_argument("--lookup", type=int, help="context-draft tokens per step (default: the model's, 10; 0 = off)")
    p.add_argument("--pack", choices=PACKINGS, default="auto",
                   help="packed fp32 CPU weights for the loop's products (packed_linear.packing); off = stock products")
    a = p.parse_args()
    set_threads(a)
    m = MedusaModel.from_pretrained(a.model, dtype=a.dtype, attn_implementation=a.attn, lookup=a.lookup,
                                    pack_weights=a.pack, quantize=a.quantize)
    text = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    ids = encode_prompt(m.tokenizer, [{"role": "user", "content": text}])
    list(m.stream(ids, max_new_tokens=8))                                   # warm-up
    print(f"{'tree':>14} {'nodes':>5} {'steps':>5} {'tok/step':>8} {'step ms':>8} {'verify':>7} {'propose':>7} "
          f"{'accept':>7} {'compact':>7} {'other':>7}  loop share")
    for tree in a.trees.split(","):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            steps = list(m.stream(ids, max_new_tokens=a.tokens, tree=tree, eos_token_id=[]))
            wall = time.perf_counter() - t0
        totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in (*LABELS, PREFILL)}  # ms
        n = len(steps)
        per = {k: totals.get(k, 0.0) / n for k in LABELS}
        step_ms = (wall * 1e3 - totals.get(PREFILL, 0.0)) / n
        other = step_ms - sum(per.values())
        loop = step_ms - per["medusa.verify"]
        nodes = sum(s.tree_size for s in steps) / n
        print(f"{tree:>14} {nodes:>5.1f} {n:>5} {a.tokens / n:>8.2f} {step_ms:>8.1f} "
              f"{per['medusa.verify']:>7.1f} {per['medusa.propose']:>7.1f} {per['medusa.accept']:>7.1f} "
              f"{per['medusa.compact']:>7.1f} {other:>7.1f}  {loop / step_ms:>6.1%}")


if __name__ == "__main__":
    main()
