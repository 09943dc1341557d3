"""`medusa serve`: an OpenAI-compatible HTTP server (FastAPI) over one MedusaModel, and the chat page.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET / (chat page).
Requests run together on the engine worker (continuous batching, up to `max_batch` rows) behind a bounded
queue; a full queue is a 429.
"""
from __future__ import annotations

import hmac
import html
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medusa.interfaces.completions import Completer
from medusa.interfaces.engine_worker import MAX_BATCH, PREFILL_CHUNK, EngineWorker
from medusa.interfaces.openai_api import (APIError, ChatRequest, CompletionRequest, error_body, parse_request,
                                          validation_error)

MAX_BODY_BYTES = 1 << 20
JSON_TYPES = ("application/json", "text/json")


def create_app(model, *, model_name: str, api_key: str | None = None, queue_size: int = 16, max_batch: int = MAX_BATCH,
               defaults: dict | None = None, prefill_chunk: int | None = PREFILL_CHUNK) -> FastAPI:
    """The app for one model. `defaults`: keyword options for `model.stream` used where a request gives
    none (max_new_tokens, temperature, top_p, seed, ...). Without them requests decode greedily, unlike
    OpenAI's default temperature of 1: Medusa's greedy output is exactly the base model's greedy output.
    `max_batch`: requests decoded together; `queue_size`: requests that may wait beyond them; `prefill_chunk`:
    prompt tokens prefilled per step while other requests decode (None: a whole prompt at once)."""
    engine = EngineWorker(model, queue_size=queue_size, max_batch=max_batch, prefill_chunk=prefill_chunk)
    completer = Completer(model, engine, model_name, {"max_new_tokens": 512, **(defaults or {})})
    page = (resources.files("medusa.interfaces") / "static" / "chat.html").read_text(encoding="utf-8")
    page = page.replace("{{MODEL_NAME}}", html.escape(model_name))

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="medusa", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model_name = engine, model_name
    _add_error_handlers(app)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "medusa"}

    @app.get("/health")
    async def health():
        running = min(engine.pending, engine.max_batch)
        return {"status": "ok", "model": model_name, "running": running, "waiting": engine.pending - running,
                "max_batch": engine.max_batch, "queue_size": engine.queue_size}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def get_model(name: str):
        completer.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        req = parse_request(await _body(request), ChatRequest)
        completer.check_model(req.model)
        ids = completer.chat_ids([m.as_template_message() for m in req.messages])
        return await completer.answer(request, req, ids, "chat", req.max_completion_tokens or req.max_tokens)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request):
        req = parse_request(await _body(request), CompletionRequest)
        completer.check_model(req.model)
        return await completer.answer(request, req, completer.text_ids(req.prompt), "text", req.max_tokens)

    return app


async def _body(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise APIError(415, f"send the body as JSON with 'Content-Type: application/json', not '{ctype}'",
                       code="unsupported_media_type")
    too_big = APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise too_big
    return body


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        err = validation_error(e.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"),
                            status_code=500)


def serve(model, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          queue_size: int = 16, max_batch: int = MAX_BATCH, defaults: dict | None = None, log_level: str = "info",
          prefill_chunk: int | None = PREFILL_CHUNK) -> None:
    """Run the server until interrupted (see create_app for the options)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    app = create_app(model, model_name=model_name, api_key=api_key, queue_size=queue_size, max_batch=max_batch,
                     defaults=defaults, prefill_chunk=prefill_chunk)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class LocalServer:
    """`with LocalServer(app) as s:` serves `app` on 127.0.0.1:<free port> in a background thread; `s.url` is
    its base URL (tests, `medusa bench-serve`)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def engine(self):
        return self.app.state.engine

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the local server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
