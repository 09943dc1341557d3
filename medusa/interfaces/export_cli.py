"""`medusa export` and `push`: argument parsing only; the work is in medusa.integrations (export to serving
engines' formats, push to the Hub)."""
from __future__ import annotations

import sys


def add_commands(sub) -> dict:
    from medusa.integrations.export import FORMATS

    e = sub.add_parser("export", help="write heads in the format vLLM, TGI or TensorRT-LLM loads")
    e.add_argument("--model", help="heads folder (ours or the original Medusa format); default: the default "
                                   "model's heads")
    e.add_argument("--format", choices=FORMATS, default="original",
                   help="original (the default): TGI and TensorRT-LLM (config.json + medusa_lm_head.safetensors); "
                        "vllm: vLLM's Medusa draft (config.json + model.safetensors); "
                        "ours: medusa_config.json + heads.safetensors")
    e.add_argument("--output", required=True, help="folder to write (must be empty unless --force)")
    e.add_argument("--base-model", help="base model to load when the heads share its lm_head "
                                        "(default: the one the heads name)")
    e.add_argument("--base-name", help="base model reference written for the engine, e.g. a Hub id (default: "
                                       "--base-model, else the heads' own; the embedded default becomes "
                                       "HuggingFaceTB/SmolLM2-135M-Instruct)")
    e.add_argument("--dtype", help="float16, bfloat16 or float32 (default: as stored)")
    e.add_argument("--force", action="store_true", help="write into a non-empty output folder")

    p = sub.add_parser("push", help="check a heads folder, write its model card, upload it to the Hugging Face Hub")
    p.add_argument("--folder", required=True, help="heads folder (ours or the original Medusa format)")
    p.add_argument("--repo", required=True, help="Hub model repo, e.g. you/medusa-smollm2 (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN, then `hf auth login`'s; prefer those: a "
                                   "token on the command line lands in shell history)")
    p.add_argument("--message", default="Upload Medusa heads", help="commit message")
    p.add_argument("--no-check-base", action="store_true", help="check the heads alone, not against their base")
    return {"export": cmd_export, "push": cmd_push}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_export(a) -> int:
    from medusa.integrations.export import export

    out = export(a.model, a.output, a.format, base_model=a.base_model, base_name=a.base_name, dtype=a.dtype,
                 overwrite=a.force, log=_log)
    print(f"{a.format} format written to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


def cmd_push(a) -> int:
    from medusa.integrations.hub import push

    url = push(a.folder, a.repo, token=a.token, private=a.private, commit_message=a.message,
               check_base=not a.no_check_base, log=_log)
    print(url)
    return 0
