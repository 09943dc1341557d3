"""Prompt files in, conversations out: the three input formats `medusa distill` accepts.

- `{"prompt": "..."}`                                   (our prompt pool, dev prompts)
- `{"conversations": [{"from": "human", "value": ...}, ...]}`  (ShareGPT; human turns are re-answered)
- `{"turns": ["...", "..."]}`                           (MT-Bench / Spec-Bench; one user turn each)

Bad lines are reported with their line number and skipped; they never stop a run.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptRecord:
    id: str
    turns: tuple[str, ...]  # user turns, asked one after another
    category: str | None = None


def _user_turns(obj: dict) -> list[str]:
    if isinstance(obj.get("prompt"), str):
        return [obj["prompt"]]
    if isinstance(obj.get("turns"), list):
        return list(obj["turns"])
    if isinstance(obj.get("conversations"), list):
        return [t.get("value") for t in obj["conversations"] if isinstance(t, dict) and t.get("from") in ("human", "user")]
    raise ValueError("no `prompt`, `turns` or `conversations` field")


def parse_prompt_line(line: str, line_no: int, source: str = "") -> PromptRecord:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    turns = _user_turns(obj)
    if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError("empty or non-text user turn")
    rid = obj.get("id", obj.get("question_id"))
    rid = str(rid) if rid is not None else f"{Path(source).stem}-{line_no}"
    return PromptRecord(id=rid, turns=tuple(turns), category=obj.get("category"))


def read_prompts(path: str | Path, *, warn=None) -> list[PromptRecord]:
    """Read every usable record of a prompt file; report bad lines (with their number) through `warn`."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    records, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = parse_prompt_line(line, line_no, str(path))
            except (ValueError, json.JSONDecodeError) as e:
                warn(f"{path}:{line_no}: skipped bad line ({e})")
                continue
            if rec.id in seen:
                warn(f"{path}:{line_no}: skipped duplicate id {rec.id!r}")
                continue
            seen.add(rec.id)
            records.append(rec)
    return records


# --- composed prompts for answer styles the pool lacks (summaries, translation, reading comprehension) ---

_LANGS = ["French", "German", "Spanish", "Italian", "Portuguese"]


def _passages(records: list[PromptRecord], lo: int, hi: int) -> list[str]:
    out = []
    for r in records:
        text = r.turns[0].strip()
        if lo <= len(text) <= hi and "```" not in text and "def " not in text:
            out.append(text)
    return out


def compose_task_prompts(records: list[PromptRecord], n_each: int, *, seed: int = 0) -> list[PromptRecord]:
    """Build summarization, translation and passage-QA prompts from passages already in the pool."""
    rng = random.Random(seed)
    long_p = _passages(records, 300, 1600)
    short_p = _passages(records, 40, 300)
    questions = [r.turns[0] for r in records if r.id.startswith(("truthfulqa", "mmlu")) and len(r.turns[0]) < 400]
    out: list[PromptRecord] = []
    for i in range(min(n_each, len(long_p))):
        text = rng.choice(long_p)
        style = rng.choice(["Summarize: {t}", "Summarize the following text in a few sentences.\n\n{t}",
                            "Write a short summary of this passage:\n{t}"])
        out.append(PromptRecord(f"composed-summarize-{i}", (style.format(t=text),)))
    for i in range(min(n_each, len(short_p))):
        text, lang = rng.choice(short_p), rng.choice(_LANGS)
        out.append(PromptRecord(f"composed-translate-{i}", (f"Translate English to {lang}: {text}",)))
    for i in range(min(n_each, len(long_p), len(questions) or 0)):
        docs = rng.sample(long_p, 2) + [rng.choice(short_p)]
        body = "\n\n".join(f"Document {k + 1}: {d}" for k, d in enumerate(docs))
        q = rng.choice(questions) if rng.random() < 0.5 else "What is the main point of Document 1?"
        out.append(PromptRecord(f"composed-rag-{i}", (f"{body}\n\nUsing the documents above, answer: {q}",)))
    rng.shuffle(out)
    return out


def interleave(records: list[PromptRecord], extra: list[PromptRecord]) -> list[PromptRecord]:
    """Spread `extra` evenly through `records`, so a partial distillation run covers both."""
    out, step, j = [], len(records) / max(len(extra), 1), 0
    for i, r in enumerate(records):
        out.append(r)
        while j < len(extra) and j * step <= i:
            out.append(extra[j])
            j += 1
    return out + extra[j:]


def write_prompts(records: list[PromptRecord], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": r.id, "turns": list(r.turns)}, ensure_ascii=False) + "\n")
