"""Answering one completion request: prompt -> token ids, checks against the context, the engine job, and
the reply as one JSON object or as server-sent events."""
from __future__ import annotations

import torch
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from medusa.chat_format import encode_prompt
from medusa.interfaces.engine_worker import EngineWorker, Job, QueueFullError
from medusa.interfaces.openai_api import APIError, Reply, error_body, sse


class Completer:
    """`defaults`: keyword options for model.stream (max_new_tokens, temperature, ...) where a request has none."""

    def __init__(self, model, engine: EngineWorker, model_name: str, defaults: dict):
        self.model, self.engine, self.model_name, self.defaults = model, engine, model_name, defaults

    def check_model(self, name: str | None) -> None:
        """The served name, "default", or none at all."""
        if name not in (None, self.model_name, "default"):
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def chat_ids(self, messages: list[dict]) -> torch.Tensor:
        if len(messages) > 1 and not getattr(self.model.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template, so it cannot take a conversation: send one "
                                "message, or use /v1/completions", param="messages")
        try:
            return encode_prompt(self.model.tokenizer, messages)
        except Exception as e:  # the model's chat template rejects this conversation (e.g. the role order)
            raise APIError(400, f"the model's chat template rejects these messages: {e}", param="messages")

    def text_ids(self, prompt: str | list) -> torch.Tensor:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = self.model.heads.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = torch.tensor([prompt], dtype=torch.long)
        else:
            if isinstance(prompt, list) and len(prompt) != 1:
                raise APIError(400, "give one prompt (a string or a list of one string): the engine decodes one "
                                    "sequence at a time", param="prompt")
            text = prompt if isinstance(prompt, str) else prompt[0]
            ids = self.model.tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def options(self, req, n_prompt: int, max_new: int | None, kind: str) -> dict:
        """Keyword options for model.stream, after checking the prompt and max_tokens against the context."""
        limit = self.model.context_limit
        if n_prompt >= limit:
            raise APIError(400, f"the prompt is {n_prompt} tokens; the model's context is {limit}",
                           param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
        if max_new is not None and n_prompt + max_new > limit:
            raise APIError(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({max_new}) exceeds the model's "
                                f"context of {limit} tokens", param="max_tokens", code="context_length_exceeded")
        opts = {**self.defaults, "stop": req.stop_strings(),
                "max_new_tokens": max_new or min(self.defaults["max_new_tokens"], limit - n_prompt)}
        for key in ("temperature", "top_p", "seed"):
            if getattr(req, key) is not None:
                opts[key] = getattr(req, key)
        return opts

    async def answer(self, request: Request, req, ids: torch.Tensor, kind: str, max_new: int | None):
        options = self.options(req, ids.shape[1], max_new, kind)
        reply = Reply(kind, self.model_name, ids.shape[1])
        try:
            job = self.engine.submit(reply.id, ids, options, options["stop"])
        except QueueFullError as e:
            raise APIError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(event_stream(reply, job, request, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces = []
        async for event, value in job.stream(request.is_disconnected):
            if event == "text":
                pieces.append(value)
            elif event == "error":
                raise APIError(500, f"generation failed: {value}", type="server_error")
            else:
                return reply.whole("".join(pieces), value)
        return Response(status_code=499)  # the client went away: nobody reads this


async def event_stream(reply: Reply, job: Job, request: Request, include_usage: bool):
    """Server-sent events in OpenAI's chunk format: the role (chat), text pieces, a closing chunk with the
    finish reason, usage and Medusa's figures, the usage-only chunk if asked for, then `data: [DONE]`."""
    if reply.kind == "chat":
        yield sse(reply.chunk(role=True))
    async for event, value in job.stream(request.is_disconnected):
        if event == "text":
            yield sse(reply.chunk(value))
        elif event == "error":
            yield sse(error_body(f"generation failed: {value}", type="server_error"))
        else:
            yield sse(reply.chunk(stats=value))
            if include_usage:
                yield sse(reply.usage_chunk(value))
        if event != "text":
            yield sse("[DONE]")
