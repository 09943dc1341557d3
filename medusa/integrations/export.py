"""Heads in the formats serving engines load: the original Medusa format (TGI, TensorRT-LLM) and vLLM's.

What their loaders read (from their sources, 2024-2026):
- TGI (models/__init__.py, layers/speculative.py, layers/medusa.py): `medusa_num_heads` in config.json marks a
  Medusa folder; it then loads the base named by `base_model_name_or_path` (a Hub id or a path, revision
  "main") and reads weights from `medusa_lm_head.safetensors` only. If config.json has `architectures`,
  speculative.py looks for an MLP speculator and otherwise serves WITHOUT the heads, silently. Its
  MedusaHeadV1 reads `{h}.{l}.linear.weight|bias` for l < medusa_num_layers and the projection
  `{h}.{medusa_num_layers}.weight`; without projections it falls back to V2, which needs one layer. We always
  write projections (expanding a shared lm_head), so every layer count works.
- TensorRT-LLM (examples/medusa/convert_checkpoint.py, models/medusa/weight.py): medusa_num_heads and
  medusa_num_layers from config.json; the same keys from medusa_lm_head.pt, else .safetensors; projections
  required.
- vLLM (transformers_utils/configs/medusa.py, model_executor/models/medusa.py): config.json with model_type
  "medusa" (how a draft is recognised), hidden_size, vocab_size, num_heads, num_hidden_layers,
  truncated_vocab_size (= vocab_size: no token map), medusa_fc_bias (our blocks have biases),
  original_lm_head false (one projection per head); MedusaConfig's max_paths and topk keep their defaults
  (its v1 proposer takes each head's top-1). Weights from any *.safetensors, keys `blocks.{h}.layers.{l}.weight|bias`
  and `lm_heads.{h}.weight`.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from medusa.inference.checkpoint import (OUR_CONFIG, OUR_WEIGHTS, ORIG_CONFIG, ORIG_WEIGHTS, TREE_FILE, build_heads,
                                         load_heads_checkpoint, save_heads, write_trees)
from medusa.inference.heads import MedusaHeads
from medusa.inference.loading import resolve_dtype
from medusa.model import DEFAULT_HEADS_DIR, EMBEDDED_DEFAULT, MedusaModel

FORMATS = ("original", "vllm", "ours")
VLLM_WEIGHTS = "model.safetensors"
# The embedded default is SmolLM2-135M-Instruct's Q4_1 GGUF, dequantized; engines load the Hub original.
HUB_IDS = {EMBEDDED_DEFAULT: "HuggingFaceTB/SmolLM2-135M-Instruct"}
ORIGINAL_KEYS = ("{h}.{l}.linear", "{h}.{L}.weight")          # medusa_lm_head.safetensors
VLLM_KEYS = ("blocks.{h}.layers.{l}", "lm_heads.{h}.weight")   # model.safetensors
_WRITTEN = (ORIG_CONFIG, OUR_CONFIG, OUR_WEIGHTS, TREE_FILE, VLLM_WEIGHTS, *ORIG_WEIGHTS)


def hub_base_name(name: str | None) -> str | None:
    return HUB_IDS.get(name, name)


def _check_base_name(name: str | None) -> str:
    """TGI loads the base named in the heads' config.json: it must be there and loadable where TGI runs."""
    if not name:
        raise ValueError("the heads name no base model, and TGI loads the one their config names: "
                         "pass base_name= (--base-name)")
    if name.startswith(("/", ".", "~")) or name.endswith(".gguf") or Path(name).expanduser().exists():
        warnings.warn(f"base model {name!r} is a local path: an engine on another machine cannot load it; "
                      f"pass base_name= (--base-name) with its Hub id", stacklevel=3)
    return name


def _tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # a clone per entry: safetensors refuses tensors that share memory (the expanded lm_head copies would)
    dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype   # token ids stay integers
    return t.detach().to("cpu", dtype).contiguous().clone()


def projections(heads: MedusaHeads, lm_head_weight: torch.Tensor | None) -> list[torch.Tensor]:
    """One (V, H) output projection per head; heads sharing the base's lm_head get a copy of it each."""
    cfg = heads.config
    if not cfg.shared_lm_head:
        return [h.proj.weight for h in heads.heads]
    if lm_head_weight is None:
        raise ValueError("these heads share the base model's lm_head: pass its weight to write one per head")
    if tuple(lm_head_weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"lm_head weight is {tuple(lm_head_weight.shape)} but the heads need "
                         f"({cfg.vocab_size}, {cfg.hidden_size})")
    return [lm_head_weight] * heads.num_heads


def state_dict(heads: MedusaHeads, keys: tuple[str, str], lm_head_weight=None, dtype=None) -> dict[str, torch.Tensor]:
    """The heads' tensors under an engine's key names: `keys` = (block prefix, projection key) templates
    over head {h}, layer {l} and the number of layers {L}."""
    block, proj, num_layers = *keys, heads.config.num_layers
    state = {}
    for h, (head, weight) in enumerate(zip(heads.heads, projections(heads, lm_head_weight))):
        for layer, b in enumerate(head.blocks):
            state[block.format(h=h, l=layer) + ".weight"] = _tensor(b.linear.weight, dtype)
            state[block.format(h=h, l=layer) + ".bias"] = _tensor(b.linear.bias, dtype)
        state[proj.format(h=h, L=num_layers)] = _tensor(weight, dtype)
    return state


