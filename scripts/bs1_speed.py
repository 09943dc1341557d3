"""Batch-size-1 decoding speed of the checkout this runs from, on the default model: greedy, the first turns
of N dev prompts, M new tokens at most. Prints tokens/s and a digest of the answers, so two checkouts can be
compared side by side (run each in turn, interleaved, on an idle machine).

    python scripts/bs1_speed.py --prompts ../shared/data/dev_prompts.jsonl -n 10 --max-new-tokens 128
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time

from medusa import MedusaModel
from medusa.chat_format import encode_prompt
from medusa.interfaces.cli_args import add_threads, set_threads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", required=True)
    p.add_argument("-n", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_threads(p, default=2)
    a = p.parse_args()
    set_threads(a)
    m = MedusaModel.from_pretrained()
    rows = [json.loads(line) for line in open(a.prompts)][: a.n]
    prompts = [encode_prompt(m.tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    m.generate(prompts[0], max_new_tokens=16)                   # warm-up
    tokens, seconds, digest = 0, 0.0, hashlib.sha1()
    for ids in prompts:
        t0 = time.perf_counter()
        out = m.generate(ids, max_new_tokens=a.max_new_tokens)
        seconds += time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        tokens += len(new)
        digest.update(json.dumps(new).encode())
    print(json.dumps({"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2),
                      "answers": digest.hexdigest()[:12]}))


if __name__ == "__main__":
    main()
