"""The benchmark's files and figures: Spec-Bench answer files, their aggregation, summary.json, the plot.

Answer files are one JSONL per method (`baseline.jsonl`, `medusa.jsonl`, ...), one line per question, in
the format of Spec-Bench's `evaluation/eval.py`, so its `speed.py` and `equal.py` read them as they are:
  {"question_id", "category", "answer_id", "model_id", "tstamp",
   "choices": [{"index": 0, "turns": [text per turn], "decoding_steps": [...], "new_tokens": [...],
                "wall_time": [seconds per turn], "accept_lengths": [tokens per step, all turns in a row]}]}
Ours add `matches_baseline` to a choice: per turn, whether its tokens equal the baseline's (null when
sampling). Everything in summary.json can be recomputed from these files.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

HOW = ("tokens/s = total new tokens / total wall time of the answers in the group (not a mean of per-answer "
       "rates); speedup = a method's tokens/s / the baseline's tokens/s on the same answers; tokens per step "
       "= total new tokens / total decoding steps (forward passes after the prompt's); exact_match_rate = "
       "fraction of answers (turns) token-identical to the baseline's, null when sampling; heads_speedup = "
       "medusa tokens/s / plain-engine tokens/s (the gain from the heads alone)")
LABELS = {"baseline": "transformers generate", "medusa": "medusa", "prompt_lookup": "prompt lookup",
          "plain": "plain engine (no heads)"}


# ---------------------------------------------------------------- answer files

def answer_record(question_id, category, model_id: str, texts: list[str], answers, *, matches=None) -> dict:
    """One Spec-Bench answer line. `answers`: one bench.Answer per turn."""
    choice = {"index": 0, "turns": texts,
              "decoding_steps": [len(a.accept_lengths) for a in answers],
              "new_tokens": [len(a.tokens) for a in answers],
              "wall_time": [a.seconds for a in answers],
              "accept_lengths": [n for a in answers for n in a.accept_lengths]}
    if not model_id.endswith("-baseline"):
        choice["matches_baseline"] = matches
    return {"question_id": question_id, "category": category, "answer_id": uuid.uuid4().hex[:22],
            "model_id": model_id, "choices": [choice], "tstamp": time.time()}


def append_answers(out: Path, records: dict[str, dict]) -> None:
    """Append one question's records, one per method; flushed to disk so a killed run keeps them."""
    for method, record in records.items():
        with (out / f"{method}.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _read(path: Path, warn) -> dict:
    records = {}
    if not path.is_file():
        return records
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records[rec["question_id"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            warn(f"{path}:{n}: skipped unreadable answer ({e})")
    return records


def load_answers(out: Path, methods, *, warn=print) -> dict[str, dict]:
    """{method: {question_id: record}} for the questions every method has answered. Files holding anything
    else (a question cut off between two files, a duplicate, a broken line) are rewritten without it, so a
    re-run answers those questions again, for every method."""
    found = {m: _read(out / f"{m}.jsonl", warn) for m in methods}
    complete = set.intersection(*(set(r) for r in found.values()))
    for m, recs in found.items():
        path = out / f"{m}.jsonl"
        kept = {q: r for q, r in recs.items() if q in complete}
        if path.is_file() and len(path.read_text(encoding="utf-8").splitlines()) != len(kept):
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept.values()),
                            encoding="utf-8")
        found[m] = kept
    return found


# ---------------------------------------------------------------- figures

def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def _totals(records: list[dict]) -> dict:
    choices = [r["choices"][0] for r in records]
    matches = [c.get("matches_baseline") for c in choices]
    flat = [x for m in matches if m is not None for x in m]
    return {"tokens": sum(sum(c["new_tokens"]) for c in choices),
            "seconds": sum(sum(c["wall_time"]) for c in choices),
            "steps": sum(sum(c["decoding_steps"]) for c in choices),
            "exact": None if (not flat or any(m is None for m in matches)) else sum(flat) / len(flat)}


def figures(group: dict[str, list[dict]]) -> dict:
    """Figures for one group of questions; `group`: {method: records}, same questions in every method."""
    t = {m: _totals(recs) for m, recs in group.items()}
    base, med = t["baseline"], t["medusa"]
    base_tps, med_tps = _ratio(base["tokens"], base["seconds"]), _ratio(med["tokens"], med["seconds"])
    out = {"questions": len(group["baseline"]),
           "answers": sum(len(r["choices"][0]["turns"]) for r in group["baseline"]),
           "speedup": _ratio(med_tps or 0, base_tps),
           "mean_tokens_per_step": _ratio(med["tokens"], med["steps"]),
           "exact_match_rate": None if med["exact"] is None else round(med["exact"], 4),
           "baseline_tokens_per_s": base_tps, "medusa_tokens_per_s": med_tps,
           "baseline_new_tokens": base["tokens"], "medusa_new_tokens": med["tokens"],
           "baseline_seconds": round(base["seconds"], 3), "medusa_seconds": round(med["seconds"], 3)}
    for m in ("prompt_lookup", "plain", "llama_cpp"):
        if m in t:
            tps = _ratio(t[m]["tokens"], t[m]["seconds"])
            out |= {f"{m}_tokens_per_s": tps, f"{m}_speedup": _ratio(tps or 0, base_tps),
                    f"{m}_tokens_per_step": _ratio(t[m]["tokens"], t[m]["steps"]),
                    f"{m}_exact_match_rate": None if t[m]["exact"] is None else round(t[m]["exact"], 4)}
    if "plain" in t:
        out["heads_speedup"] = _ratio(med_tps or 0, out["plain_tokens_per_s"])
    if "llama_cpp" in t:
        out["over_llama_cpp"] = _ratio(med_tps or 0, out["llama_cpp_tokens_per_s"])
    return out


def summarize(records: dict[str, list[dict]], *, settings: dict | None = None) -> dict:
    """Overall and per-category figures. `records`: {method: [record per question]}, same order in each."""
    cats = list(dict.fromkeys(r.get("category") or "uncategorized" for r in records["baseline"]))
    by_cat = {c: {m: [r for r in recs if (r.get("category") or "uncategorized") == c] for m, recs in records.items()}
              for c in cats}
    return {"overall": figures(records), "categories": {c: figures(g) for c, g in by_cat.items()},
            "how": HOW, "settings": settings or {}}


def format_table(summary: dict) -> str:
    cols = [("questions", "q", "{}"), ("baseline_tokens_per_s", "base tok/s", "{:.1f}"),
            ("medusa_tokens_per_s", "medusa tok/s", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"),
            ("mean_tokens_per_step", "tok/step", "{:.2f}"), ("exact_match_rate", "exact", "{:.0%}"),
            ("prompt_lookup_tokens_per_s", "lookup tok/s", "{:.1f}"), ("prompt_lookup_speedup", "lookup", "{:.2f}x"),
            ("plain_tokens_per_s", "plain tok/s", "{:.1f}"), ("plain_speedup", "plain", "{:.2f}x"),
            ("heads_speedup", "heads", "{:.2f}x"), ("llama_cpp_tokens_per_s", "llama.cpp tok/s", "{:.1f}"),
            ("over_llama_cpp", "vs llama.cpp", "{:.2f}x")]
    cols = [c for c in cols if c[0] in summary["overall"]]
    rows = [("category", *(c[1] for c in cols))]
    for name, fig in [*summary["categories"].items(), ("overall", summary["overall"])]:
        rows.append((name, *("-" if fig.get(k) is None else f.format(fig[k]) for k, _, f in cols)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)



def _bars(ax, groups: dict, names: list, overall: dict, title: str, series: list) -> None:
    """Grouped bars, one group per category, one bar per (key, label) present in the summary."""
    series = [s for s in series if s[0] in overall]
    width = 0.8 / len(series)
    for k, (key, label) in enumerate(series):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(names))],
               [groups[n][key] or 0 for n in names], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_title(title)


def plot(summary: dict, path: Path) -> None:
    """Bar charts by category (and overall): speedup over the baseline, tokens per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {**summary["categories"], "overall": summary["overall"]}
    names, x = list(groups), range(len(groups))
    many = len(names) > 6  # Spec-Bench's 13 categories: one chart above the other
    fig, (left, right) = plt.subplots(2 if many else 1, 1 if many else 2,
                                      figsize=(max(8.0, 0.8 * len(names) + 3), 8.0) if many else (10.0, 4.5))
    _bars(left, groups, names, summary["overall"], "speedup over transformers generate",
          [("speedup", "medusa"), ("prompt_lookup_speedup", "prompt lookup"), ("plain_speedup", "plain engine")])
    _bars(right, groups, names, summary["overall"], "tokens per step",
          [("mean_tokens_per_step", "medusa"), ("prompt_lookup_tokens_per_step", "prompt lookup")])
    for ax in (left, right):  # headroom above the bars for the legend
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]) * 1.2)
        ax.legend(fontsize=7, loc="upper left", ncol=3)
        ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
    model = summary.get("settings", {}).get("model_id", "")
    fig.suptitle(f"medusa bench {model}".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out: Path, summary: dict, *, log=print) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    try:
        plot(summary, out / "bench.png")
    except ImportError:
        log("No plot: matplotlib is not installed (pip install 'medusa[bench]')")
    else:
        methods = ", ".join(f"{m}.jsonl" for m in summary["settings"].get("methods", []))
        log(f"Wrote {out}/summary.json, {out}/bench.png and the answer files ({methods})")


def line_plot(rows: list[dict], path: Path, *, x: str, series: str, xlabel: str, ylabel: str, title: str,
              y: str = "tokens_per_s") -> None:
    """One line per value of `series`: `y` against `x` (log2 axis), from `rows`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r[series] for r in rows):
        rs = sorted((r for r in rows if r[series] == name), key=lambda r: r[x])
        ax.plot([r[x] for r in rs], [r[y] for r in rs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_result(out: Path, name: str, result: dict, *, log=print, **plot_args) -> None:
    """`result` as OUT/NAME.json and its rows plotted as OUT/NAME.png (see line_plot)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    try:
        line_plot(result["rows"], out / f"{name}.png", title=result.get("settings", {}).get("title", ""), **plot_args)
    except ImportError:
        log("No plot: matplotlib is not installed (pip install 'medusa[bench]')")
    else:
        log(f"Wrote {out}/{name}.json and {out}/{name}.png")
