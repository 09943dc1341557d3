"""Frozen-base features for Medusa-1: the base's last hidden states (and, for the KL loss, its top-k
log-probabilities) computed once and cached in safetensors shards, so every epoch costs only the heads.

Shards are written atomically and skipped when present: a killed run resumes where it stopped. With
several processes (accelerate / torchrun) each computes its own shards.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medusa.training.data import Example, collate

SHARD = 64  # examples per shard


def cache_key(model_name: str, n_examples: int, max_length: int, topk: int, first_ids: list[int]) -> str:
    raw = json.dumps([model_name, n_examples, max_length, topk, first_ids[:64]])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@torch.inference_mode()
def _compute(model, examples: list[Example], topk: int, dtype: torch.dtype, batch_size: int) -> dict:
    out = {}
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(examples)), key=lambda k: examples[k].input_ids.numel())
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([examples[k] for k in idx])
        res = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    output_hidden_states=True)
        hidden = res.hidden_states[-1]
        for row, k in enumerate(idx):
            n = examples[k].input_ids.numel()
            out[f"hidden.{k}"] = hidden[row, :n].to(dtype).cpu().contiguous()
            if topk:
                lp = torch.log_softmax(res.logits[row, :n].float(), dim=-1).topk(topk, dim=-1)
                out[f"topk_logp.{k}"] = lp.values.half().cpu().contiguous()
                out[f"topk_idx.{k}"] = lp.indices.int().cpu().contiguous()
    return out


def build_feature_cache(model, examples: list[Example], folder: str | Path, *, topk: int = 0,
                        dtype: torch.dtype = torch.bfloat16, batch_size: int = 8, process_index: int = 0,
                        num_processes: int = 1, log=None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (len(examples) + SHARD - 1) // SHARD
    for shard in range(process_index, n_shards, num_processes):
        path = folder / f"shard-{shard:05d}.safetensors"
        if path.exists():
            continue
        lo = shard * SHARD
        part = examples[lo:lo + SHARD]
        feats = _compute(model, part, topk, dtype, batch_size)
        tensors = {}
        for j, ex in enumerate(part):
            tensors[f"input_ids.{lo + j}"] = ex.input_ids
            tensors[f"loss_mask.{lo + j}"] = ex.loss_mask.to(torch.uint8)
            for name in ("hidden", "topk_logp", "topk_idx"):
                if f"{name}.{j}" in feats:
                    tensors[f"{name}.{lo + j}"] = feats[f"{name}.{j}"]
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        if log:
            log(f"features: shard {shard + 1}/{n_shards}")
    return folder


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features held in memory: item k -> dict of input_ids, loss_mask, hidden (+ topk_*)."""

    def __init__(self, folder: str | Path, n_examples: int):
        self.items: list[dict] = [dict() for _ in range(n_examples)]
        for path in sorted(Path(folder).glob("shard-*.safetensors")):
            for key, value in load_file(str(path)).items():
                name, k = key.rsplit(".", 1)
                self.items[int(k)][name] = value.bool() if name == "loss_mask" else value
        missing = [k for k, it in enumerate(self.items) if "hidden" not in it]
        if missing:
            raise RuntimeError(f"feature cache {folder} lacks {len(missing)} examples (e.g. #{missing[0]})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        return self.items[k]


def collate_features(items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a batch of cached items; padded positions have loss_mask False."""
    T = max(it["input_ids"].numel() for it in items)
    out = {}
    for name in items[0]:
        first = items[0][name]
        shape = (len(items), T, *first.shape[1:])
        buf = torch.zeros(shape, dtype=first.dtype)
        for i, it in enumerate(items):
            buf[i, : it[name].shape[0]] = it[name]
        out[name] = buf
    return out
