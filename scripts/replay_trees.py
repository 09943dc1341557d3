"""Tokens per step that trees would give the heads (alone, greedy), without decoding with each tree.

Each prompt is decoded once with the model's own settings (its tree and context drafts; those steps are
counted: a real measurement). Its greedy answer is then replayed as decoding would walk it with each tree: at
the last accepted token, 1 + the depth of the deepest path whose guesses are all the answer's next tokens (the
heads seeing the true parent token, which is what an accepted path holds), then on from the new last token.
Greedy answers do not depend on the tree, so one decode serves every tree, 256-node ones included. The replay
counted 1-3% fewer tokens per step than decoding with the tree did on the default model (cause not pinned
down); rank trees with it, quote `medusa evaluate` for a tree you ship.

    python scripts/replay_trees.py --prompts ../shared/data/dev_prompts.jsonl --limit 20 \\
        --trees mc_sim_7b_63,dynamic:64,dynamic:256 --output replay.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from medusa.evaluation.calibrate import static_accepted
from medusa.inference.heads import draft_projection
from medusa.inference.tree import DYNAMIC, load_tree, tree_label
from medusa.interfaces.chat import encode_prompt
from medusa.model import MedusaModel
from medusa.training.data import Example
from medusa.training.evaluate import assistant_positions, dynamic_accepted, guess_table
from medusa.training.prompts import read_prompts


def dynamic_depths(model, h, next_embeds, tgt, budgets) -> dict[int, torch.Tensor]:
    """{budget: (n,) candidates a dynamic tree of that many nodes accepts at each position}."""
    base = model.base_model
    accepted = dynamic_accepted(model.heads, h, next_embeds, tgt, draft_projection(base.get_output_embeddings(),
                                model.heads), base.get_input_embeddings(), width=max(budgets) - 1, chunk=16)
    return {b: accepted[:, : b - 1].amax(1) if b > 1 else torch.zeros(len(accepted), dtype=torch.long)
            for b in budgets}


def replay(depths: torch.Tensor, new_tokens: int) -> int:
    """Steps to produce `new_tokens` when a step at answer position j accepts 1 + depths[j] tokens."""
    j = produced = steps = 0
    while produced < new_tokens:
        a = 1 + (int(depths[j]) if j < len(depths) else 0)
        produced, steps, j = produced + a, steps + 1, j + a
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="heads folder (default: the embedded default heads)")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--trees", default="mc_sim_7b_63", help="comma-separated presets, dynamic:N, JSON files")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default=None, help="JSON with each prompt's steps per tree")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = MedusaModel.from_pretrained(a.model, dtype=torch.float32)
    K = model.heads.num_heads
    names = [t for t in a.trees.split(",") if t]
    dynamic = [int(t[len(DYNAMIC):]) for t in names if t.startswith(DYNAMIC)]
    if dynamic and not model.heads.config.parent_token_input:
        raise SystemExit("dynamic trees are replayed for --parent-token-input heads only")
    static = {t: load_tree(t, K, model.device_type) for t in names if not t.startswith(DYNAMIC)}
    ranks = 1 + max((r for tree in static.values() for path in tree for r in path), default=0)   # hit's width
    decoded = f"decoded ({tree_label(model.tree)}, context drafts)"
    totals = {k: 0 for k in [decoded, *names]}
    tokens, rows, t0 = 0, [], time.time()
    prompts = read_prompts(a.prompts)[: a.limit]
    for n, rec in enumerate(prompts, 1):
        ids = encode_prompt(model.tokenizer, [{"role": "user", "content": rec.turns[0]}])
        steps = list(model.stream(ids, max_new_tokens=a.max_new_tokens))
        full = torch.cat([ids[0], *[s.tokens for s in steps]]).cpu()
        new = full.numel() - ids.shape[1]
        mask = torch.zeros(full.numel(), dtype=torch.bool)
        mask[ids.shape[1]:] = True
        example = [Example(full, mask)]
        with torch.inference_mode():                     # positions from the prompt's last token on
            pos = list(assistant_positions(model.base_model, model.heads, example, batch_size=1))
            _, hit, _ = guess_table(model.base_model, model.heads, example, max_rank=ranks, positions=pos)
            h, tgt, inputs = pos[0]
            dyn = dynamic_depths(model, h, inputs["next_embeds"], tgt, dynamic) if dynamic else {}
        row = {"id": rec.id, "category": rec.category, "tokens": new, decoded: len(steps)}
        row |= {t: replay(static_accepted(tree, hit), new) for t, tree in static.items()}
        row |= {f"{DYNAMIC}{b}": replay(d, new) for b, d in dyn.items()}
        rows.append(row)
        tokens += new
        for k in totals:
            totals[k] += row[k]
        print(f"{n}/{len(prompts)} {time.time() - t0:.0f}s tokens per step: "
              + ", ".join(f"{k} {tokens / s:.3f}" for k, s in totals.items()), flush=True)
    report = {"prompts": len(rows), "new_tokens": tokens,
              "tokens_per_step": {k: round(tokens / max(s, 1), 4) for k, s in totals.items()}, "rows": rows}
    if a.output:
        with open(a.output, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report["tokens_per_step"]))


if __name__ == "__main__":
    main()
