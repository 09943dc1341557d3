"""Training data: ShareGPT conversations -> token ids with a mask that is 1 only on assistant tokens."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from medusa.chat_format import render, special_tokens

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Example:
    input_ids: torch.Tensor   # (T,) long
    loss_mask: torch.Tensor   # (T,) bool: True where the token was written by the assistant


def read_conversations(path: str | Path, *, warn=None) -> list[list[dict]]:
    """ShareGPT JSONL (`conversations` of {from, value}) -> lists of chat messages. Bad lines are skipped."""
    warn = warn or (lambda m: print(m, file=sys.stderr))
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conv = json.loads(line)["conversations"]
                msgs = [{"role": _ROLES[t["from"]], "content": t["value"]} for t in conv]
                if not any(m["role"] == "assistant" and m["content"] for m in msgs):
                    raise ValueError("no assistant turn")
            except (ValueError, KeyError, TypeError) as e:
                warn(f"{path}:{line_no}: skipped ({type(e).__name__}: {e})")
                continue
            out.append(msgs)
    return out


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> Example:
    """Render with the chat template (plain text without one: chat_format); mark the characters of each
    assistant turn (through its end-of-turn marker) and map them to tokens through the tokenizer's offsets."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:j])
        through = render(tokenizer, messages[: j + 1], add_generation_prompt=False)
        if not full.startswith(through) or not through.startswith(before):
            raise ValueError("chat template renders turns inconsistently; cannot locate assistant tokens")
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=special_tokens(tokenizer), return_offsets_mapping=True, truncation=True,
                    max_length=max_length)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for k, (start, end) in enumerate(enc["offset_mapping"]):
        mask[k] = any(s <= start and end <= e and end > start for s, e in spans)
    return Example(ids, mask)


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, loss_mask (B, T)."""
    T = max(e.input_ids.numel() for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    loss = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = e.input_ids.numel()
        ids[i, :n], attn[i, :n], loss[i, :n] = e.input_ids, 1, e.loss_mask
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
