"""`medusa bench`, `calibrate` and `evaluate`: argument parsing only; the work is in medusa.evaluation."""
from __future__ import annotations

import argparse

from medusa.inference.quantized import device_of
from medusa.interfaces.cli_args import LoadOptions, add_threads, gen_options, model_args


def add_commands(sub) -> dict:
    b = sub.add_parser("bench", help="speed against transformers generate on MT-Bench / Spec-Bench questions",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model_args(b)
    b.set_defaults(max_new_tokens=256)
    b.add_argument("--questions", required=True,
                   help="question JSONL: MT-Bench / Spec-Bench (question_id, category, turns), e.g. Spec-Bench's "
                        "data/spec_bench/question.jsonl, or dev prompts (id, category, prompt)")
    b.add_argument("--output", default="bench", help="folder for answer files, summary.json and bench.png; "
                                                     "re-running into it skips questions already answered")
    b.add_argument("--limit", type=int, help="only the first N questions (after --categories)")
    b.add_argument("--categories", help="comma-separated categories to run, e.g. translation,rag")
    b.add_argument("--per-category", type=int, help="only N questions of each category, evenly spread through it")
    b.add_argument("--no-prompt-lookup", action="store_true", help="skip transformers' prompt-lookup decoding")
    b.add_argument("--no-plain", action="store_true", help="skip plain one-token-per-step decoding on our engine")
    b.add_argument("--prompt-lookup-num-tokens", type=int, default=10, help="prompt lookup's draft length")
    b.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    b.add_argument("--llama-cpp", nargs="?", const="same", metavar="GGUF",
                   help="also decode with llama.cpp (pip install llama-cpp-python): the model's own GGUF file, or "
                        "the one named"),
    b.add_argument("--batch-size", help="comma-separated batch sizes, e.g. 1,2,4,8,16: total tokens/s of medusa, "
                                        "plain batched decoding and batched generate over the questions' first turns "
                                        "(greedy), written to OUTPUT/batch.json and batch.png")
    c = sub.add_parser("calibrate", help="fit the tree to these heads and this machine; saves it in tree.json beside "
                                         "the heads, as the tree for this device type (cpu, cuda, ...)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model_args(c)
    c.add_argument("--data", help="ShareGPT JSONL (e.g. held-out distilled answers) to measure head accuracy on")
    c.add_argument("--prompts", help="or a prompt file: the model's own greedy answers are used")
    c.add_argument("--limit", type=int, default=40, help="conversations / prompts to use")
    c.add_argument("--budgets", default="1,4,8,12,16,24,32,48,64", help="node budgets to time")
    c.add_argument("--rounds", type=int, default=3,
                   help="timing passes over all budgets (12 steps each; medians over all): more on noisy machines")
    c.add_argument("--no-dynamic", action="store_true", help="static trees only (no dynamic:N trees)")
    c.add_argument("--save-to", help="folder for tree.json (default: the heads folder given by --model)")
    c.add_argument("--load-rows", default="1,2,4,8,16",
                   help="batch sizes to time steps at with the chosen tree, smaller ones and plain steps: the load "
                        "table a batch sizes its trees by, saved in tree.json ('' = none)")
    c.add_argument("--load-steps", type=int, default=6, help="timed steps per batch size, way and round")
    c.add_argument("--load-only", action="store_true",
                   help="keep the tree saved for this device type and time its load table only")
    _add_evaluate(sub)
    return {"bench": cmd_bench, "calibrate": cmd_calibrate, "evaluate": cmd_evaluate}


def _add_evaluate(sub) -> None:
    from medusa import chat_format
    from medusa.inference.lookup import DEFAULT

    e = sub.add_parser("evaluate", help="per-head top-k accuracy and mean tokens per step of a heads folder")
    e.add_argument("--model", help="heads folder (default: the shipped default heads)")
    e.add_argument("--base-model")
    e.add_argument("--data", help="held-out ShareGPT JSONL for per-head accuracy")
    e.add_argument("--prompts", help="prompt file (dev prompts, MT-Bench...) for tokens per step")
    e.add_argument("--limit", type=int, default=50)
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--tree")
    e.add_argument("--chat-template", metavar="FILE", help=chat_format.HELP)
    e.add_argument("--lookup", type=int, default=DEFAULT.max_tokens,
                   help="tokens per step of the heads alone are always measured; with N > 0, also with up to N "
                        "context-draft tokens per step (what decoding uses by default)")
    e.add_argument("--lookup-short", type=int, metavar="M",
                   help="context-draft tokens after a weak match (default 2; M = N drafts N on every match)")
    e.add_argument("--records", metavar="JSONL",
                   help="write a line per prompt here as it is done; re-running with the same file and settings "
                        "skips the prompts it holds (a long evaluation resumes)")
    e.add_argument("--dtype")
    add_threads(e)


def cmd_calibrate(a) -> int:
    import json
    import os

    import torch

    from medusa.evaluation.bench import machine
    from medusa.evaluation.calibrate import calibrate, examples_from_prompts, save_tree, timing_prompt
    from medusa.evaluation.calibrate_load import calibrate_load, saved_result, ways_to_time
    from medusa.model import DEFAULT_HEADS_DIR
    from medusa.training.data import read_conversations, tokenize_conversation
    from medusa.training.prompts import read_prompts

    if not (a.data or a.prompts or a.load_only):
        raise ValueError("give --data (conversations) or --prompts (a prompt file) to calibrate on")
    target = a.save_to or a.model or DEFAULT_HEADS_DIR
    model = LoadOptions.from_args(a).load()
    timing = timing_prompt(model.tokenizer)
    if a.load_only:
        result = saved_result(a.model or DEFAULT_HEADS_DIR, model.device_type)
    else:
        if a.data:
            examples = [tokenize_conversation(model.tokenizer, c, 1024) for c in read_conversations(a.data)[: a.limit]]
        else:
            examples = examples_from_prompts(model, read_prompts(a.prompts)[: a.limit])
        budgets = tuple(int(b) for b in a.budgets.split(","))
        result = calibrate(model, examples, timing, budgets=budgets, rounds=a.rounds, dynamic=not a.no_dynamic,
                           log=lambda s: print(s, flush=True))
    load_rows = [int(b) for b in a.load_rows.split(",") if b.strip()]
    if load_rows and (ways := ways_to_time(result)):
        device = device_of(model.base_model.get_input_embeddings())
        result["load"] = calibrate_load(model, timing, ways, rows=load_rows, rounds=a.rounds, steps=a.load_steps,
                                        machine=f"{machine(device)}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads",
                                        log=lambda s: print(s, flush=True))
    path = save_tree(target, result, model.device_type)
    best = result["best"]
    print(json.dumps({"saved": str(path), "nodes": best["nodes"], "dynamic": best["dynamic"], "expected_tokens_per_step":
                      best["expected_tokens_per_step"], "expected_tokens_per_s": best["expected_tokens_per_s"],
                      "nodes_by_rows": {b: len(result["load"].best(b).paths) + 1 for b in load_rows}
                      if result.get("load") else None}))
    return 0


def cmd_bench(a) -> int:
    from pathlib import Path

    from medusa.evaluation.bench import BenchConfig, run_bench
    from medusa.evaluation.report import format_table
    from medusa.inference.loading import DEFAULT_MODEL_NAME

    if not Path(a.questions).is_file():
        raise FileNotFoundError(f"question file not found: {a.questions} (Spec-Bench's is data/spec_bench/"
                                f"question.jsonl in its repository)")
    gen_options(a)                                   # refused before loading
    if a.batch_size and any(b < 1 for b in _batch_sizes(a)):
        raise ValueError(f"--batch-size takes sizes >= 1, got {a.batch_size}")
    model = LoadOptions.from_args(a).load()
    name = Path(a.model.rstrip("/")).name if a.model else DEFAULT_MODEL_NAME
    if a.batch_size:
        return _batch_bench(a, model, name)
    cfg = BenchConfig(questions=a.questions, output=a.output, max_new_tokens=a.max_new_tokens, limit=a.limit,
                      categories=tuple(c.strip() for c in (a.categories or "").split(",") if c.strip()),
                      per_category=a.per_category, temperature=a.temperature, top_p=a.top_p, sampling=a.sampling,
                      seed=a.seed or 0,
                      prompt_lookup=not a.no_prompt_lookup, plain=not a.no_plain,
                      prompt_lookup_num_tokens=a.prompt_lookup_num_tokens, warmup=not a.no_warmup,
                      llama_cpp_gguf=_llama_cpp_gguf(a),
                      model_id=f"{name}-{str(model.base_model.dtype).removeprefix('torch.')}")
    summary = run_bench(model, cfg)
    print(format_table(summary))
    print(f"speedup = medusa tokens/s / transformers generate tokens/s; each tokens/s = total new tokens / "
          f"total wall time ({summary['overall']['answers']} answers, {a.max_new_tokens} new tokens at most)")
    return 0


def _llama_cpp_gguf(a) -> str | None:
    """--llama-cpp's file: the one named, or the GGUF file the model loads from."""
    from medusa.inference.loading import gguf_file

    if a.llama_cpp != "same":
        return a.llama_cpp
    source = a.base_model or a.model
    path = gguf_file(source) if source is None or str(source).endswith(".gguf") else None
    if path is None:
        raise ValueError("--llama-cpp: name the GGUF file (--llama-cpp FILE); the model's own is known only for the "
                         "default model or a .gguf --model / --base-model")
    return str(path)


def _batch_sizes(a) -> list[int]:
    try:
        return [int(b) for b in a.batch_size.split(",")]
    except ValueError:
        raise ValueError(f"--batch-size takes comma-separated whole numbers, got {a.batch_size!r}") from None


def _batch_bench(a, model, name: str) -> int:
    from pathlib import Path

    import torch

    from medusa.evaluation import batch_bench
    from medusa.evaluation.bench import load_questions, machine
    from medusa.inference.tree import tree_label
    from medusa.chat_format import encode_prompt

    sizes = _batch_sizes(a)
    questions = load_questions(a.questions, limit=a.limit, per_category=a.per_category,
                               categories=tuple(c.strip() for c in (a.categories or "").split(",") if c.strip()))
    device = device_of(model.base_model.get_input_embeddings())
    prompts = [encode_prompt(model.tokenizer, [{"role": "user", "content": q.turns[0]}])[0].to(device)
               for q in questions]
    result = batch_bench.run_batch_bench(model, prompts, sizes, a.max_new_tokens, warmup=not a.no_warmup)
    result["settings"] = {"model_id": name, "dtype": str(model.base_model.dtype), "machine": machine(device),
                          "threads": torch.get_num_threads(), "tree": tree_label(model.tree),
                          "questions": a.questions, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
                          "title": f"{name}, {len(prompts)} prompts, {torch.get_num_threads()} threads"}
    batch_bench.write(Path(a.output), result)
    print(batch_bench.format_table(result))
    return 0


def cmd_evaluate(a) -> int:
    import json
    import sys

    from medusa.chat_format import read_template, use_template
    from medusa.evaluation.tokens_per_step import tokens_per_step
    from medusa.model import MedusaModel
    from medusa.training.accuracy import head_accuracy
    from medusa.training.data import read_conversations, tokenize_conversation
    from medusa.training.prompts import read_prompts

    if not (a.data or a.prompts):
        raise ValueError("give --data (held-out conversations) and/or --prompts (a prompt file)")
    lookup = a.lookup
    if a.lookup_short is not None:      # checked before any loading
        from medusa.inference.lookup import with_max_tokens

        lookup = with_max_tokens(a.lookup, a.lookup_short)
    if a.chat_template:
        read_template(a.chat_template)
    m = MedusaModel.from_pretrained(a.model, base_model=a.base_model, dtype=a.dtype, tree=a.tree)
    use_template(m.tokenizer, a.chat_template, lambda s: print(s, file=sys.stderr, flush=True))
    report = {}
    if a.data:
        examples = [tokenize_conversation(m.tokenizer, c, 1024) for c in read_conversations(a.data)[: a.limit]]
        report["head_accuracy"] = head_accuracy(m.base_model, m.heads, examples)
    if a.prompts:
        log = lambda s: print(s, flush=True)
        prompts = read_prompts(a.prompts)[: a.limit]
        settings = {"model": a.model, "base_model": a.base_model}   # + the tree, device and dtype in use
        runs = dict(records=a.records, max_new_tokens=a.max_new_tokens, log=log)
        report["greedy"] = tokens_per_step(m, prompts, lookup=0, run="greedy", settings=settings, **runs)
        if a.lookup:
            report["greedy_with_context_drafts"] = tokens_per_step(
                m, prompts, lookup=lookup, run="greedy_with_context_drafts",
                settings=settings | {"lookup": a.lookup, "lookup_short": a.lookup_short}, **runs) | {"lookup": a.lookup}
            if a.lookup_short is not None:
                report["greedy_with_context_drafts"]["lookup_short"] = a.lookup_short
    print(json.dumps(report, indent=2))
    return 0
