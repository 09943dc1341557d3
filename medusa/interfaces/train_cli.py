"""`medusa distill`, `compose-prompts` and `train`: argument parsing only; the work is in medusa.training."""
from __future__ import annotations

import argparse
import sys

from medusa.interfaces.cli_args import add_quantize, add_threads, quantize_of


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, where it has one (no "(default: None)")."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_commands(sub) -> dict:
    from medusa import chat_format

    d = sub.add_parser("distill", help="self-distillation: the base model answers prompts (resumable)",
                       formatter_class=_Defaults)
    d.add_argument("--input", action="append", required=True,
                   help="prompt JSONL (prompt / ShareGPT conversations / MT-Bench turns); repeatable")
    d.add_argument("--output", required=True, help="ShareGPT JSONL to append to; re-running resumes")
    d.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    d.add_argument("--chat-template", metavar="FILE", help=chat_format.HELP + " (local generation; an endpoint "
                                                                              "applies its own)")
    d.add_argument("--max-new-tokens", type=int, default=512)
    d.add_argument("--batch-size", type=int, default=32,
                   help="answers decoded side by side (continuous batching: a finished one's slot takes the next "
                        "prompt at once); API back end: records per round")
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--limit", type=int, help="only the first N prompts")
    d.add_argument("--dtype", help="e.g. bfloat16 (fast on CPUs with AMX) or float32")
    d.add_argument("--device")
    add_threads(d)
    d.add_argument("--pack-weights", choices=("auto", "onednn", "mkl", "off"), default="auto",
                   help="fp32 CPU weights packed once for decoding's products: auto = oneDNN where torch has it "
                        "(else MKL) when the copies take at most 2 GiB; off = stock products")
    d.add_argument("--no-pack-weights", action="store_true", help="deprecated: --pack-weights off")
    d.add_argument("--api-base", help="OpenAI-compatible endpoint instead of local generation, e.g. "
                                      "http://127.0.0.1:8000/v1")
    d.add_argument("--api-model", help="model name to send to the endpoint")
    d.add_argument("--api-key")
    d.add_argument("--concurrency", type=int, default=8, help="requests in flight (API back end)")
    c = sub.add_parser("compose-prompts", help="add summarization, translation and passage-QA prompts built "
                                               "from passages of a prompt pool, spread through it")
    c.add_argument("--input", required=True, help="prompt pool JSONL")
    c.add_argument("--output", required=True)
    c.add_argument("--per-task", type=int, default=500, help="composed prompts per task")
    c.add_argument("--seed", type=int, default=0)
    return {"distill": cmd_distill, "compose-prompts": cmd_compose, **add_train_commands(sub)}


def cmd_compose(a) -> int:
    from medusa.training.prompts import compose_task_prompts, interleave, read_prompts, write_prompts

    pool = read_prompts(a.input)
    extra = compose_task_prompts(pool, a.per_task, seed=a.seed)
    write_prompts(interleave(pool, extra), a.output)
    print(f"{len(pool)} prompts + {len(extra)} composed -> {a.output}")
    return 0


def cmd_distill(a) -> int:
    import json

    from medusa.training.distill import DistillConfig, run_distill

    if a.chat_template and a.api_base:
        raise ValueError("--chat-template applies to local generation; the endpoint of --api-base uses its own")
    cfg = DistillConfig(inputs=a.input, output=a.output, model=a.model, max_new_tokens=a.max_new_tokens,
                        batch_size=a.batch_size, temperature=a.temperature, top_p=a.top_p, limit=a.limit,
                        api_base=a.api_base, api_model=a.api_model, api_key=a.api_key,
                        concurrency=a.concurrency, dtype=a.dtype, device=a.device,
                        pack_weights=_pack_weights(a), chat_template=a.chat_template)
    print(json.dumps(run_distill(cfg)))
    return 0


def _pack_weights(a) -> str:
    """--pack-weights, or "off" from the deprecated --no-pack-weights (said on stderr)."""
    if a.no_pack_weights:
        print("medusa: --no-pack-weights is deprecated; use --pack-weights off", file=sys.stderr)
        return "off"
    return a.pack_weights


