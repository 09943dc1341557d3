"""`medusa bench`: medusa against transformers' own decoding, question by question, in one process.

Every turn of every question is answered by each method, on the same model, dtype and device:
  baseline       transformers `generate` (greedy; sampling at `temperature` > 0)
  medusa         `MedusaModel.stream` with the model's tree and context drafts (at `temperature` > 0: typical
                 acceptance, or lossless rejection sampling with `sampling="lossless"`)
  prompt_lookup  transformers `generate(prompt_lookup_num_tokens=10)`: drafts copied from the context
  plain          medusa's own engine with no candidates (tree "root", no drafts): one token per step
  llama_cpp      llama.cpp's plain decoding of the same GGUF file (`llama_cpp_gguf`; llama_cpp_baseline.py)
The order of the methods is reversed from one question to the next, so slow drift of the machine (heat,
other jobs) falls on all of them alike; an untimed warm-up runs first.

A second turn is asked with the BASELINE's first answer in the history, for every method: every method
then answers exactly the same prompt at every turn, so speeds and exact matches compare like with like.
Greedy answers are identical anyway; under sampling each method's own answer would change the prompt.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from medusa.chat_format import encode_prompt
from medusa.evaluation import report
from medusa.inference.engine import PromptTooLongError
from medusa.inference.quantized import device_of, is_quantized
from medusa.inference.tree import tree_digest, tree_nodes
from medusa.training.prompts import PromptRecord, read_prompts

METHODS = ("baseline", "medusa", "prompt_lookup", "plain", "llama_cpp")
WARMUP_TOKENS = 16


@dataclass(frozen=True)
class BenchConfig:
    questions: str
    output: str
    max_new_tokens: int = 256
    limit: int | None = None
    categories: tuple[str, ...] = ()
    per_category: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    sampling: str = "typical"     # medusa at temperature > 0: "typical" acceptance or "lossless" rejection
    seed: int = 0
    prompt_lookup: bool = True
    plain: bool = True
    prompt_lookup_num_tokens: int = 10
    warmup: bool = True
    model_id: str = "model"
    llama_cpp_gguf: str | None = None     # a GGUF file: llama.cpp decodes it too

    @property
    def methods(self) -> tuple[str, ...]:
        off = {"prompt_lookup": not self.prompt_lookup, "plain": not self.plain, "llama_cpp": not self.llama_cpp_gguf}
        return tuple(m for m in METHODS if not off.get(m))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Answer:
    tokens: list[int]             # new token ids, eos included when the answer ended on it
    seconds: float                # wall time of the whole call
    accept_lengths: list[int]     # tokens added by each decoding step (each forward pass of the model)


# ---------------------------------------------------------------- the four methods

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepLengths:
    """A `generate` streamer recording how many tokens each step added (its first call is the prompt)."""

    def __init__(self):
        self.lengths, self.seen_prompt = [], False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.lengths.append(int(value.numel()))
        self.seen_prompt = True

    def end(self) -> None:
        pass


def _hf_generate(model, ids, cfg: BenchConfig, seed: int, *, prompt_lookup: bool) -> Answer:
    extra = {}
    if prompt_lookup:
        extra = {"prompt_lookup_num_tokens": cfg.prompt_lookup_num_tokens, "streamer": _StepLengths()}
    _sync(ids.device)
    t0 = time.perf_counter()
    out = model.generate_baseline(ids, extra, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p, seed=None if cfg.greedy else seed)
    _sync(ids.device)
    seconds = time.perf_counter() - t0
    tokens = out[0, ids.shape[1]:].tolist()
    lengths = extra["streamer"].lengths if prompt_lookup else [1] * len(tokens)
    return Answer(tokens, seconds, lengths)


def _medusa(model, ids, cfg: BenchConfig, seed: int, *, tree=None, lookup=None) -> Answer:
    options = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
               "sampling": cfg.sampling, "seed": None if cfg.greedy else seed}
    _sync(ids.device)
    t0 = time.perf_counter()
    steps = list(model.stream(ids, tree=tree, lookup=lookup, **options))
    _sync(ids.device)
    seconds = time.perf_counter() - t0
    steps = [s for s in steps if s.accepted]  # a closing "context" step adds nothing and runs no forward
    return Answer([t for s in steps for t in s.tokens.tolist()], seconds, [s.accepted for s in steps])


RUNNERS = {
    "baseline": lambda model, ids, cfg, seed: _hf_generate(model, ids, cfg, seed, prompt_lookup=False),
    "medusa": lambda model, ids, cfg, seed: _medusa(model, ids, cfg, seed),
    "prompt_lookup": lambda model, ids, cfg, seed: _hf_generate(model, ids, cfg, seed, prompt_lookup=True),
    "plain": lambda model, ids, cfg, seed: _medusa(model, ids, cfg, seed, tree="root", lookup=0),
}


# ---------------------------------------------------------------- questions

def spread(questions: list[PromptRecord], per_category: int) -> list[PromptRecord]:
    """`per_category` questions of each category, evenly spaced through it (a sample of the whole set that
    keeps every category, where `--limit` would take only the first ones); file order is kept."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    by_cat: dict[str, list[int]] = {}
    for k, q in enumerate(questions):
        by_cat.setdefault(q.category, []).append(k)
    keep = set()
    for idx in by_cat.values():
        n = min(per_category, len(idx))
        keep |= {idx[(j * len(idx)) // n] for j in range(n)}
    return [q for k, q in enumerate(questions) if k in keep]


def load_questions(path: str, *, categories=(), limit: int | None = None, per_category: int | None = None,
                   warn=None) -> list[PromptRecord]:
    """MT-Bench / Spec-Bench (`question_id`, `category`, `turns`) or dev prompts (`id`, `category`, `prompt`)."""
    questions = read_prompts(path, warn=warn)
    if categories:
        present = {q.category for q in questions}
        missing = sorted(set(categories) - present)
        if missing:
            raise ValueError(f"{path} has no questions in {missing}; its categories: "
                             f"{sorted(c for c in present if c)}")
        questions = [q for q in questions if q.category in categories]
    if per_category is not None:
        questions = spread(questions, per_category)
    return questions[:limit] if limit else questions


def question_id(q: PromptRecord):
    """Spec-Bench's ids are integers (its scripts sort them); read_prompts gives strings."""
    return int(q.id) if q.id.isdigit() else q.id


def answer_question(model, q: PromptRecord, cfg: BenchConfig, order, seed: int,
                    runners=RUNNERS) -> dict[str, list[Answer]]:
    """Each method answers each turn of `q`; later turns carry the baseline's earlier answers."""
    device = device_of(model.base_model.get_input_embeddings())
    answers: dict[str, list[Answer]] = {m: [] for m in order}
    history = []
    for j, turn in enumerate(q.turns):
        history.append({"role": "user", "content": turn})
        ids = encode_prompt(model.tokenizer, history).to(device)
        for m in order:
            answers[m].append(runners[m](model, ids, cfg, seed + j))
        history.append({"role": "assistant", "content": answer_text(model.tokenizer, answers["baseline"][-1])})
    return answers


def answer_text(tokenizer, answer: Answer) -> str:
    return tokenizer.decode(answer.tokens, skip_special_tokens=True).strip()


# ---------------------------------------------------------------- the run

_RESULT_KEYS = ("model_id", "max_new_tokens", "temperature", "top_p", "sampling", "seed",
                "prompt_lookup_num_tokens")


def _matches(answers: dict[str, list[Answer]], method: str, cfg: BenchConfig) -> list[bool] | None:
    """Per turn, whether `method` gave the baseline's tokens; None for the baseline and when sampling."""
    if method == "baseline" or not cfg.greedy:
        return None
    return [a.tokens == b.tokens for a, b in zip(answers[method], answers["baseline"])]


def machine(device: torch.device) -> str:
    """What the timings were taken on: the GPU's name, or the CPU's model name (threads are a setting of their own)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def _check_settings(out: Path, settings: dict) -> None:
    """Answers already in `out` are reused only when they were made with the same settings, on the same
    kind of machine (a run resumed elsewhere would mix two machines' timings)."""
    path = out / "bench_config.json"
    keys = (*_RESULT_KEYS, "methods", "dtype", "device", "machine", "threads", "tree_nodes", "tree_digest",
            "lookup", "compiled")
    mine = {k: settings[k] for k in keys}
    if path.is_file():
        theirs = json.loads(path.read_text())
        differ = sorted(k for k in mine if theirs.get(k) != mine[k])
        if differ:
            raise ValueError(f"{out} holds answers made with other settings ({', '.join(differ)}: "
                             f"{[theirs.get(k) for k in differ]} there, {[mine[k] for k in differ]} now); "
                             f"choose another --output or delete it")
    path.write_text(json.dumps(mine, indent=2) + "\n")


def run_bench(model, cfg: BenchConfig, *, progress: bool = True, log=None) -> dict:
    """Run (or resume) the benchmark; write answer files, summary.json and the plot; return the summary."""
    from tqdm.auto import tqdm

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if model.tokenizer is None:
        raise ValueError("the benchmark needs the model's tokenizer (questions are text)")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_questions(cfg.questions, categories=cfg.categories, limit=cfg.limit,
                               per_category=cfg.per_category, warn=log)
    if not questions:
        raise ValueError(f"no questions to run from {cfg.questions}")
    base = model.base_model
    settings = {**{k: v for k, v in asdict(cfg).items() if k in _RESULT_KEYS}, "methods": list(cfg.methods),
                "dtype": str(base.dtype).removeprefix("torch."), "device": str(base.device),
                "machine": machine(base.device),
                "tree_nodes": tree_nodes(model.tree), "tree_digest": tree_digest(model.tree), "lookup": asdict(model.lookup),
                "compiled": model.is_compiled, "quantized_weights": is_quantized(base),
                "threads": torch.get_num_threads(),
                "questions_file": str(cfg.questions), "questions": len(questions)}
    _check_settings(out, settings)
    runners = dict(RUNNERS)
    if cfg.llama_cpp_gguf:
        from medusa.evaluation.llama_cpp_baseline import LlamaCppRunner

        runners["llama_cpp"] = LlamaCppRunner(cfg.llama_cpp_gguf, threads=torch.get_num_threads())
    ids = [question_id(q) for q in questions]
    records = report.load_answers(out, cfg.methods, warn=log)
    todo = [(i, q) for i, q in enumerate(questions) if ids[i] not in records[cfg.methods[0]]]
    if len(todo) < len(questions):
        log(f"Resuming: {len(questions) - len(todo)} of {len(questions)} questions already answered in {out}")
    if todo and cfg.warmup:  # untimed: first calls pay for allocation, kernel selection, lazy imports
        short = BenchConfig(**{**asdict(cfg), "max_new_tokens": min(WARMUP_TOKENS, cfg.max_new_tokens)})
        answer_question(model, PromptRecord("warmup", todo[0][1].turns[:1]), short, cfg.methods, cfg.seed, runners)
    totals = {m: [0, 0.0] for m in cfg.methods}  # new tokens, seconds (this run's, for the progress bar)
    bar = tqdm(todo, desc="bench", unit="q", disable=not progress, file=sys.stderr)
    for i, q in bar:
        order = cfg.methods if i % 2 == 0 else cfg.methods[::-1]
        try:
            answers = answer_question(model, q, cfg, order, cfg.seed + 1000 * i, runners)
        except PromptTooLongError as e:     # one question past the context does not end the run
            log(f"skipped question {ids[i]}: {e}")
            continue
        texts = {m: [answer_text(model.tokenizer, a) for a in answers[m]] for m in cfg.methods}
        report.append_answers(out, {m: report.answer_record(ids[i], q.category, f"{cfg.model_id}-{m}", texts[m],
                                                            answers[m], matches=_matches(answers, m, cfg))
                                    for m in cfg.methods})
        for m in cfg.methods:
            totals[m][0] += sum(len(a.tokens) for a in answers[m])
            totals[m][1] += sum(a.seconds for a in answers[m])
        tps = {m: n / s if s else 0.0 for m, (n, s) in totals.items()}
        bar.set_postfix(speedup=f"{tps['medusa'] / tps['baseline']:.2f}x" if tps["baseline"] else "-",
                        medusa=f"{tps['medusa']:.1f} tok/s")
    bar.close()
    records = report.load_answers(out, cfg.methods, warn=log)
    chosen = {m: [records[m][qid] for qid in ids if qid in records[m]] for m in cfg.methods}
    summary = report.summarize(chosen, settings=settings)
    report.write_summary(out, summary, log=log)
    return summary
