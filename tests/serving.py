"""Helpers for the server tests: a real uvicorn server on a free loopback port, in a background thread."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from conftest import random_heads, tiny_model, tiny_tokenizer
from medusa import MedusaModel
from medusa.interfaces.server import create_app


def tiny_medusa(arch: str = "llama", tree: str = "cpu_small") -> MedusaModel:
    """The tiny llama with random heads and a character-level tokenizer that has a chat template."""
    return MedusaModel(tiny_model(arch), random_heads(), tiny_tokenizer(), tree=tree)


class LiveServer:
    """`with LiveServer(app) as s:` serves `app` on 127.0.0.1:<free port>; `s.url` is its base URL."""

    def __init__(self, app):
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

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def serve(model, **app_options) -> LiveServer:
    app_options.setdefault("model_name", "tiny")
    return LiveServer(create_app(model, **app_options))
