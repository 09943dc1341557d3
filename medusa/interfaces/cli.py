"""The `medusa` command: parses arguments into option objects and calls library functions."""
from __future__ import annotations

import argparse
import json
import sys

from medusa.interfaces.cli_args import LoadOptions, gen_options, model_args, set_threads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medusa", description="Faster decoding with Medusa heads.")
    sub = p.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="interactive multi-turn chat (answers each stdin line when piped)")
    model_args(chat)
    gen = sub.add_parser("generate", help="answer one prompt")
    model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--baseline", action="store_true", help="decode plainly with transformers generate instead")
    gen.add_argument("--json", action="store_true", help="print text and figures as JSON")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    return p, sub


def cmd_chat(a) -> int:
    from medusa.interfaces.chat import ChatSession

    options = gen_options(a)
    ChatSession(LoadOptions.from_args(a).load(), options).run(sys.stdin, sys.stdout)
    return 0


def cmd_generate(a) -> int:
    from medusa.chat_format import encode_prompt
    from medusa.interfaces.chat import generate_once

    options = gen_options(a)
    model = LoadOptions.from_args(a).load()
    ids = encode_prompt(model.tokenizer, [{"role": "user", "content": a.prompt}], chat=not a.no_chat_template)
    on_text = None if a.json else (lambda s: print(s, end="", flush=True))
    text, stats = generate_once(model, ids, options, baseline=a.baseline, on_text=on_text)
    if a.json:
        print(json.dumps({"text": text, "mode": "baseline" if a.baseline else "medusa", **stats.as_dict()}))
    else:
        print()
        print(f"[{stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s, "
              f"{stats.tokens_per_step:.2f} tokens/step]", file=sys.stderr)
    return 0


# Each of these modules has `add_commands(subparsers) -> {name: handler}`; they parse, the library works.
COMMAND_MODULES = ["medusa.interfaces.train_cli", "medusa.interfaces.export_cli", "medusa.interfaces.serve_cli",
                   "medusa.interfaces.eval_cli"]


def build_cli() -> tuple[argparse.ArgumentParser, dict]:
    import importlib

    parser, sub = build_parser()
    handlers = {"chat": cmd_chat, "generate": cmd_generate}
    for name in COMMAND_MODULES:
        handlers.update(importlib.import_module(name).add_commands(sub))
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_cli()
    args = parser.parse_args(argv)
    handler = handlers[args.command]
    try:
        set_threads(args)
        return handler(args)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"medusa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