_HELP = {
    "mode": "medusa1 (frozen base, heads only) or medusa2 (LoRA on the base + heads)",
    "num_heads": "Medusa heads: head i (from 0) guesses the token i + 2 places ahead",
    "num_layers": "residual blocks per head",
    "max_length": "tokens per conversation; longer ones are cut",
    "batch_size": "conversations per batch (per process; an optimizer step takes --grad-accum batches)",
    "grad_accum": "batches per optimizer step",
    "epochs": "passes over the training conversations (a fraction stops part-way)",
    "lr": "peak learning rate of the heads: linear warm-up, then cosine decay to 0",
    "warmup_ratio": "fraction of the optimizer steps spent warming up",
    "weight_decay": "AdamW weight decay",
    "kl_topk": "--loss kl: the base's top-k log-probabilities kept per position",
    "base_dtype": "dtype to load the base model in (default: the checkpoint's)",
    "seed": "seed of the shuffle, the held-out split and the initialization",
    "limit": "only the first N conversations of --data",
    "log_every": "log every N optimizer steps: loss, and per-head accuracy on that step's training batch",
    "lora_r": "medusa2: LoRA rank",
    "lora_alpha": "medusa2: LoRA alpha",
    "shared_lm_head": "heads reuse the base's frozen lm_head (small heads) instead of one projection each",
    "next_token_input": "heads also see the embedding of the token the base predicts next (more accurate; "
                        "our format only, not exportable to vLLM/TGI/TensorRT-LLM)",
    "parent_token_input": "with --next-token-input: head i >= 1 also sees the token its guess follows (at decode "
                          "time the previous head's guess: Hydra-style sequential heads; our format only)",
    "draft_vocab": "the heads learn and guess only among the tokens seen as training targets (faster to train "
                   "and to decode, lossless: the base verifies every guess)",
    "loss": "ce (true next tokens) or kl (the base's own distributions: soft self-distillation targets)",
    "decay": "head i's loss weight is decay**i",
    "mixed_precision": "no, bf16 or fp16 (bf16 is fast on GPUs and on CPUs with AMX)",
    "checkpoint_every": "save a resumable checkpoint every N optimizer steps",
    "stop_after": "end this run after N steps without changing the schedule; re-run to resume",
    "heads_weight": "medusa2: lambda0, the heads loss weight beside the KL that keeps the base",
    "heads_warmup_steps": "medusa2: heads-only steps before the base's adapters start training",
    "base_lr": "medusa2: learning rate of the LoRA adapters",
    "save_merged": "medusa2: also save the base with the adapters merged in",
    "chat_template": "a Jinja chat template file for a model without one (else plain text); the same as decoding "
                     "uses",
    "val_examples": "conversations held out from training for the final per-head accuracy (val_accuracy) and "
                    "the tree's calibration (--calibrate), at most a tenth of the usable ones: fewer when --data "
                    "has under 10 times this many, none under 10 (val_accuracy is then empty and no tree is "
                    "calibrated)",
}


def add_train_commands(sub) -> dict:
    t = sub.add_parser("train", help="train Medusa heads (Medusa-1: frozen base; Medusa-2: LoRA + heads)",
                       formatter_class=_Defaults)
    from medusa.training.trainer import TrainConfig

    defaults = TrainConfig(data="", output="")
    t.add_argument("--data", required=True, help="ShareGPT JSONL, e.g. from `medusa distill`")
    t.add_argument("--output", required=True, help="heads folder (checkpoints inside; re-run to resume)")
    t.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    for name, value in vars(defaults).items():
        if name in ("data", "output", "model", "extra"):
            continue
        if name == "quantize":
            add_quantize(t, choices=("8bit", "4bit"))
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            t.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=_HELP.get(name))
        else:
            kind = type(value) if value is not None else (int if name in ("stop_after", "limit") else str)
            t.add_argument(flag, type=kind, default=value, help=_HELP.get(name))
    t.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, fit the decoding tree to the new heads and this machine on the held-out "
                        "conversations (a brief `medusa calibrate`: two timing rounds; saved in tree.json for this "
                        "device type). Without it, or with nothing held out, a CPU decodes with the 8-node "
                        "cpu_8 preset and a GPU with mc_sim_7b_63 (64 nodes)")
    add_threads(t)
    return {"train": cmd_train}


def cmd_train(a) -> int:
    import os

    from medusa.training.trainer import TrainConfig, train

    fields = {k: v for k, v in vars(a).items() if k in TrainConfig.__dataclass_fields__}
    fields["quantize"] = quantize_of(a)
    cfg = TrainConfig(**fields)
    log = lambda m: print(m, flush=True)
    result = train(cfg, log=log)
    if a.calibrate and result.get("finished") and int(os.environ.get("RANK", "0")) == 0:
        from medusa.evaluation.calibrate import calibrate_trained

        calibrate_trained(cfg, log=log)
    return 0
