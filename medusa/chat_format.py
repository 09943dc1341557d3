"""How messages become a prompt: the model's chat template, one from a file (`--chat-template FILE`), or, for a
model without one (a base model's GGUF), plain text; and which tokens end the model's turn.

Every command goes through here, so a model without a template is treated alike everywhere: one notice when
it loads, then plain text. Plain text is what a base model continues: one message is its content as it is;
a conversation is its messages in order, an answer straight after the message it answers (as the model wrote
it), any other message after a blank line.
"""
from __future__ import annotations

from pathlib import Path

import torch

HELP = ("a Jinja chat template file, set as the tokenizer's chat_template: for a model without one (a base "
        "model's GGUF), whose prompts otherwise go in as plain text")


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_text(messages: list[dict]) -> str:
    """A conversation as plain text, for a model without a chat template (see the module's docstring)."""
    text = ""
    for k, m in enumerate(messages):
        if k and m["role"] != "assistant":
            text += "\n\n"
        text += m["content"]
    return text


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """The prompt text: the chat template's rendering, or `plain_text` without one (whose answers need no
    generation prompt: they follow the text directly)."""
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return plain_text(messages)


def special_tokens(tokenizer) -> bool:
    """Whether the rendered text is tokenized with the tokenizer's own special tokens (a BOS): a template
    writes them itself; plain text gets them as any text does."""
    return not has_template(tokenizer)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Messages -> the ids the model answers after."""
    return tokenizer(render(tokenizer, messages), add_special_tokens=special_tokens(tokenizer))["input_ids"]


def encode_prompt(tokenizer, messages: list[dict], *, chat: bool = True) -> torch.Tensor:
    """Messages -> (1, T) ids with the model's chat template (plain text without one, see above); `chat=False`:
    the last message's raw text."""
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        return enc["input_ids"]
    return tokenizer(plain_text(messages) if chat else messages[-1]["content"], return_tensors="pt")["input_ids"]


def _ids(value) -> tuple[int, ...]:
    """None, an id, or a list of ids -> a tuple of ids."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def eos_token_ids(model, tokenizer=None, given=None) -> tuple[int, ...]:
    """The tokens that end a turn: `given` when the caller names them (an id or a list; [] = none), else the
    model's generation config's end-of-sequence ids and the tokenizer's (a chat's end of turn), in that
    order, each once."""
    if given is not None:
        return _ids(given)
    found = _ids(model.generation_config.eos_token_id) + _ids(getattr(tokenizer, "eos_token_id", None))
    return tuple(dict.fromkeys(found))


def read_template(path) -> str:
    """A chat template file's text; a file that cannot be read or is empty is refused, naming it."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"chat template {path}: cannot read it ({e})") from None
    if not text.strip():
        raise ValueError(f"chat template {path} is empty")
    return text


def use_template(tokenizer, path, log) -> None:
    """At load: set the template in `path` (a Jinja file) on `tokenizer`, refused naming the file where it
    cannot render a user message; without `path`, say once through `log` when the model has no template."""
    from jinja2 import TemplateError

    if path is not None:
        tokenizer.chat_template = read_template(path)
        try:
            render(tokenizer, [{"role": "user", "content": "Hello"}])
        except (TemplateError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"chat template {path} does not render a user message: {e}") from None
    elif not has_template(tokenizer):
        log(f"{getattr(tokenizer, 'name_or_path', '') or 'The model'} has no chat template: prompts go in as "
            f"plain text, a conversation's messages one after another (--chat-template FILE sets a template)")
