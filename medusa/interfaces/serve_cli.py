"""`medusa serve`: argument parsing only; the server is medusa.interfaces.server."""
from __future__ import annotations

import os

from medusa.inference.quantized import device_of
from medusa.interfaces.cli_args import LoadOptions, gen_options, model_args


def add_commands(sub) -> dict:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server and chat page (requests batched together)")
    model_args(s)  # the generation flags are the defaults for requests that leave them out
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("MEDUSA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                        "(default: $MEDUSA_API_KEY; none = open)")
    g.add_argument("--served-model-name", help="the model id clients send and /v1/models lists "
                                               "(default: --model, or the embedded model's name)")
    g.add_argument("--max-batch", type=int, default=16,   # engine_worker.MAX_BATCH
                   help="requests decoded together (continuous batching: a finished one's row takes the next)")
    g.add_argument("--prefill-chunk", type=int, metavar="N",
                   help="prompt tokens prefilled per step while other requests decode, so a long prompt joining "
                        "does not stall them for all of it (default 256; with medusa_tree attention a multiple of 64)")
    g.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait while the batch is full; more get 429 at once")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    b = sub.add_parser("bench-serve", help="the batching server under 1, 2, 4, ... concurrent clients: medusa "
                                           "against plain decoding and one request at a time")
    model_args(b)
    b.set_defaults(max_new_tokens=128)
    b.add_argument("--questions", required=True, help="question JSONL (Spec-Bench / MT-Bench or dev prompts): "
                                                      "each client asks first turns")
    b.add_argument("--limit", type=int, help="only the first N questions")
    b.add_argument("--per-category", type=int, help="only N questions of each category, evenly spread")
    b.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated client counts")
    b.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    b.add_argument("--rounds", type=int, default=1, help="runs of every cell (settings rotating): the median is "
                                                         "reported")
    b.add_argument("--output", default="bench-serve", help="folder for serve.json and serve.png")
    b.add_argument("--soak", type=int, metavar="N",
                   help="instead: a soak of N requests from --clients clients (streaming and not, hang-ups, "
                        "malformed bodies): 5xx count, cross-talk, health and memory at the end, to OUTPUT/soak.json")
    b.add_argument("--clients", type=int, default=16, help="the soak's concurrent clients")
    return {"serve": cmd_serve, "bench-serve": cmd_bench_serve}


def cmd_serve(a) -> int:
    from medusa.inference.loading import DEFAULT_MODEL_NAME
    from medusa.interfaces.engine_worker import PREFILL_CHUNK
    from medusa.interfaces.server import serve

    defaults = gen_options(a)
    model = LoadOptions.from_args(a).load()
    name = a.served_model_name or (a.model.rstrip("/") if a.model else DEFAULT_MODEL_NAME)
    serve(model, model_name=name, host=a.host, port=a.port, api_key=a.api_key, queue_size=a.queue_size,
          max_batch=a.max_batch, defaults=defaults, log_level=a.log_level,
          prefill_chunk=PREFILL_CHUNK if a.prefill_chunk is None else a.prefill_chunk)
    return 0


def cmd_bench_serve(a) -> int:
    from pathlib import Path

    import torch

    from medusa.evaluation.bench import load_questions, machine
    from medusa.inference.loading import DEFAULT_MODEL_NAME
    from medusa.interfaces import serve_bench

    clients = [int(c) for c in a.concurrency.split(",")]
    if any(c < 1 for c in clients) or a.max_batch < 1 or a.rounds < 1:
        raise ValueError(f"--concurrency, --max-batch and --rounds take counts >= 1, got {a.concurrency}, "
                         f"{a.max_batch} and {a.rounds}")
    prompts = [q.turns[0] for q in load_questions(a.questions, limit=a.limit, per_category=a.per_category)]
    model = LoadOptions.from_args(a).load()
    name = a.model.rstrip("/") if a.model else DEFAULT_MODEL_NAME
    if a.soak is not None:
        return _soak(a, model, prompts)
    result = serve_bench.run_serve_bench(model, prompts, clients, a.max_new_tokens, max_batch=a.max_batch,
                                         rounds=a.rounds)
    threads = torch.get_num_threads()
    result["settings"] = {"model_id": name, "dtype": str(model.base_model.dtype), "threads": threads,
                          "machine": machine(device_of(model.base_model.get_input_embeddings())),
                          "max_batch": a.max_batch, "rounds": a.rounds, "questions": a.questions,
                          "prompts": len(prompts),
                          "max_new_tokens": a.max_new_tokens,
                          "title": f"{Path(name).name}, {len(prompts)} prompts, {threads} threads, "
                                   f"max batch {a.max_batch}"}
    serve_bench.write(Path(a.output), result)
    print(serve_bench.format_table(result))
    return 0


def _soak(a, model, prompts: list[str]) -> int:
    import json
    from pathlib import Path

    from medusa.interfaces.soak import run_soak

    if a.soak < 1 or a.clients < 1:
        raise ValueError(f"--soak and --clients take counts >= 1, got {a.soak} and {a.clients}")
    report = run_soak(model, prompts, requests=a.soak, clients=a.clients, max_tokens=a.max_new_tokens,
                      max_batch=a.max_batch)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["server_errors"] == 0 and report["cross_talk"] == 0 and report["healthy_at_end"] else 1
