"""Helpers for the server tests: a real uvicorn server on a free loopback port, in a background thread."""
from __future__ import annotations

from conftest import random_heads, tiny_model, tiny_tokenizer
from medusa import MedusaModel
from medusa.interfaces.server import LocalServer, create_app


def tiny_medusa(arch: str = "llama", tree: str = "cpu_small") -> MedusaModel:
    """The tiny llama with random heads and a character-level tokenizer that has a chat template."""
    return MedusaModel(tiny_model(arch), random_heads(), tiny_tokenizer(), tree=tree)


LiveServer = LocalServer


def serve(model, **app_options) -> LiveServer:
    app_options.setdefault("model_name", "tiny")
    return LiveServer(create_app(model, **app_options))
