"""Self-distillation: the base model answers prompts, and its answers become the heads' training data.

Output is ShareGPT-format JSONL, one conversation per line, appended as answers complete and fsynced, so a
killed run loses at most the answers in flight and a re-run skips every prompt already answered. Rows already
in the file stay as they are, whoever wrote them; only a torn last line is cut.
Two back ends: local generation with continuous batching (`continuous.py`), or any OpenAI-compatible
endpoint (`api_base`).
"""
from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from medusa.inference import packed_linear
from medusa.training.continuous import ContinuousBatcher
from medusa.training.jsonl import append_rows, read_rows
from medusa.training.prompts import PromptRecord, read_prompts


@dataclass
class DistillConfig:
    inputs: list[str]
    output: str
    model: str | None = None          # base model; None = the embedded default
    chat_template: str | None = None  # a Jinja file for a model without a template (else plain text: chat_format)
    max_new_tokens: int = 512
    batch_size: int = 32              # answers decoded side by side (API: records per round)
    temperature: float = 0.0          # 0 = greedy: the data then matches greedy decoding exactly
    top_p: float = 1.0
    limit: int | None = None
    api_base: str | None = None       # e.g. http://127.0.0.1:8000/v1 (vLLM, TGI, medusa serve)
    api_model: str | None = None
    api_key: str | None = None
    concurrency: int = 8
    dtype: str | None = None
    device: str | None = None
    pack_weights: str = "auto"        # fp32 CPU weights packed for decoding's products (packed_linear.packing)
    extra: list[PromptRecord] = field(default_factory=list)

    def __post_init__(self):
        """Refuse what cannot run before a prompt is read or the model loads."""
        from medusa.inference.acceptance import SamplingOptions

        for name in ("max_new_tokens", "batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        SamplingOptions(temperature=self.temperature, top_p=self.top_p)     # its own refusals


def done_ids(output: Path, *, warn=None) -> set[str]:
    """Ids already answered in `output` (see `read_rows`); rows without an id answer nothing."""
    return {row["id"] for _, row in read_rows(output, warn=warn) if isinstance(row.get("id"), str)}


def _row(rec: PromptRecord, answers: list[str], new_tokens: int, finish: str) -> dict:
    conv = []
    for q, a in zip(rec.turns, answers):
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    row = {"id": rec.id, "conversations": conv, "new_tokens": new_tokens, "finish_reason": finish}
    if rec.category:
        row["category"] = rec.category
    return row


class LocalGenerator:
    """The model in this process, `batch_size` answers decoded side by side (continuous batching: a finished
    answer's slot takes the next prompt at once)."""

    def __init__(self, model, tokenizer, cfg: DistillConfig, log=None):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self.batcher = ContinuousBatcher(model, tokenizer, slots=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                         temperature=cfg.temperature, top_p=cfg.top_p)

    def prompt_len(self, rec: PromptRecord) -> int:
        return len(rec.turns[0])

    def stream(self, recs: list[PromptRecord]) -> Iterator[list[dict]]:
        """Rows in the order of `recs`, each as soon as it and every row before it are answered: the file's
        order does not depend on how long answers run (a kill loses the few held back, as in flight)."""
        position = {id(r): k for k, r in enumerate(recs)}
        ready, emitted = {}, 0
        for done in self.batcher.run(recs):
            if done.finish == "context":
                self.log(f"skipped {done.rec.id}: turn {done.turn + 1} is longer than the model's context")
            ready[position[id(done.rec)]] = None if done.finish == "context" else \
                _row(done.rec, done.answers, done.new_tokens, done.finish)
            rows = []
            while emitted in ready:
                row = ready.pop(emitted)
                rows += [row] if row is not None else []
                emitted += 1
            if rows:
                yield rows


class ApiGenerator:
    """Any OpenAI-compatible `/chat/completions` endpoint, several requests in flight."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg

    def _chat(self, messages: list[dict]) -> tuple[str, int, str]:
        import urllib.request

        body = {"model": self.cfg.api_model or "default", "messages": messages,
                "max_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
        req = urllib.request.Request(self.cfg.api_base.rstrip("/") + "/chat/completions",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        if self.cfg.api_key:
            req.add_header("Authorization", f"Bearer {self.cfg.api_key}")
        with urllib.request.urlopen(req, timeout=600) as resp:
            data = json.loads(resp.read())
        choice = data["choices"][0]
        n = (data.get("usage") or {}).get("completion_tokens", 0)
        return choice["message"]["content"], n, choice.get("finish_reason") or "stop"

    def _one(self, rec: PromptRecord) -> dict:
        history, answers, total, finish = [], [], 0, "stop"
        for q in rec.turns:
            history.append({"role": "user", "content": q})
            text, n, finish = self._chat(history)
            history.append({"role": "assistant", "content": text})
            answers.append(text)
            total += n
        return _row(rec, answers, total, finish)

    def prompt_len(self, rec: PromptRecord) -> int:
        return 0

    def stream(self, recs: list[PromptRecord]) -> Iterator[list[dict]]:
        """Rows `batch_size` records at a time, `concurrency` requests in flight."""
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            for s in range(0, len(recs), self.cfg.batch_size):
                yield list(pool.map(self._one, recs[s:s + self.cfg.batch_size]))


def pending_records(cfg: DistillConfig, warn=None) -> tuple[list[PromptRecord], int]:
    records = [r for path in cfg.inputs for r in read_prompts(path, warn=warn)] + list(cfg.extra)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    done = done_ids(Path(cfg.output), warn=warn)
    return [r for r in records if r.id not in done], len(records)


def run_distill(cfg: DistillConfig, generator=None, *, log=None) -> dict:
    """Answer every pending prompt; return counts. `generator` defaults to local or API per `cfg`."""
    from tqdm import tqdm

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    pending, total = pending_records(cfg, warn=log)
    log(f"{total} prompts, {total - len(pending)} already answered, {len(pending)} to go -> {output}")
    if generator is None:
        generator = ApiGenerator(cfg) if cfg.api_base else _local_generator(cfg, log)
    # Sort within windows by prompt length: less padding, yet a stopped run still covers the pool evenly.
    window = cfg.batch_size * 16
    ordered = []
    for s in range(0, len(pending), window):
        ordered += sorted(pending[s:s + window], key=generator.prompt_len)
    tokens, start = 0, time.time()
    bar = tqdm(total=len(ordered), unit="prompt", dynamic_ncols=True, mininterval=5)
    for rows in generator.stream(ordered):
        append_rows(output, rows)
        tokens += sum(r["new_tokens"] for r in rows)
        bar.update(len(rows))
        bar.set_postfix(tok_s=f"{tokens / (time.time() - start):.1f}", tokens=tokens)
    bar.close()
    return {"answered": len(ordered), "tokens": tokens, "seconds": time.time() - start, "total": total}


def _local_generator(cfg: DistillConfig, log) -> LocalGenerator:
    from medusa.chat_format import read_template, use_template
    from medusa.inference.loading import load_base_model

    if cfg.chat_template is not None:
        read_template(cfg.chat_template)          # before the minutes of loading
    model, tok = load_base_model(cfg.model, dtype=cfg.dtype, device=cfg.device, quantize="none", log=log)
    use_template(tok, cfg.chat_template, log)
    # oneDNN-packed fp32 products, as the decode loop's: faster on CPUs (benchmarks/README.md, "Component
    # timings"); fp32 too, rounded differently, so a greedy near-tie could in principle flip
    packed_linear.pack_for_inference(model, cfg.pack_weights, log)
    return LocalGenerator(model, tok, cfg)
