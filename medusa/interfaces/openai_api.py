"""The OpenAI wire format: request models (strict types), error bodies, response and stream-chunk objects."""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medusa.interfaces.textstream import RunStats

# the decode loop's finish reasons -> OpenAI's
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", None: "stop"}
# accepted by OpenAI, not by us: a 400 when set to anything but their neutral value
UNSUPPORTED = {"tools": (None, []), "functions": (None, []), "logprobs": (None, False), "top_logprobs": (None, 0),
               "logit_bias": (None, {}), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
               "response_format": (None, {"type": "text"})}
# torch seeds its generators from any integer that fits in 64 bits, signed or not
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
# where a body too deep for the JSON parser is refused, the top-level field nesting deeper than this is named
MAX_NESTING = 100


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4 or not all(stop):
            raise APIError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings",
                           param="stop")
        return tuple(stop)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]


def parse_request(raw: bytes, model_cls: type[_Strict]) -> _Strict:
    """Body bytes -> request model, or an APIError (400) naming the offending parameter."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}")
    except RecursionError:
        field = deep_field(raw.decode(json.detect_encoding(raw), "replace"), MAX_NESTING)
        raise APIError(400, f"{field or 'the body'}: JSON nested more than {MAX_NESTING} levels deep",
                       param=field, code="invalid_value")
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    if (where := lone_surrogate(data)) is not None:
        raise APIError(400, f"{where or 'the body'}: a string holds a lone UTF-16 surrogate (such as \\ud800), "
                            f"which is not text", param=where or None, code="invalid_value")
    for key, neutral in UNSUPPORTED.items():
        if key in data and data[key] not in neutral:
            raise APIError(400, f"{key} is not supported by this server", param=key, code="unsupported_parameter")
    try:
        req = model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors())
    if req.n != 1:
        raise APIError(400, "only n=1 is supported (the engine decodes one sequence at a time)", param="n")
    return req


_JSON_TOKEN = re.compile(r'("(?:[^"\\]|\\.)*")(\s*:)?|[\[{\]}]')   # a string (a key if a colon follows), a bracket


def deep_field(text: str, limit: int) -> str | None:
    """The top-level key of the JSON object `text` under which nesting first passes `limit` levels (None: the
    body itself nests that deep, or nothing does). Reads `text` only up to that point."""
    depth, key = 0, None
    for m in _JSON_TOKEN.finditer(text):
        if m.group(1):
            if m.group(2) and depth == 1:
                key = m.group(1)[1:-1]
        elif m.group() in "[{":
            depth += 1
            if depth > limit:
                return key
        else:
            depth -= 1
    return None


def lone_surrogate(data) -> str | None:
    """The path ("messages.0.content") of a string in parsed JSON, key or value, that holds a lone surrogate
    (JSON's "\\ud800" escape decodes to one): not text, so no tokenizer or UTF-8 encoder takes it. A bad key
    gives its object's path ("" for the body's own keys); None when every string is text."""
    stack = [(data, None)]                     # (value, (key, parent entry) or None): paths built on demand
    while stack:
        value, at = stack.pop()
        if isinstance(value, str) and not _is_text(value):
            return _path(at)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(key, str) and not _is_text(key):
                return _path(at)
            stack.append((item, (str(key), at)))
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path(at) -> str:
    parts = []
    while at is not None:
        key, at = at
        parts.append(key)
    return ".".join(reversed(parts))


def validation_error(errors) -> APIError:
    """The first pydantic / FastAPI validation error as an OpenAI-style 400."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    # drop pydantic's union-member tags (e.g. 'str', 'list[TextPart]') from the parameter path
    param = ".".join(p for p in loc if not (p[0].isalpha() and ("[" in p or p in ("str", "int", "float"))))
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{err.get('msg', 'invalid value')}", param=param or None, code="invalid_value")


# ---------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def medusa_stats(stats: RunStats) -> dict:
    return {"tokens_per_step": round(stats.tokens_per_step, 3), "tokens_per_s": round(stats.tokens_per_s, 2),
            "steps": stats.steps, "seconds": round(stats.seconds, 4)}


class Reply:
    """One answer's fixed fields, and the objects sent for it (whole, or chunk by chunk)."""

    def __init__(self, kind: str, model: str, prompt_tokens: int):
        self.kind, self.model, self.prompt_tokens = kind, model, prompt_tokens
        self.id, self.created = new_id(kind), int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, *, delta: dict | None = None) -> dict:
        if self.kind == "chat":
            body = {"delta": delta} if delta is not None else {"message": {"role": "assistant", "content": text}}
            return {"index": 0, **body, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, stats: RunStats) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [self._choice(text, FINISH_REASONS.get(stats.finish_reason, "stop"))],
                "usage": usage(self.prompt_tokens, stats.new_tokens), "medusa": medusa_stats(stats)}

    def chunk(self, text: str | None = None, *, role: bool = False, stats: RunStats | None = None) -> dict:
        """A stream chunk: the role (chat, first), a piece of text, or with `stats` the closing one."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        finish = FINISH_REASONS.get(stats.finish_reason, "stop") if stats else None
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {"content": text} if text is not None else {}
            choice = self._choice(None, finish, delta=delta)
        else:
            choice = self._choice(text or "", finish)
        out = {**self._head(obj), "choices": [choice]}
        if stats:
            out.update(usage=usage(self.prompt_tokens, stats.new_tokens), medusa=medusa_stats(stats))
        return out

    def usage_chunk(self, stats: RunStats) -> dict:
        """The extra last chunk of `stream_options.include_usage`: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(self.prompt_tokens, stats.new_tokens),
                "medusa": medusa_stats(stats)}


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
