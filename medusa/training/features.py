"""Frozen-base features for Medusa-1: the base's last hidden states (and, for the KL loss, its top-k
log-probabilities) computed once and cached in safetensors shards, so every epoch costs only the heads.

Each example is stored under a hash of its token ids, so a data set that grows between runs (a
distillation still going on) only adds the new examples. Shards are written atomically: a killed run
resumes where it stopped. With several processes (accelerate / torchrun) each computes its share.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medusa.inference.quantized import device_of
from medusa.inference.verify import NO_LOGITS
from medusa.training.data import Example, collate

SHARD = 64  # examples per shard


def cache_key(model_name: str, max_length: int, topk: int, dtype: torch.dtype) -> str:
    """The cache folder's name: what the features depend on besides the examples themselves."""
    raw = json.dumps([model_name, max_length, topk, str(dtype)])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def example_key(ex: Example) -> str:
    data = ex.input_ids.numpy().tobytes() + ex.loss_mask.numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:20]


def _cached_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for path in folder.glob("shard-*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys |= {k.split(".", 1)[1] for k in f.keys() if k.startswith("hidden.")}
    return keys


def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, logits: bool = False):
    """The base's last hidden state (B, T, H) -- the heads' input -- and its logits (B, T, V) if `logits`, else
    None: the output projection is then skipped (a fifth of SmolLM2's forward, and a (B, T, 49152) tensor)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=0 if logits else NO_LOGITS)
    return out.hidden_states[-1], out.logits if logits else None


@torch.inference_mode()
def _compute(model, examples: list[Example], topk: int, dtype: torch.dtype, batch_size: int) -> dict:
    out = {}
    device = device_of(model.get_input_embeddings())
    order = sorted(range(len(examples)), key=lambda k: examples[k].input_ids.numel())
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([examples[k] for k in idx])
        hidden, logits = last_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                     logits=topk > 0)
        for row, k in enumerate(idx):
            n = examples[k].input_ids.numel()
            out[f"hidden.{k}"] = hidden[row, :n].to(dtype).cpu().contiguous()
            if topk:
                lp = torch.log_softmax(logits[row, :n].float(), dim=-1).topk(topk, dim=-1)
                out[f"topk_logp.{k}"] = lp.values.half().cpu().contiguous()
                out[f"topk_idx.{k}"] = lp.indices.int().cpu().contiguous()
    return out


def build_feature_cache(model, examples: list[Example], folder: str | Path, *, topk: int = 0,
                        dtype: torch.dtype = torch.bfloat16, batch_size: int = 8, process_index: int = 0,
                        num_processes: int = 1, log=None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = _cached_keys(folder)
    todo = {example_key(e): e for e in examples}
    todo = [(k, e) for k, e in sorted(todo.items()) if k not in have]
    n_shards = (len(todo) + SHARD - 1) // SHARD
    for shard in range(process_index, n_shards, num_processes):
        part = todo[shard * SHARD:(shard + 1) * SHARD]
        feats = _compute(model, [e for _, e in part], topk, dtype, batch_size)
        tensors = {}
        for j, (key, ex) in enumerate(part):
            tensors[f"input_ids.{key}"] = ex.input_ids
            tensors[f"loss_mask.{key}"] = ex.loss_mask.to(torch.uint8)
            for name in ("hidden", "topk_logp", "topk_idx"):
                if f"{name}.{j}" in feats:
                    tensors[f"{name}.{key}"] = feats[f"{name}.{j}"]
        path = folder / f"shard-{part[0][0]}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        if log:
            log(f"features: {min((shard + 1) * SHARD, len(todo))}/{len(todo)} new examples "
                f"({len(have)} cached before)")
    return folder


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features of `examples`, held in memory: item k -> dict of input_ids, loss_mask, hidden (+ topk_*)."""

    def __init__(self, folder: str | Path, examples: list[Example]):
        wanted: dict[str, list[int]] = {}
        for k, e in enumerate(examples):           # identical examples share one cache entry
            wanted.setdefault(example_key(e), []).append(k)
        self.items: list[dict] = [dict() for _ in examples]
        for path in sorted(Path(folder).glob("shard-*.safetensors")):
            for name_key, value in load_file(str(path)).items():
                name, key = name_key.split(".", 1)
                for k in wanted.get(key, ()):
                    self.items[k][name] = value.bool() if name == "loss_mask" else value
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
