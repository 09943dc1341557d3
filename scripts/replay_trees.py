"""Tokens per step that trees would give the heads (alone, greedy), without decoding with each tree.

Each prompt is decoded once with the model's own tree (or `--decode-tree`), and context drafts unless
`--lookup 0`; those steps are counted: a real measurement. Its greedy answer is then replayed with each tree
(`medusa.evaluation.replay`): one decode serves every tree, 256-node ones included. With `--lookup 0` the
decode is the heads alone, and replaying the tree it decoded with gives the decoded steps.

    python scripts/replay_trees.py --prompts ../shared/data/dev_prompts.jsonl --limit 20 \\
        --trees mc_sim_7b_63,dynamic:64,dynamic:256 --output replay.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from medusa.chat_format import encode_prompt
from medusa.evaluation.replay import replay
from medusa.inference.tree import load_tree, tree_label
from medusa.interfaces.cli_args import add_threads, set_threads
from medusa.model import MedusaModel
from medusa.training.prompts import read_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="heads folder (default: the embedded default heads)")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--trees", default="mc_sim_7b_63", help="comma-separated presets, dynamic:N, JSON files")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--decode-tree", default=None, help="the tree to decode with (default: the model's)")
    ap.add_argument("--lookup", type=int, default=None, help="context drafts while decoding (0: off; default: "
                    "the model's)")
    add_threads(ap)
    ap.add_argument("--output", default=None, help="JSON with each prompt's steps per tree")
    a = ap.parse_args()
    set_threads(a)
    model = MedusaModel.from_pretrained(a.model, dtype=torch.float32)
    trees = {t: load_tree(t, model.heads.num_heads, model.device_type) for t in a.trees.split(",") if t}
    drafts = "no context drafts" if a.lookup == 0 else "context drafts"
    decode_tree = load_tree(a.decode_tree, model.heads.num_heads, model.device_type) if a.decode_tree else model.tree
    decoded = f"decoded ({tree_label(decode_tree)}, {drafts})"
    totals = {k: 0 for k in [decoded, *trees]}
    tokens, rows, t0 = 0, [], time.time()
    prompts = read_prompts(a.prompts)[: a.limit]
    for n, rec in enumerate(prompts, 1):
        ids = encode_prompt(model.tokenizer, [{"role": "user", "content": rec.turns[0]}])
        steps = list(model.stream(ids, max_new_tokens=a.max_new_tokens, tree=decode_tree, lookup=a.lookup))
        answer = torch.cat([s.tokens for s in steps]).cpu()
        row = {"id": rec.id, "category": rec.category, "tokens": answer.numel(), decoded: len(steps)}
        row |= replay(model, ids, answer, trees)
        rows.append(row)
        tokens += answer.numel()
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
