"""Mean tokens per step of greedy decoding on a prompt file (`medusa evaluate --prompts`): the figure that
says how much a model's heads, tree and context drafts save, whatever the machine. Resumable through a
records file."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from medusa.chat_format import encode_prompt
from medusa.inference.engine import PromptTooLongError
from medusa.inference.tree import load_tree, tree_fingerprint
from medusa.training.jsonl import append_rows, read_rows


def _recorded(records: Path, run: str, settings: dict, warn=None) -> dict[str, dict]:
    """Prompt id -> its line in `records` for this run; a line of the same run from other settings is refused."""
    done = {}
    for line_no, row in read_rows(records, warn=warn):
        if row.get("run") != run or not isinstance(row.get("id"), str):
            continue
        theirs = row.get("settings") or {}
        if theirs != settings:
            diff = sorted(k for k in set(settings) | set(theirs) if settings.get(k) != theirs.get(k))
            raise ValueError(f"{records}:{line_no}: recorded with other settings ({', '.join(diff)}) than this "
                             f"{run!r} run: give another records file")
        done[row["id"]] = row
    return done


def tokens_per_step(model, prompts, *, max_new_tokens: int = 256, tree=None, lookup=None, log=None,
                    records: str | Path | None = None, run: str = "greedy", settings: dict | None = None) -> dict:
    """Greedy decoding of each prompt's first turn with the model's chat template. `lookup=0`: the heads alone,
    no context drafts (None: the model's setting). Prompts with a category (dev prompts, Spec-Bench) also get
    the figure per category. `records`: a JSONL file that gets a line per prompt as it is done (`run`, the
    caller's `settings` plus the tree, device type and dtype decoding used, id, category, tokens, steps,
    seconds); prompts it already holds for this run are not decoded again, so a stopped evaluation resumes
    where it was."""
    used = model.tree if tree is None else load_tree(tree, model.heads.num_heads, model.device_type)
    settings = dict(settings or {}, max_new_tokens=max_new_tokens, tree=tree_fingerprint(used),
                    device=model.device_type, dtype=str(model.base_model.dtype).removeprefix("torch."))
    done = _recorded(Path(records), run, settings, warn=log) if records else {}
    tokens = steps = 0
    seconds = 0.0
    by_category: dict[str, list[int]] = {}          # category -> [tokens, steps]
    skipped = 0
    for n, rec in enumerate(prompts, 1):
        row = done.get(rec.id)
        if row is None:
            ids = encode_prompt(model.tokenizer, [{"role": "user", "content": rec.turns[0]}])
            t0 = time.perf_counter()
            row = {"run": run, "settings": settings, "id": rec.id, "category": rec.category, "tokens": 0, "steps": 0}
            try:
                decoding = model.stream(ids, max_new_tokens=max_new_tokens, tree=tree, lookup=lookup)
            except PromptTooLongError as e:   # one prompt past the context does not end the run
                (log or (lambda m: print(m, file=sys.stderr)))(f"skipped {rec.id}: {e}")
                skipped += 1
                continue
            for step in decoding:
                row["tokens"] += step.accepted
                row["steps"] += 1
            row["seconds"] = round(time.perf_counter() - t0, 3)
            if records:
                append_rows(Path(records), [row])
        tokens, steps, seconds = tokens + row["tokens"], steps + row["steps"], seconds + row["seconds"]
        if rec.category is not None:
            c = by_category.setdefault(rec.category, [0, 0])
            c[0] += row["tokens"]
            c[1] += row["steps"]
        if log:
            log(f"{n}/{len(prompts)}: {tokens / max(steps, 1):.3f} tokens/step so far")
    report = {"prompts": len(prompts) - skipped, "new_tokens": tokens, "steps": steps,
              "tokens_per_step": round(tokens / max(steps, 1), 4), "seconds": round(seconds, 1)}
    if by_category:
        report["by_category"] = {cat: round(t / max(s, 1), 4) for cat, (t, s) in sorted(by_category.items())}
    return report
