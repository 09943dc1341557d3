"""Heads checkpoints on disk: our format, and the original Medusa format published checkpoints use.

Ours:      medusa_config.json (HeadsConfig + "medusa_heads": true), heads.safetensors, optional tree.json.
Original:  config.json with medusa_num_heads / medusa_num_layers / base_model_name_or_path, weights in
           medusa_lm_head.safetensors (or a pickled medusa_lm_head.pt, read with weights_only=True), keys
           `{head}.{layer}.linear.weight|bias` and `{head}.{num_layers}.weight` (own projection); the later
           variant has ResBlock weights only and shares the base's projection.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medusa.inference.heads import HeadsConfig, MedusaHeads
from medusa.inference.loading import hub_reachable, weights_only_refusal
from medusa.inference.tree import ANY_DEVICE, trees_from_json, trees_to_json

OUR_CONFIG, OUR_WEIGHTS, TREE_FILE = "medusa_config.json", "heads.safetensors", "tree.json"
ORIG_CONFIG, ORIG_WEIGHTS = "config.json", ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
_ORIG_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def is_heads_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / OUR_CONFIG).is_file():
        return True
    cfg = path / ORIG_CONFIG
    return cfg.is_file() and "medusa_num_heads" in _read_json(cfg)


def fetch_heads_repo(repo_id: str) -> Path | None:
    """A Hub repo of heads (ours or original format, e.g. FasterDecoding/medusa-vicuna-7b-v1.3) -> its local
    snapshot with only the heads files; None when the repo holds no heads (a base model) or cannot be read.
    Where the Hub cannot be reached, only the local cache is read (at once, without huggingface_hub's retries)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    local_only = not hub_reachable()
    for name in (OUR_CONFIG, ORIG_CONFIG):
        try:
            cfg = Path(hf_hub_download(repo_id, name, local_files_only=local_only))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError):
            continue
        if name == OUR_CONFIG or "medusa_num_heads" in _read_json(cfg):
            return Path(snapshot_download(repo_id, allow_patterns=[OUR_CONFIG, OUR_WEIGHTS, TREE_FILE, ORIG_CONFIG,
                                                                   *ORIG_WEIGHTS, "adapter/*"],
                                          local_files_only=local_only))
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load safetensors, or a pickled .pt with weights_only=True; a damaged file's name is in the error."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"cannot read heads weights {path}: the file is truncated or corrupt ({e})") from None
    except Exception as e:  # the unpickler refuses arbitrary objects: say why
        raise ValueError(f"cannot read {path}: {type(e).__name__}: torch.load(weights_only=True) refuses it "
                         f"({weights_only_refusal(e)})") from None
    # weights_only still admits a bare tensor, a list or nested dicts: a state dict is a flat {name: tensor}
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (a flat dict of name -> tensor) "
                         f"but a {type(state).__name__}")
    return state


def save_heads(folder: str | Path, heads: MedusaHeads, tree: list | dict | None = None, *,
               config: HeadsConfig | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `heads` in our format, the one writer of it (training, save_pretrained, export, the default heads'
    recipe): medusa_config.json from `config` (default: the heads' own), heads.safetensors with the floats in
    `dtype` (default: as they are), and with `tree` tree.json: paths for every device, or {device type: paths}
    (see tree.trees_from_json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (config or heads.config).save(folder)
    cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v   # token ids stay integers
    state = {k: cast(v.detach()).contiguous().cpu() for k, v in heads.state_dict().items()}
    save_file(state, str(folder / OUR_WEIGHTS), metadata={"format": "pt"})
    if tree is not None:
        write_trees(folder, tree)
    return folder


def write_trees(folder: Path, tree: list | dict) -> None:
    trees = tree if isinstance(tree, dict) else {ANY_DEVICE: tree}
    (folder / TREE_FILE).write_text(json.dumps(trees_to_json(trees)) + "\n")


def _from_original(folder: Path) -> tuple[HeadsConfig, dict]:
    cfg = _read_json(folder / ORIG_CONFIG)
    weights = next((folder / w for w in ORIG_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has a Medusa config.json but no {' or '.join(ORIG_WEIGHTS)}")
    raw = _load_weights(weights)
    parsed = {}
    for key, value in raw.items():
        m = _ORIG_KEY.match(key)
        if not m:
            raise ValueError(f"{weights}: unexpected key {key!r} for an original-format Medusa checkpoint")
        parsed[(int(m.group(1)), int(m.group(2)), m.group(3))] = value
    num_heads = 1 + max(h for h, _, _ in parsed)
    num_layers = 1 + max((layer for _, layer, kind in parsed if kind.startswith("linear")), default=-1)
    proj = {h: v for (h, layer, kind), v in parsed.items() if kind == "weight" and layer == num_layers}
    hidden = parsed[(0, 0, "linear.weight")].shape[1] if num_layers else next(iter(proj.values())).shape[1]
    for name, claimed, actual in (("medusa_num_heads", cfg.get("medusa_num_heads"), num_heads),
                                  ("medusa_num_layers", cfg.get("medusa_num_layers"), num_layers)):
        if claimed is not None and claimed != actual:
            warnings.warn(f"{folder / ORIG_CONFIG} says {name}={claimed!r} but {weights.name} holds {actual}; "
                          f"using {actual} from the weights", stacklevel=3)
    shared = not proj
    if not shared and len(proj) != num_heads:
        raise ValueError(f"{weights}: {len(proj)} of {num_heads} heads have an output projection")
    state = {}
    for (h, layer, kind), v in parsed.items():
        if kind == "weight":
            state[f"heads.{h}.proj.weight"] = v
        else:
            state[f"heads.{h}.blocks.{layer}.{kind}"] = v
    vocab = next(iter(proj.values())).shape[0] if proj else cfg.get("vocab_size", 0)
    try:
        config = HeadsConfig(hidden_size=hidden, vocab_size=vocab, num_heads=num_heads, num_layers=num_layers,
                             shared_lm_head=shared, base_model_name_or_path=cfg.get("base_model_name_or_path"),
                             extra={"converted_from": "original Medusa format"})
    except ValueError as e:
        raise ValueError(f"{folder / ORIG_CONFIG}: {e}") from None
    return config, state


def load_heads_checkpoint(folder: str | Path) -> tuple[HeadsConfig, dict, dict | None]:
    """Read a heads folder of either format -> (config, state dict in our key names, its trees or None):
    {device type or tree.ANY_DEVICE: paths} (pick one with tree.tree_for_device)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"heads folder does not exist: {folder}")
    if (folder / OUR_CONFIG).is_file():
        data = _read_json(folder / OUR_CONFIG)
        try:
            config = HeadsConfig.from_dict(data)
        except (TypeError, ValueError) as e:      # a field missing, or of the wrong type
            raise ValueError(f"{folder / OUR_CONFIG}: {e}") from None
        weights = folder / OUR_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} has {OUR_CONFIG} but no {OUR_WEIGHTS}")
        state = _load_weights(weights)
    elif is_heads_folder(folder):
        config, state = _from_original(folder)
    else:
        raise ValueError(f"{folder} is not a Medusa heads folder (no {OUR_CONFIG}, no config.json with medusa_num_heads)")
    tree = None
    if (folder / TREE_FILE).is_file():
        try:
            tree = trees_from_json(_read_json(folder / TREE_FILE))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{folder / TREE_FILE}: {e}") from None
    return config, state, tree


def build_heads(config: HeadsConfig, state: dict | None = None) -> MedusaHeads:
    heads = MedusaHeads(config)
    if state is not None:
        missing, unexpected = heads.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"heads weights do not match their config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return heads