def original_config(heads: MedusaHeads, base_name: str) -> dict:
    cfg = heads.config   # no "architectures" key: see above
    return {"medusa_num_heads": cfg.num_heads, "medusa_num_layers": cfg.num_layers,
            "base_model_name_or_path": base_name, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}


def vllm_config(heads: MedusaHeads, base_name: str | None) -> dict:
    cfg = heads.config
    return {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "truncated_vocab_size": cfg.vocab_size, "num_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers, "medusa_fc_bias": True, "original_lm_head": False,
            **({"base_model_name_or_path": base_name} if base_name else {})}


def write_format(heads: MedusaHeads, out_dir: str | Path, fmt: str, *, base_name: str | None,
                 lm_head_weight: torch.Tensor | None = None, tree=None, dtype=None) -> Path:
    """Write `heads` to `out_dir` in `fmt` ("original", "vllm" or "ours"); returns the folder. `base_name` is the
    base model reference written (for the engines' formats the embedded default becomes its Hub id)."""
    out, dtype = Path(out_dir), resolve_dtype(dtype)
    if fmt != "ours" and heads.config.next_token_input:
        raise ValueError(f"these heads take the next token's embedding (next_token_input), which the {fmt!r} format "
                         "and the engines reading it have no place for; export them as 'ours', or train heads "
                         "without --next-token-input for vLLM, TGI or TensorRT-LLM")
    if fmt == "ours":
        config = replace(heads.config, base_model_name_or_path=base_name)
        return save_heads(out, heads, tree, config=config, dtype=dtype)
    if fmt == "original":
        config = original_config(heads, _check_base_name(hub_base_name(base_name)))
        state, weights = state_dict(heads, ORIGINAL_KEYS, lm_head_weight, dtype), ORIG_WEIGHTS[0]
    elif fmt == "vllm":   # vLLM is given the base (target) separately; the name here is for people
        config = vllm_config(heads, hub_base_name(base_name))
        state, weights = state_dict(heads, VLLM_KEYS, lm_head_weight, dtype), VLLM_WEIGHTS
    else:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / weights), metadata={"format": "pt"})
    (out / ORIG_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if fmt == "original" and tree is not None:   # engines ignore it: `medusa --model DIR` keeps the tuned trees
        write_trees(out, tree)
    return out


def _check_output(out: Path, source, overwrite: bool) -> None:
    if out.is_file():
        raise ValueError(f"output {out} is a file, not a folder")
    if isinstance(source, (str, Path)) and out.resolve() == Path(source).expanduser().resolve():
        raise ValueError(f"output folder {out} is the heads folder itself: export into another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} is not empty (use overwrite=True / --force)")


def _clear_output(out: Path) -> None:
    for name in _WRITTEN:   # a stale file of another format would decide how the folder is read
        (out / name).unlink(missing_ok=True)


def _load(source, fmt: str, base_model, log):
    """-> (heads, base lm_head module or None, tree or None). The base is loaded only when it is needed:
    heads that share its lm_head are written with a copy of it per head (except in our format)."""
    if isinstance(source, MedusaModel):
        heads, model, tree = source.heads, source, {source.device_type: source.tree}
    else:
        folder = Path(source).expanduser() if source is not None else DEFAULT_HEADS_DIR
        if source is None and not (folder / OUR_CONFIG).is_file():
            raise FileNotFoundError("no trained heads ship for the default model yet: "
                                    "pass a heads folder (--model DIR)")
        config, state, tree = load_heads_checkpoint(folder)
        model = None
        if config.shared_lm_head and fmt != "ours":
            model = MedusaModel.from_pretrained(folder, base_model=base_model, quantize="none", log=log)
            heads = model.heads
        else:
            heads = build_heads(config, state).eval()
    if model is None or not heads.config.shared_lm_head or fmt == "ours":
        return heads, None, tree
    lm_head = model.base_model.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        warnings.warn("the base model's lm_head has a bias; the exported projections (bias-free in every "
                      "engine's format) leave it out", stacklevel=3)
    return heads, lm_head, tree


def export(source, out_dir: str | Path, fmt: str = "original", *, base_model: str | None = None,
           base_name: str | None = None, dtype=None, overwrite: bool = False, log=None) -> Path:
    """Export heads from a MedusaModel, a heads folder (either format), or None (the default model's heads).

    `base_model` overrides the base to load (needed only for heads sharing its lm_head); `base_name` the base
    reference written (default: `base_model`, else the heads' own; the embedded default becomes its Hub id)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    _check_output(out, source, overwrite)
    heads, lm_head, tree = _load(source, fmt, base_model, log)
    _clear_output(out)
    name = base_name or (str(base_model) if base_model else heads.config.base_model_name_or_path)
    if heads.config.extra.get("adapter") and fmt != "ours" and not base_name:
        warnings.warn(f"these heads were trained with a LoRA-tuned base (Medusa-2): serve the merged base, "
                      f"not {name!r}, and name it with base_name= (--base-name)", stacklevel=2)
    return write_format(heads, out, fmt, base_name=name, tree=tree, dtype=dtype,
                        lm_head_weight=lm_head.weight if lm_head is not None else None)
