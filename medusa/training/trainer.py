"""Training Medusa heads with accelerate (one CPU, one GPU, or many GPUs/nodes via `accelerate launch` /
`torchrun` with DDP, FSDP or DeepSpeed): Medusa-1 (frozen base, heads only, on cached base features) and
Medusa-2 (LoRA on the base + heads, with a KL term that keeps the base's behaviour).

Checkpoints every N steps with `accelerator.save_state`, each renamed into place once complete; a re-run with
the same output folder resumes from the latest complete one and, data order being seeded per epoch, ends where
an uninterrupted run would.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from medusa.inference.checkpoint import OUR_CONFIG, OUR_WEIGHTS, save_heads
from medusa.inference.draft_head import DraftProjection
from medusa.inference.heads import HeadsConfig, MedusaHeads, set_draft_vocab, true_inputs
from medusa.training.data import collate, read_conversations, tokenize_conversation
from medusa.training.losses import medusa_loss


@dataclass
class TrainConfig:
    data: str                          # ShareGPT JSONL (e.g. from `medusa distill`)
    output: str                        # heads folder; checkpoints and feature cache live inside it
    model: str | None = None           # base model; None = the embedded default
    chat_template: str | None = None   # a Jinja file for a model without a template (else plain text: chat_format)
    mode: str = "medusa1"              # or "medusa2"
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    next_token_input: bool = False     # heads also see the embedding of token t+1 (heads.py)
    parent_token_input: bool = False   # and head i >= 1 that of token t+1+i, the one its guess follows (heads.py)
    draft_vocab: bool = True           # heads learn and guess among the tokens seen as targets only (heads.py)
    max_length: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    lr: float = 1e-3                   # heads
    base_lr: float = 5e-5              # LoRA adapters (medusa2)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    decay: float = 0.8                 # head i's loss weight is decay**i
    loss: str = "ce"                   # "ce" on the true token, or "kl" to the base's own distribution
    kl_topk: int = 20
    mixed_precision: str = "no"        # "bf16" is fast on GPUs and on CPUs with AMX
    base_dtype: str | None = None
    checkpoint_every: int = 200
    stop_after: int | None = None      # end this run after N steps (schedule unchanged); re-run to resume
    seed: int = 0
    val_examples: int = 64
    limit: int | None = None
    log_every: int = 10
    lora_r: int = 16                   # medusa2
    lora_alpha: int = 32
    heads_weight: float = 0.2          # lambda0: total = KL(base kept) + lambda0 * heads loss
    heads_warmup_steps: int = 0        # heads-only steps before the joint phase
    save_merged: bool = False
    quantize: str | None = None        # "8bit" or "4bit": the base through bitsandbytes (CUDA only)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("medusa1", "medusa2"):
            raise ValueError(f"mode must be medusa1 or medusa2, got {self.mode!r}")
        if self.parent_token_input and not self.next_token_input:
            raise ValueError("--parent-token-input needs --next-token-input (head 0's parent is the next token)")
        if self.loss not in ("ce", "kl"):
            raise ValueError(f"loss must be ce or kl, got {self.loss!r}")
        if self.quantize not in (None, "8bit", "4bit"):
            raise ValueError(f"quantize must be None, '8bit' or '4bit', got {self.quantize!r}")
        at_least = {"num_heads": 1, "num_layers": 0, "max_length": 3, "batch_size": 1, "grad_accum": 1,
                    "kl_topk": 1, "checkpoint_every": 1, "val_examples": 0, "log_every": 1, "lora_r": 1,
                    "heads_warmup_steps": 0, "stop_after": 1, "limit": 1}
        for name, least in at_least.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        for name in ("epochs", "lr", "base_lr", "decay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio <= 1 or self.weight_decay < 0:
            raise ValueError(f"warmup_ratio must be in [0, 1] and weight_decay >= 0, got {self.warmup_ratio} and "
                             f"{self.weight_decay}")


def _projector(heads: MedusaHeads, lm_head: nn.Module) -> dict:
    """medusa_loss's `project` (and `vocab_map`): what decoding scores the heads' guesses over. Shared-head
    heads with a draft vocabulary are trained over those tokens only, the softmax decoding picks from (the
    same DraftProjection, in the lm_head's dtype); for SmolLM2 that is a third of the vocabulary and about a
    third of the work. Built once per run: the lm_head is frozen in both modes."""
    if not heads.config.shared_lm_head:
        return {"project": lambda i, x: heads.heads[i].proj(x)}
    vocab = getattr(heads, "draft_vocab", None)
    if vocab is None:
        return {"project": lambda i, x: lm_head(x)}
    rows = DraftProjection(lm_head, vocab, lm_head.weight.dtype)
    vocab_map = torch.full((heads.config.vocab_size,), -1, dtype=torch.long, device=vocab.device)
    vocab_map[vocab] = torch.arange(vocab.numel(), device=vocab.device)
    return {"project": lambda i, x: rows(x), "vocab_map": vocab_map}


class Medusa1Step(nn.Module):
    """Heads on cached features; the forward returns the loss so DDP/FSDP see every parameter in use."""

    def __init__(self, heads: MedusaHeads, lm_head: nn.Module, embedding: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.heads, self.cfg = heads, cfg
        self.base_parts = [lm_head, embedding]   # a list, not submodules: frozen, kept out of the checkpoints
        self.projection = _projector(heads, lm_head)

    def forward(self, batch: dict):
        lm_head, embedding = self.base_parts
        hidden, ids = batch["hidden"].to(lm_head.weight.dtype), batch["input_ids"]
        teacher = (batch["topk_logp"], batch["topk_idx"]) if self.cfg.loss == "kl" else None
        feats = self.heads.features(hidden, **true_inputs(self.heads, embedding, ids))
        return medusa_loss(feats, input_ids=ids, loss_mask=batch["loss_mask"], decay=self.cfg.decay, teacher=teacher,
                           **self.projection)


class Medusa2Step(nn.Module):
    """LoRA base + heads. Loss = KL(original base || adapted base) on assistant positions + lambda0 * heads."""

    def __init__(self, base, heads: MedusaHeads, cfg: TrainConfig):
        super().__init__()
        self.base, self.heads, self.cfg = base, heads, cfg
        self.projection = _projector(heads, base.get_output_embeddings())

    def forward(self, batch: dict):
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        out = self.base(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        with torch.no_grad(), self.base.disable_adapter():
            ref = self.base(input_ids=ids, attention_mask=attn).logits
        sel = mask[:, 1:]                                          # logits at t predict the token t+1
        ref_logp = torch.log_softmax(ref[:, :-1][sel].float(), -1)
        new_logp = torch.log_softmax(out.logits[:, :-1][sel].float(), -1)
        keep = (ref_logp.exp() * (ref_logp - new_logp)).sum(-1).mean() if sel.any() else out.logits.sum() * 0
        inputs = true_inputs(self.heads, self.base.get_input_embeddings(), ids)
        heads_loss, stats = medusa_loss(self.heads.features(out.hidden_states[-1], **inputs), input_ids=ids,
                                        loss_mask=mask, decay=self.cfg.decay, **self.projection)
        stats.base_kl = keep.detach()
        return keep + self.cfg.heads_weight * heads_loss, stats


def _schedule(total: int, warmup: int, delay: int = 0):
    def f(step: int) -> float:
        step -= delay
        if step < 0:
            return 0.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - delay - warmup))))
    return f


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each checkpoint, oldest first; complete ones hold elapsed.json, written last."""
    return sorted((int(p.name.split("-")[1]), p) for p in folder.glob("step-*"))


def _latest_checkpoint(folder: Path, warn) -> tuple[Path | None, int]:
    """The newest complete checkpoint and its step; newer incomplete ones are skipped with a warning."""
    for step, path in reversed(_checkpoints(folder)):
        if (path / "elapsed.json").is_file():
            return path, step
        warn(f"skipped the incomplete checkpoint {path} (no elapsed.json: killed while saving)")
    return None, 0


def _save_checkpoint(acc, folder: Path, step: int, seconds: float) -> None:
    """accelerate's state at `step`, written into a hidden folder and renamed step-N once complete, so a kill
    while saving leaves no step-N behind; the two newest complete checkpoints are kept, nothing else."""
    final, tmp = folder / f"step-{step}", folder / f".step-{step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)             # left by a kill while saving
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()                                # every process's files are written
    if acc.is_main_process:
        (tmp / "elapsed.json").write_text(json.dumps({"seconds": seconds}) + "\n")
        shutil.rmtree(final, ignore_errors=True)           # an incomplete one, skipped on resuming
        os.rename(tmp, final)
        complete = [p for _, p in _checkpoints(folder) if (p / "elapsed.json").is_file()][-2:]
        for _, old in _checkpoints(folder):
            if old not in complete:
                shutil.rmtree(old, ignore_errors=True)


def _trim_log(log_file: Path, step: int) -> None:
    """Drop the log's records past `step`, the checkpoint a run resumes from: it logs those steps again. (A
    torn last line goes too; a line that is no record stays.)"""
    if not log_file.is_file():
        return
    lines = log_file.read_text().splitlines(keepends=True)
    kept = [x for x in lines if x.endswith("\n") and _logged_step(x) <= step]
    if kept != lines:
        log_file.with_suffix(".tmp").write_text("".join(kept))
        os.replace(log_file.with_suffix(".tmp"), log_file)


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 0


def split_examples(cfg: TrainConfig, tokenizer, warn=None) -> tuple[list, list]:
    """cfg.data's usable conversations (an assistant token past the first two) as (held out, training): the
    held-out ones are at most cfg.val_examples and a tenth of them, chosen by cfg.seed."""
    convs = read_conversations(cfg.data, warn=warn)[: cfg.limit]
    examples = [tokenize_conversation(tokenizer, c, cfg.max_length) for c in convs]
    examples = [e for e in examples if e.loss_mask[2:].any()]
    random.Random(cfg.seed).shuffle(examples)
    n_val = min(cfg.val_examples, len(examples) // 10)
    return examples[:n_val], examples[n_val:]


def train(cfg: TrainConfig, *, base=None, tokenizer=None, log=print) -> dict:
    """Run (or resume) training; `base`/`tokenizer` may be passed in-process instead of `cfg.model`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from medusa.chat_format import read_template, use_template
    from medusa.inference.loading import load_base_model

    if cfg.chat_template is not None:
        read_template(cfg.chat_template)          # before loading
    if not Path(cfg.data).is_file():
        raise FileNotFoundError(f"training data not found: {cfg.data}")
    # cpu=True where there is no accelerator: only then does accelerate join a torchrun / mpirun launch of
    # several CPU processes (gloo) instead of letting each train alone into the same folder
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=not torch.accelerator.is_available())
    launched = int(os.environ.get("WORLD_SIZE", acc.num_processes))     # torchrun / accelerate launch set it
    if acc.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes but accelerate joined {acc.num_processes}: they would "
                           f"each train alone into {cfg.output}; check the launcher's settings (`accelerate env`)")
    say = lambda m: acc.is_main_process and log(m)
    set_seed(cfg.seed)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if base is None:
        base, tokenizer = load_base_model(cfg.model, dtype=cfg.base_dtype, device=acc.device,
                                          quantize=cfg.quantize or "none", log=say)
    tok = tokenizer
    use_template(tok, cfg.chat_template, say)
    val, train_ex = split_examples(cfg, tok, warn=say)
    n_val = len(val)
    say(f"{len(train_ex)} training conversations ({sum(e.loss_mask.sum().item() for e in train_ex)} assistant "
        f"tokens), {n_val} held out")
    text_cfg = base.config.get_text_config(decoder=True)
    hcfg = HeadsConfig(hidden_size=text_cfg.hidden_size, vocab_size=base.get_output_embeddings().weight.shape[0],
                       num_heads=cfg.num_heads, num_layers=cfg.num_layers, shared_lm_head=cfg.shared_lm_head,
                       next_token_input=cfg.next_token_input, parent_token_input=cfg.parent_token_input,
                       base_model_name_or_path=cfg.model or "embedded:SmolLM2-135M-Instruct")
    heads = MedusaHeads(hcfg)
    heads.init_projections_from(base.get_output_embeddings().weight)
    if cfg.draft_vocab:      # before training: the heads learn to choose among the tokens they will guess from
        seen = torch.cat([e.input_ids[e.loss_mask] for e in train_ex])
        set_draft_vocab(heads, torch.bincount(seen, minlength=hcfg.vocab_size)[: hcfg.vocab_size])
    heads.to(acc.device)
    for p in base.parameters():
        p.requires_grad_(False)

    if cfg.mode == "medusa1":
        from medusa.training.features import (FeatureDataset, build_feature_cache, cache_key,
                                              collate_features)

        topk = cfg.kl_topk if cfg.loss == "kl" else 0
        key = cache_key(str(cfg.model), cfg.max_length, topk, base.dtype)
        feat_dir = out_dir / f"features-{key}"
        build_feature_cache(base, train_ex, feat_dir, topk=topk, process_index=acc.process_index,
                            num_processes=acc.num_processes, log=say)
        acc.wait_for_everyone()
        dataset, collate_fn = FeatureDataset(feat_dir, train_ex), collate_features
        step_module = Medusa1Step(heads, base.get_output_embeddings(), base.get_input_embeddings(), cfg)
        groups = [{"params": [p for p in heads.parameters() if p.requires_grad], "lr": cfg.lr}]
    else:
        from peft import LoraConfig, get_peft_model

        base = get_peft_model(base, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))
        dataset, collate_fn = train_ex, collate
        step_module = Medusa2Step(base, heads, cfg)
        groups = [{"params": [p for p in heads.parameters() if p.requires_grad], "lr": cfg.lr},
                  {"params": [p for p in base.parameters() if p.requires_grad], "lr": cfg.base_lr}]
    per_epoch = math.ceil(len(dataset) / cfg.batch_size / acc.num_processes / cfg.grad_accum)
    total = max(1, int(per_epoch * cfg.epochs))
    warmup = max(1, int(total * cfg.warmup_ratio))
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    lambdas = [_schedule(total, warmup)] + [_schedule(total, warmup, cfg.heads_warmup_steps)] * (len(groups) - 1)
    # accelerate steps a prepared scheduler once per process at each optimizer step (it assumes a schedule
    # counted in single-process batches); ours counts optimizer steps
    n = acc.num_processes
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s, f=f: f(s // n) for f in lambdas])
    step_module, opt, sched = acc.prepare(step_module, opt, sched)

    ckpt_dir = out_dir / "checkpoints"
    latest, step = _latest_checkpoint(ckpt_dir, say)
    run = {"train_examples": len(dataset), "total_steps": total, "mode": cfg.mode, "num_heads": cfg.num_heads,
           "num_layers": cfg.num_layers, "shared_lm_head": cfg.shared_lm_head,
           **({"next_token_input": True} if cfg.next_token_input else {}),
           **({"parent_token_input": True} if cfg.parent_token_input else {}), "batch_size": cfg.batch_size,
           "epochs": cfg.epochs, "seed": cfg.seed, "draft_vocab": cfg.draft_vocab}
    run_file = out_dir / "run.json"
    if latest is not None:
        before = json.loads(run_file.read_text()) if run_file.exists() else None
        if before != run:
            changed = sorted(k for k in run if (before or {}).get(k) != run[k])
            raise ValueError(f"{out_dir} holds checkpoints of a different run (changed: {', '.join(changed)}); "
                             f"resume only with the same data and settings, or use a new --output folder")
        acc.load_state(str(latest))
        # time spent before the kill counts: logs and result are totals
        t_start -= json.loads((latest / "elapsed.json").read_text())["seconds"]
        saved = out_dir / OUR_CONFIG
        if step >= total and saved.is_file() and (out_dir / OUR_WEIGHTS).is_file():
            result = json.loads(saved.read_text()).get("extra", {}).get("result")
            if result and result.get("finished") and result.get("step") == step:
                say(f"{out_dir} holds the finished run (step {step} of {total}): nothing to do")
                return result
        say(f"resumed from {latest} (step {step} of {total})")
    elif acc.is_main_process:
        run_file.write_text(json.dumps(run, indent=1) + "\n")
    log_file = out_dir / "train_log.jsonl"
    if acc.is_main_process:
        _trim_log(log_file, step)
    run_steps, done = 0, step >= total
    while not done:
        epoch, skip = divmod(step * cfg.grad_accum, per_epoch * cfg.grad_accum)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=cfg.batch_size,
                                             collate_fn=collate_fn)
        loader = acc.skip_first_batches(acc.prepare(loader), skip)
        for batch in loader:
            with acc.accumulate(step_module):
                loss, stats = step_module(batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(step_module.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
            if not acc.sync_gradients:
                continue
            step, run_steps = step + 1, run_steps + 1
            if step % cfg.log_every == 0 or step == total:
                rec = {"step": step, "total": total, "loss": round(loss.item(), 4), "lr": sched.get_last_lr()[0],
                       "top1": [round(x, 3) for x in stats.top1.tolist()],
                       "top5": [round(x, 3) for x in stats.top5.tolist()], "elapsed_s": round(time.time() - t_start)}
                if stats.base_kl is not None:
                    rec["base_kl"] = round(stats.base_kl.item(), 5)
                say(f"{json.dumps(rec)}  (top1/top5: per-head accuracy on this step's training batch)")
                if acc.is_main_process:
                    with log_file.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
            stop_now = cfg.stop_after is not None and run_steps >= cfg.stop_after
            if step % cfg.checkpoint_every == 0 or step == total or stop_now:
                _save_checkpoint(acc, ckpt_dir, step, time.time() - t_start)
            if step >= total:
                done = True
                break
            if stop_now:
                say(f"stopped after {run_steps} steps at step {step}/{total}; re-run to resume")
                return {"step": step, "total": total, "finished": False}
    acc.wait_for_everyone()
    step_module = acc.unwrap_model(step_module)
    from medusa.training.accuracy import head_accuracy

    accuracy = head_accuracy(step_module.base if cfg.mode == "medusa2" else base, step_module.heads, val)
    result = {"step": step, "total": total, "finished": True, "train_examples": len(train_ex),
              "seconds": round(time.time() - t_start), "val_accuracy": accuracy}
    if cfg.draft_vocab:
        result["draft_vocab_size"] = hcfg.draft_vocab_size or hcfg.vocab_size
    if acc.is_main_process:
        hcfg.extra = {"training": {**asdict(cfg), "extra": None}, "result": result, **cfg.extra}
        if cfg.mode == "medusa2":
            step_module.base.save_pretrained(str(out_dir / "adapter"))
            hcfg.extra["adapter"] = "adapter"
            if cfg.save_merged:
                merged = step_module.base.merge_and_unload()
                merged.save_pretrained(str(out_dir / "merged"))
                tok.save_pretrained(str(out_dir / "merged"))
        save_heads(out_dir, step_module.heads)
        say(json.dumps({"saved": str(out_dir), **result}))
    return result
