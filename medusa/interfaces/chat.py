"""Chat in the terminal, and one-shot generation (medusa or the plain transformers baseline)."""
from __future__ import annotations

import sys
import time

import torch

from medusa.chat_format import encode_prompt
from medusa.interfaces.textstream import RunStats, TextStream, stream_text


def generate_once(model, ids: torch.Tensor, options: dict, *, baseline: bool = False, on_text=None):
    """Answer once; returns (text, RunStats). `baseline` decodes with transformers' own generate."""
    stats = RunStats()
    if baseline:
        t0 = time.perf_counter()
        out = model.generate_baseline(ids, **options)
        stats.seconds = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        stats.new_tokens = stats.steps = len(new)
        stats.finish_reason = "length" if len(new) >= model.decode_options(**options).max_new_tokens else "eos"
        text = TextStream(model.tokenizer).push(new) if new else ""
        if on_text:
            on_text(text)
        return text, stats
    pieces = []
    for piece in stream_text(model.stream(ids, **options), model.tokenizer, stats):
        pieces.append(piece)
        if on_text:
            on_text(piece)
    return "".join(pieces), stats


class ChatSession:
    """Multi-turn chat. Interactive: a prompt, /reset, /exit. Piped stdin: answers each line, exits at EOF."""

    def __init__(self, model, options: dict):
        self.model, self.options, self.history = model, options, []

    def run(self, stdin, stdout) -> None:
        interactive = stdin.isatty()
        if interactive:
            print("Type a message; /reset clears the conversation, /exit quits.", file=sys.stderr)
        while True:
            if interactive:
                stdout.write(">>> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                self.history = []
                print("(conversation cleared)", file=sys.stderr)
                continue
            self.answer(text, stdout)

    def answer(self, text: str, stdout) -> str:
        self.history.append({"role": "user", "content": text})
        ids = encode_prompt(self.model.tokenizer, self.history)
        if ids.shape[1] >= self.model.context_limit:
            self.history.pop()
            print(f"(message too long: {ids.shape[1]} tokens, context is {self.model.context_limit}; "
                  f"use /reset)", file=sys.stderr)
            return ""
        write = lambda s: (stdout.write(s), stdout.flush())
        reply, stats = generate_once(self.model, ids, self.options, on_text=write)
        stdout.write("\n")
        stdout.flush()
        print(f"[{stats.new_tokens} tokens in {stats.seconds:.2f} s: {stats.tokens_per_s:.1f} tokens/s, "
              f"{stats.tokens_per_step:.2f} tokens/step]", file=sys.stderr, flush=True)
        self.history.append({"role": "assistant", "content": reply})
        return reply
