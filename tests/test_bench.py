"""`medusa bench` on a tiny model: Spec-Bench answer files, summary figures, plot, resumption, the command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_heads, tiny_model, tiny_tokenizer
from medusa import MedusaModel
from medusa.evaluation import bench
from medusa.evaluation.bench import BenchConfig, run_bench
from medusa.evaluation.report import format_table

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
    {"question_id": 82, "category": "writing", "turns": ["Describe the sea."]},
    {"question_id": 83, "category": "math", "turns": ["What is 2+2?"]},
]
METHODS = ["baseline", "medusa", "prompt_lookup", "plain"]
RECORD_KEYS = {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
CHOICE_KEYS = {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
FIGURES = {"speedup", "mean_tokens_per_step", "exact_match_rate", "baseline_tokens_per_s", "medusa_tokens_per_s",
           "prompt_lookup_tokens_per_s", "prompt_lookup_speedup", "plain_tokens_per_s", "plain_speedup"}
MAX_NEW = 12


def _model() -> MedusaModel:
    return MedusaModel(tiny_model("llama"), random_heads(), tiny_tokenizer())


def _write_questions(path: Path, rows=QUESTIONS) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _command(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m medusa ARGS --model TINY --threads 1`, TINY a tiny llama saved under `tmp` (once)."""
    model_dir = tmp / "tiny"
    if not model_dir.exists():
        tiny_model("llama").save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
    return subprocess.run([sys.executable, "-m", "medusa", *args, "--model", str(model_dir), "--threads", "1"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def _cfg(tmp: Path, **kw) -> BenchConfig:
    return BenchConfig(**{"questions": str(tmp / "q.jsonl"), "output": str(tmp / "out"),
                          "max_new_tokens": MAX_NEW, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    _write_questions(tmp / "q.jsonl")
    model = _model()
    prompts = []  # every prompt medusa's engine was given, decoded
    stream = model.stream
    model.stream = lambda ids, **kw: (prompts.append(model.tokenizer.decode(ids[0])), stream(ids, **kw))[1]
    summary = run_bench(model, _cfg(tmp), progress=False)
    return tmp, summary, prompts


def test_answer_files_follow_spec_bench_schema(run):
    tmp, _, _ = run
    out = tmp / "out"
    for m in METHODS:
        records = _read(out / f"{m}.jsonl")
        assert [r["question_id"] for r in records] == [81, 82, 83]
        assert [r["category"] for r in records] == ["writing", "writing", "math"]
        for r, q in zip(records, QUESTIONS):
            assert set(r) == RECORD_KEYS and r["model_id"].endswith(m) and len(r["choices"]) == 1
            c = r["choices"][0]
            assert CHOICE_KEYS <= set(c) and c["index"] == 0
            n = len(q["turns"])
            assert len(c["turns"]) == len(c["new_tokens"]) == len(c["wall_time"]) == len(c["decoding_steps"]) == n
            assert all(isinstance(t, str) for t in c["turns"]) and all(t > 0 for t in c["wall_time"])
            # accept_lengths: one number per step, all turns in a row (Spec-Bench's speed.py takes their mean)
            assert all(isinstance(a, int) and a >= 1 for a in c["accept_lengths"])
            assert len(c["accept_lengths"]) == sum(c["decoding_steps"])
            assert sum(c["accept_lengths"]) == sum(c["new_tokens"])
            assert all(0 < k <= MAX_NEW for k in c["new_tokens"])
            if m == "baseline":
                assert c["accept_lengths"] == [1] * sum(c["new_tokens"]) and "matches_baseline" not in c
            else:
                assert len(c["matches_baseline"]) == n


def test_greedy_answers_are_token_identical_to_the_baseline(run):
    tmp, summary, _ = run
    base = _read(tmp / "out" / "baseline.jsonl")
    for m in ("medusa", "plain"):
        for r, b in zip(_read(tmp / "out" / f"{m}.jsonl"), base):
            assert r["choices"][0]["matches_baseline"] == [True] * len(b["choices"][0]["turns"])
            assert r["choices"][0]["new_tokens"] == b["choices"][0]["new_tokens"]
            assert r["choices"][0]["turns"] == b["choices"][0]["turns"]
    for fig in (summary["overall"], *summary["categories"].values()):
        assert fig["exact_match_rate"] == 1.0 and fig["plain_exact_match_rate"] == 1.0
        assert fig["baseline_new_tokens"] == fig["medusa_new_tokens"]


def test_summary_has_the_figures_overall_and_per_category(run):
    tmp, summary, _ = run
    assert json.loads((tmp / "out" / "summary.json").read_text()) == summary
    assert list(summary["categories"]) == ["writing", "math"]
    assert summary["overall"]["questions"] == 3 and summary["overall"]["answers"] == 4
    assert summary["categories"]["writing"]["answers"] == 3 and summary["categories"]["math"]["answers"] == 1
    records = {m: _read(tmp / "out" / f"{m}.jsonl") for m in METHODS}
    for name, fig in [("overall", summary["overall"]), *summary["categories"].items()]:
        assert FIGURES <= set(fig)
        rate = {}
        for m, recs in records.items():  # tokens/s = total new tokens / total time, from the answer files
            recs = [r for r in recs if name == "overall" or r["category"] == name]
            c = [r["choices"][0] for r in recs]
            rate[m] = sum(sum(x["new_tokens"]) for x in c) / sum(sum(x["wall_time"]) for x in c)
        assert fig["baseline_tokens_per_s"] == pytest.approx(rate["baseline"], rel=1e-3)
        assert fig["medusa_tokens_per_s"] == pytest.approx(rate["medusa"], rel=1e-3)
        assert fig["speedup"] == pytest.approx(rate["medusa"] / rate["baseline"], rel=1e-3)
        assert fig["plain_speedup"] == pytest.approx(rate["plain"] / rate["baseline"], rel=1e-3)
        assert fig["prompt_lookup_speedup"] == pytest.approx(rate["prompt_lookup"] / rate["baseline"], rel=1e-3)
        assert fig["plain_tokens_per_step"] == 1.0 and fig["mean_tokens_per_step"] >= 1.0
    table = format_table(summary)
    assert [line.split()[0] for line in table.splitlines()] == ["category", "writing", "math", "overall"]


def test_plot_is_a_png(run):
    tmp, _, _ = run
    assert (tmp / "out" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_turn_carries_the_baseline_first_answer(run):
    tmp, _, prompts = run
    first = _read(tmp / "out" / "baseline.jsonl")[0]["choices"][0]["turns"][0]
    second = [p for p in prompts if "Now make it rhyme." in p]
    assert len(second) == 2  # medusa and plain (the warm-up asks only first turns)
    assert all(p.index("Write a haiku.") < p.index(first) < p.index("Now make it rhyme.") for p in second)


def test_rerun_resumes_and_redoes_a_question_cut_off_between_files(run):
    tmp, summary, _ = run
    out = tmp / "out"
    ids = {m: [r["answer_id"] for r in _read(out / f"{m}.jsonl")] for m in METHODS}
    assert run_bench(_model(), _cfg(tmp), progress=False)["overall"] == summary["overall"]
    assert {m: [r["answer_id"] for r in _read(out / f"{m}.jsonl")] for m in METHODS} == ids
    lines = (out / "medusa.jsonl").read_text().splitlines()  # killed after writing question 83 for some files
    (out / "medusa.jsonl").write_text("\n".join(lines[:2]) + "\n")
    run_bench(_model(), _cfg(tmp), progress=False)
    for m in METHODS:
        records = _read(out / f"{m}.jsonl")
        assert sorted(r["question_id"] for r in records) == [81, 82, 83]
        assert [r["answer_id"] for r in records][:2] == ids[m][:2] and records[2]["answer_id"] != ids[m][2]
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_bench(_model(), _cfg(tmp, max_new_tokens=MAX_NEW + 1), progress=False)


def test_a_run_resumed_on_another_machine_is_refused(run, monkeypatch):
    tmp, summary, _ = run
    assert summary["settings"]["machine"] == bench.machine(torch.device("cpu"))
    monkeypatch.setattr(bench, "machine", lambda device: "another CPU")
    with pytest.raises(ValueError, match="machine"):           # its timings would mix two machines'
        run_bench(_model(), _cfg(tmp), progress=False)


def test_a_run_resumed_with_other_threads_is_refused(run, monkeypatch):
    tmp, summary, _ = run
    threads = torch.get_num_threads()
    assert summary["settings"]["threads"] == threads
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(ValueError, match="threads"):
            run_bench(_model(), _cfg(tmp), progress=False)
    finally:
        torch.set_num_threads(threads)


def test_methods_alternate_order_from_one_question_to_the_next(tmp_path, monkeypatch):
    _write_questions(tmp_path / "q.jsonl")
    calls = []
    for m, fn in list(bench.RUNNERS.items()):
        monkeypatch.setitem(bench.RUNNERS, m, lambda *a, m=m, fn=fn: (calls.append(m), fn(*a))[1])
    run_bench(_model(), _cfg(tmp_path, warmup=False, plain=False), progress=False)
    order = ["baseline", "medusa", "prompt_lookup"]
    assert calls == order * 2 + order[::-1] + order  # question 81 has two turns


@pytest.mark.parametrize("sampling", ["typical", "lossless"])
def test_sampling_reports_no_exact_match_and_skipped_methods_are_absent(tmp_path, sampling):
    _write_questions(tmp_path / "q.jsonl")
    model, seen = _model(), []
    stream = model.stream
    model.stream = lambda ids, **kw: (seen.append(kw["sampling"]), stream(ids, **kw))[1]
    summary = run_bench(model, _cfg(tmp_path, temperature=0.8, sampling=sampling, prompt_lookup=False,
                                    plain=False, categories=("math",)), progress=False)
    assert seen and set(seen) == {sampling} and summary["settings"]["sampling"] == sampling
    assert summary["overall"]["exact_match_rate"] is None and summary["overall"]["questions"] == 1
    assert not any(k.startswith(("prompt_lookup", "plain")) for k in summary["overall"])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == ["baseline.jsonl", "medusa.jsonl"]
    assert _read(tmp_path / "out" / "medusa.jsonl")[0]["choices"][0]["matches_baseline"] is None
    with pytest.raises(ValueError, match="no questions in"):
        bench.load_questions(str(tmp_path / "q.jsonl"), categories=("poetry",))


def test_dev_prompt_format_is_read(tmp_path):
    rows = [{"id": "dev-1", "category": "coding", "prompt": "Print hello."},
            {"id": "dev-2", "category": "math", "prompt": "Add 1 and 2."}]
    _write_questions(tmp_path / "q.jsonl", rows)
    summary = run_bench(_model(), _cfg(tmp_path, limit=1, prompt_lookup=False), progress=False)
    assert list(summary["categories"]) == ["coding"]
    assert _read(tmp_path / "out" / "baseline.jsonl")[0]["question_id"] == "dev-1"


def test_command_on_a_saved_tiny_model(tmp_path):
    questions = _write_questions(tmp_path / "q.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = _command(tmp_path, "bench", "--questions", str(questions), "--output", str(tmp_path / "out"),
                    "--max-new-tokens", "6", "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["category", "q", "base", "tok/s", "medusa"]
    assert [line.split()[0] for line in lines[1:3]] == ["writing", "overall"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["overall"]["questions"] == 2 and summary["overall"]["exact_match_rate"] == 1.0
    assert summary["settings"]["max_new_tokens"] == 6
    assert (tmp_path / "out" / "bench.png").is_file()
    missing = subprocess.run([sys.executable, "-m", "medusa", "bench", "--questions", str(tmp_path / "none.jsonl")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "question file not found" in missing.stderr


def test_per_category_spreads_through_every_category(tmp_path):
    rows = [{"question_id": i, "category": "qa" if i < 10 else "rag", "turns": [f"q{i}"]} for i in range(13)]
    _write_questions(tmp_path / "q.jsonl", rows)
    picked = bench.load_questions(str(tmp_path / "q.jsonl"), per_category=2)
    assert [q.id for q in picked] == ["0", "5", "10", "11"]  # evenly spaced in qa (10), first two of rag (3)
    assert [q.id for q in bench.load_questions(str(tmp_path / "q.jsonl"), per_category=5)][-3:] == ["10", "11", "12"]
    with pytest.raises(ValueError, match="per_category"):
        bench.load_questions(str(tmp_path / "q.jsonl"), per_category=0)


def test_batch_sizes_command_compares_three_methods_side_by_side(tmp_path):
    rows = [{"question_id": i, "category": "qa", "turns": [f"question number {i} " * (1 + i % 3)]} for i in range(5)]
    questions = _write_questions(tmp_path / "q.jsonl", rows)
    proc = _command(tmp_path, "bench", "--questions", str(questions), "--output", str(tmp_path / "out"),
                    "--max-new-tokens", "10", "--batch-size", "1,4")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "batch.json").read_text())
    got = {(r["batch_size"], r["method"]): r for r in result["rows"]}
    assert set(got) == {(b, m) for b in (1, 4) for m in ("medusa", "plain", "generate")}
    for b in (1, 4):
        assert got[(b, "medusa")]["exact"] == got[(b, "plain")]["exact"] == 5      # each row as alone
        assert got[(b, "plain")]["tokens_per_step"] == 1.0
    assert got[(1, "generate")]["exact"] == 5
    assert result["settings"]["prompts"] == 5 and (tmp_path / "out" / "batch.png").is_file()
    assert "| 4 |" in proc.stdout


def test_bench_serve_runs_the_server_side_by_side(tmp_path):
    rows = [{"question_id": i, "category": "qa", "turns": [f"question {i} " * (1 + i % 3)]} for i in range(4)]
    questions = _write_questions(tmp_path / "q.jsonl", rows)
    proc = _command(tmp_path, "bench-serve", "--questions", str(questions), "--output", str(tmp_path / "out"),
                    "--max-new-tokens", "8", "--concurrency", "1,3", "--max-batch", "2", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "serve.json").read_text())
    got = {(r["clients"], r["setting"]): r for r in result["rows"]}
    assert set(got) == {(c, s) for c in (1, 3) for s in ("medusa", "plain", "one-at-a-time")}
    for r in got.values():
        assert r["same_as_alone"] == 4 and r["tokens"] > 0 and r["ttft_p50"] > 0
        assert len(r["rounds_tokens_per_s"]) == 2 and r["tokens_per_s"] == r["rounds_tokens_per_s"][0]
    assert (tmp_path / "out" / "serve.png").is_file() and "| 3 |" in proc.stdout


def test_a_question_longer_than_the_context_is_skipped_not_fatal(tmp_path):
    from medusa.evaluation.tokens_per_step import tokens_per_step
    from medusa.training.prompts import read_prompts

    rows = [{"question_id": 1, "category": "qa", "turns": ["short one"]},
            {"question_id": 2, "category": "qa", "turns": ["far too long " * 30]},     # > 256 tokens
            {"question_id": 3, "category": "qa", "turns": ["short two"]}]
    _write_questions(tmp_path / "q.jsonl", rows)
    logs = []
    summary = run_bench(_model(), _cfg(tmp_path, prompt_lookup=False), progress=False, log=logs.append)
    assert summary["overall"]["questions"] == 2 and any("skipped question 2" in m for m in logs)
    logs.clear()
    report = tokens_per_step(_model(), read_prompts(str(tmp_path / "q.jsonl")), max_new_tokens=4, log=logs.append)
    assert report["prompts"] == 2 and any("skipped 2" in m and "context" in m for m in logs)


def test_llama_cpp_is_a_method_only_when_a_file_is_named():
    assert "llama_cpp" not in BenchConfig(questions="q", output="o").methods
    assert BenchConfig(questions="q", output="o", llama_cpp_gguf="m.gguf").methods[-1] == "llama_cpp"


@pytest.mark.slow
def test_llama_cpp_decodes_the_default_gguf_greedily(tmp_path):
    """The baseline on the default model's own file: the prompt's token ids in, greedy, the answer ending at the
    model's end of turn (llama-cpp-python is an optional extra)."""
    pytest.importorskip("llama_cpp")
    from medusa.chat_format import encode_prompt
    from medusa.evaluation.llama_cpp_baseline import LlamaCppRunner
    from medusa.inference.loading import default_gguf_path

    m = MedusaModel.from_pretrained()
    runner = LlamaCppRunner(default_gguf_path(), threads=1, context=512)
    ids = encode_prompt(m.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    cfg = BenchConfig(questions="q", output="o", max_new_tokens=40)
    first, again = runner(m, ids, cfg, 0), runner(m, ids, cfg, 1)
    assert first.tokens == again.tokens and 0 < len(first.tokens) <= 40       # greedy: the same answer twice
    assert first.tokens[-1] in m.decode_options().eos_token_ids or len(first.tokens) == 40
    assert m.tokenizer.decode(first.tokens, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="greedy"):
        runner(m, ids, BenchConfig(questions="q", output="o", temperature=0.7), 0)
