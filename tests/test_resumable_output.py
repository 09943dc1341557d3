"""The JSONL files runs append to and resume from (`medusa distill --output`, `medusa evaluate --records`):
every row already there is kept, whoever wrote it; only a torn last line (no final newline) is cut."""
from __future__ import annotations

import json

import pytest

from conftest import random_heads, tiny_model, tiny_tokenizer
from medusa import MedusaModel
from medusa.training.distill import DistillConfig, LocalGenerator, run_distill
from medusa.training.prompts import PromptRecord

FOREIGN = [{"conversations": [{"from": "human", "value": f"q{k}"}, {"from": "gpt", "value": f"a{k}"}]}
           for k in range(3)]                                    # ShareGPT rows from elsewhere: no "id"


def _distill(tmp_path, output_text: str, n: int = 3) -> tuple[list[str], list[str]]:
    """Distill `n` prompts (ids p0..) into an output file that starts as `output_text`: (its lines, warnings)."""
    with open(tmp_path / "p.jsonl", "w") as f:
        for k in range(n):
            f.write(json.dumps({"id": f"p{k}", "prompt": f"say {k}"}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(output_text)
    cfg = DistillConfig(inputs=[str(tmp_path / "p.jsonl")], output=str(out), max_new_tokens=4, batch_size=3)
    warnings = []
    run_distill(cfg, LocalGenerator(tiny_model("llama"), tiny_tokenizer(), cfg), log=warnings.append)
    return out.read_text().splitlines(), warnings


def _ids(lines: list[str]) -> list[str]:
    return [json.loads(x)["id"] for x in lines]


def test_distill_appends_to_a_sharegpt_file_from_elsewhere_and_keeps_its_rows(tmp_path):
    before = [json.dumps(r) for r in FOREIGN] + [json.dumps({"id": "other", "conversations": []})]
    lines, _ = _distill(tmp_path, "\n".join(before) + "\n")
    assert lines[:4] == before                      # rows without an id, or matching no prompt, left as they are
    assert _ids(lines[4:]) == ["p0", "p1", "p2"]


def test_distill_keeps_a_malformed_line_in_the_middle_and_names_it(tmp_path):
    done = [json.dumps({"id": f"p{k}", "conversations": []}) for k in range(2)]
    before = [done[0], "{not json", done[1], "[1, 2]"]
    lines, warnings = _distill(tmp_path, "\n".join(before) + "\n", n=4)
    assert lines[:4] == before and _ids(lines[4:]) == ["p2", "p3"]      # p0, p1 not answered again
    assert any("out.jsonl:2" in w for w in warnings) and any("out.jsonl:4" in w for w in warnings)


def test_distill_cuts_only_a_torn_last_line(tmp_path):
    lines, warnings = _distill(tmp_path, json.dumps(FOREIGN[0]) + "\n" + '{"id": "p1", "conversa')
    assert lines[0] == json.dumps(FOREIGN[0]) and _ids(lines[1:]) == ["p0", "p1", "p2"]
    assert any("out.jsonl:2" in w for w in warnings)
    complete = json.dumps({"id": "p1", "conversations": []})          # whole, only its newline missing
    lines, _ = _distill(tmp_path, json.dumps(FOREIGN[0]) + "\n" + complete)
    assert lines[:2] == [json.dumps(FOREIGN[0]), complete] and _ids(lines[2:]) == ["p0", "p2"]


def test_evaluate_records_keep_a_malformed_line_and_count_lines_past_it(tmp_path):
    from medusa.evaluation.tokens_per_step import tokens_per_step

    m = MedusaModel(tiny_model("llama"), random_heads(), tiny_tokenizer(), tree="cpu_small")
    recs = [PromptRecord(id=str(k), turns=(f"say {k}",)) for k in range(3)]
    records = tmp_path / "records.jsonl"
    want = tokens_per_step(m, recs, max_new_tokens=6, records=records)
    records.write_text("{not json\n" + records.read_text())
    decoded, warnings = [], []
    stream = m.stream
    m.stream = lambda ids, **kw: decoded.append(ids) or stream(ids, **kw)
    again = tokens_per_step(m, recs, max_new_tokens=6, records=records, log=warnings.append)
    assert decoded == [] and again["tokens_per_step"] == want["tokens_per_step"]
    assert records.read_text().splitlines()[0] == "{not json" and len(records.read_text().splitlines()) == 4
    assert any("records.jsonl:1" in w for w in warnings)
    with pytest.raises(ValueError, match="records.jsonl:2: recorded with other settings"):   # its number in the file
        tokens_per_step(m, recs, max_new_tokens=4, records=records, log=warnings.append)
