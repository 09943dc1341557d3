"""Training-side subcommands of `medusa`: argument parsing only; the work is in the library."""
from __future__ import annotations

import argparse


def add_commands(sub) -> dict:
    d = sub.add_parser("distill", help="self-distillation: the base model answers prompts (resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--input", action="append", required=True,
                   help="prompt JSONL (prompt / ShareGPT conversations / MT-Bench turns); repeatable")
    d.add_argument("--output", required=True, help="ShareGPT JSONL to append to; re-running resumes")
    d.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    d.add_argument("--max-new-tokens", type=int, default=512)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--limit", type=int, help="only the first N prompts")
    d.add_argument("--dtype", help="e.g. bfloat16 (fast on CPUs with AMX) or float32")
    d.add_argument("--device")
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--api-base", help="OpenAI-compatible endpoint instead of local generation, e.g. "
                                      "http://127.0.0.1:8000/v1")
    d.add_argument("--api-model", help="model name to send to the endpoint")
    d.add_argument("--api-key")
    d.add_argument("--concurrency", type=int, default=8, help="requests in flight (API back end)")
    return {"distill": cmd_distill}


def cmd_distill(a) -> int:
    import json

    import torch

    from medusa.training.distill import DistillConfig, run_distill

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = DistillConfig(inputs=a.input, output=a.output, model=a.model, max_new_tokens=a.max_new_tokens,
                        batch_size=a.batch_size, temperature=a.temperature, top_p=a.top_p, limit=a.limit,
                        api_base=a.api_base, api_model=a.api_model, api_key=a.api_key,
                        concurrency=a.concurrency, dtype=a.dtype, device=a.device)
    print(json.dumps(run_distill(cfg)))
    return 0

