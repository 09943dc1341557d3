"""JSONL files a resumable run appends to (distilled answers, evaluation records): rows read back, a torn
last line cut off, and rows appended durably."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _json_object(raw: bytes) -> dict | None:
    try:
        row = json.loads(raw)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def read_rows(path: Path, *, warn=None) -> list[tuple[int, dict]]:
    """(line number, row) for each JSON object in `path`, the JSONL file a resumable run appends to. Every line
    stays in the file: one that is no JSON object is reported through `warn` and counts as no row. Only a torn
    last line (unreadable, no final newline: a kill mid-write) is cut off, so the run redoes it."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    if not path.exists():
        return []
    rows, kept_bytes = [], 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            row = _json_object(raw)
            if row is None and not raw.endswith(b"\n"):
                warn(f"{path}:{line_no}: cut off a torn last line ({len(raw)} bytes, no final newline)")
                break
            if row is not None:
                rows.append((line_no, row))
            elif raw.strip():
                warn(f"{path}:{line_no}: kept a line that is not a JSON object (it counts as no row)")
            kept_bytes += len(raw)
    if kept_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(kept_bytes)
    return rows


def append_rows(output: Path, rows: list[dict]) -> None:
    """Append JSON lines, on a line of their own, flushed to disk so a killed run keeps them."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output.exists() and output.stat().st_size:
        with output.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":           # a last row written without its newline
                text = "\n" + text
    with output.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
