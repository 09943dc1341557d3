"""`medusa serve`: argument parsing only; the server is medusa.interfaces.server."""
from __future__ import annotations

import os

from medusa.interfaces.cli import LoadOptions, _model_args, gen_options


def add_commands(sub) -> dict:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server and chat page (requests batched together)")
    _model_args(s)  # the generation flags are the defaults for requests that leave them out
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("MEDUSA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                        "(default: $MEDUSA_API_KEY; none = open)")
    g.add_argument("--served-model-name", help="the model id clients send and /v1/models lists "
                                               "(default: --model, or the embedded model's name)")
    g.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together (continuous batching: a finished one's row takes the next)")
    g.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait while the batch is full; more get 429 at once")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return {"serve": cmd_serve}


def cmd_serve(a) -> int:
    from medusa.inference.loading import DEFAULT_MODEL_NAME
    from medusa.interfaces.server import serve

    defaults = gen_options(a)
    model = LoadOptions.from_args(a).load()
    name = a.served_model_name or (a.model.rstrip("/") if a.model else DEFAULT_MODEL_NAME)
    serve(model, model_name=name, host=a.host, port=a.port, api_key=a.api_key, queue_size=a.queue_size,
          max_batch=a.max_batch, defaults=defaults, log_level=a.log_level)
    return 0
