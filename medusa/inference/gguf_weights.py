"""A GGUF file's quantized weights kept as they are stored: its blocks become `Int4Linear` / `QuantEmbedding`
modules (quantized.py) in place of dequantized fp32 weights.

Block formats (32 weights each, scales in fp16) and how they map onto the 4-bit kernel's `(q - 8) * s + z`:

    Q4_0   d, 16 bytes of 4-bit q    w = d (q - 8)        -> codes q, scale d, zero 0
    Q4_1   d, m, 16 bytes of q       w = d q + m          -> codes q, scale d, zero m + 8 d
    Q8_0   d, 32 int8 c              w = d c              -> two 4-bit halves (quantized.py)
    Q4_K   256 weights: d, dmin, 6-bit scale sc and min m per 32, 4-bit q
                                     w = (d sc) q - dmin m  -> codes q, scale d sc, zero 8 d sc - dmin m

In a Q4_0 / Q4_1 block the first 16 weights are the bytes' low nibbles and the next 16 their high nibbles; in
Q4_K each 32 bytes hold two groups, the low nibbles' and then the high nibbles'. The kernel
holds scales and zeros in bf16, which keeps 8 of fp16's 11 significant bits: the weights it multiplies by are
within half a bf16 unit of each scale and zero (a small fraction of one quantization step) of GGUF's own
dequantization, which embeddings reproduce exactly. Other types (the other K-quants, F16) are held dequantized
(Q6_K's groups of 16 do not fit the kernel's 32).

Two ways in:
- `load_model(path, config)` builds the model of `config` with empty weights and fills it from the file. Each
  tensor is dequantized with `gguf`'s own code and passed through transformers' conversion of GGUF tensors
  (what its GGUF loading does: the model's name for the tensor, and any reordering, e.g. of llama-family query
  and key rows). A tensor of a type above whose conversion only reorders rows, and whose parameter is a linear
  or embedding layer's weight, becomes that layer's Int4Linear / QuantEmbedding, made from its blocks with the
  rows in the converted order (found by content); every other tensor is copied into the model dequantized.
- `keep_quantized(model, path)` does the same for a model already loaded dequantized (a base whose adapter was
  merged into it), matching tensors to layers by content: each tensor goes to the weight that equals its
  dequantization up to a permutation of rows. A weight that matches nothing (changed by the adapter) stays as
  loaded.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medusa.inference.quantized import GROUP, Int4Linear, QuantEmbedding, fits, int8_parts

SUPPORTED = ("Q4_0", "Q4_1", "Q8_0", "Q4_K")


def _fp16(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16).astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """(blocks, 16) bytes -> (blocks, 32) codes 0..15: low nibbles first, then high."""
    return torch.from_numpy(np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8))


def decode_blocks(kind: str, raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A tensor's raw blocks -> (codes (n, k) int8, scale (n, k/32), zero (n, k/32) or None) with
    w = codes * scale + zero computed exactly as `gguf`'s dequantization does (codes signed for Q4_0 and Q8_0)."""
    if kind == "Q4_K":
        return _decode_q4_k(np.asarray(raw, dtype=np.uint8), n, k)
    b = np.asarray(raw, dtype=np.uint8).reshape(n * (k // GROUP), -1)
    d = _fp16(b[:, :2]).reshape(n, -1)
    if kind == "Q4_0":
        return (_nibbles(b[:, 2:]) - 8).reshape(n, k), d, None
    if kind == "Q4_1":
        return _nibbles(b[:, 4:]).reshape(n, k), d, _fp16(b[:, 2:4]).reshape(n, -1)
    if kind == "Q8_0":
        return torch.from_numpy(np.ascontiguousarray(b[:, 2:]).view(np.int8)).reshape(n, k), d, None
    raise ValueError(f"GGUF tensor type {kind} is not kept quantized (supported: {', '.join(SUPPORTED)})")


def _decode_q4_k(raw: np.ndarray, n: int, k: int):
    import gguf

    b = raw.reshape(n * (k // gguf.quants.QK_K), -1)
    d, dmin = _fp16(b[:, :2]), _fp16(b[:, 2:4])                            # (blocks, 1)
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))  # (blocks, 8) each
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = torch.from_numpy((qs & 0x0F).astype(np.int8)).reshape(n, k)
    scale = (d * torch.from_numpy(sc.astype(np.float32))).reshape(n, -1)
    zero = -(dmin * torch.from_numpy(m.astype(np.float32))).reshape(n, -1)
    return codes, scale, zero


def int4_parts(kind: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None):
    """`decode_blocks`' output -> Int4Linear parts."""
    if kind == "Q4_0":
        return [(codes + 8, scale, torch.zeros_like(scale))]
    if kind in ("Q4_1", "Q4_K"):
        return [(codes, scale, zero + 8 * scale)]
    if kind == "Q8_0":
        return int8_parts(codes, scale)
    raise ValueError(f"GGUF tensor type {kind} is not kept quantized (supported: {', '.join(SUPPORTED)})")


class _Tensor:
    """One quantized GGUF tensor: its blocks, its shape as a torch weight (n, k), and its dequantization."""

    def __init__(self, t):
        self.name, self.kind, self.raw = t.name, t.tensor_type.name, t.data
        self.n, self.k = int(t.shape[1]), int(t.shape[0])
        self._type = t.tensor_type

    def dense(self) -> np.ndarray:
        import gguf

        return gguf.quants.dequantize(self.raw, self._type).reshape(self.n, self.k)


def _keepable(t) -> bool:
    """Whether a tensor of the file can be held quantized: 2-D, of a type in SUPPORTED."""
    return t.tensor_type.name in SUPPORTED and len(t.shape) == 2


def _fingerprint(w: np.ndarray) -> str:
    """A digest of the rows' sums, unchanged by reordering rows."""
    return hashlib.sha1(np.sort(w.astype(np.float64).sum(axis=1)).tobytes()).hexdigest()


def _row_order(ref: np.ndarray, w: np.ndarray):
    """None where `w` equals the dequantized `ref` as it is, the row order of `ref` that makes it so, or False."""
    if ref.shape != w.shape:
        return False
    if np.array_equal(ref, w):
        return None
    rows = {r.tobytes(): i for i, r in enumerate(ref)}
    order = [rows.get(r.tobytes()) for r in w]
    return False if None in order else torch.tensor(order)


def _quantized_module(t: _Tensor, order, module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The Int4Linear / QuantEmbedding holding tensor `t`'s blocks, rows in `order` (None: as stored), in place of
    the linear or embedding layer `module`."""
    codes, scale, zero = decode_blocks(t.kind, t.raw, t.n, t.k)
    if order is not None:
        codes, scale = codes[order], scale[order]
        zero = None if zero is None else zero[order]
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(codes, scale, zero, padding_idx=module.padding_idx, dtype=dtype)
    return Int4Linear(int4_parts(t.kind, codes, scale, zero), module.bias)


def _log_report(log, path, report) -> None:
    if log:
        kinds = sorted({k for _, _, k in report["kept"]})
        log(f"Keeping {len(report['kept'])} weights of {Path(path).name} quantized ({', '.join(kinds) or 'none'}: "
            f"4-bit products); {len(report['dense'])} as loaded")


def load_model(path: str | Path, config, *, dtype: torch.dtype = torch.float32, log=None) -> nn.Module:
    """The causal LM of `config` (a transformers config read from the file) with its weights read from the GGUF
    file at `path`: quantized layers where its blocks fit (see the module's docstring), the rest in `dtype`."""
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    reader = gguf.GGUFReader(str(path))
    with init_empty_weights():                      # parameters on the meta device, buffers computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()                             # tied weights become one parameter (not done while empty)
    convert, set_aside = _transformers_conversion(reader, model)
    aliases = _aliases(model)
    kept, report = [], {"kept": [], "dense": []}
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        name, w = convert(t.name, ref)
        if name not in aliases:                     # not the model's, or a buffer it computes itself
            continue
        layers = [model.get_submodule(n.rpartition(".")[0]) for n in aliases[name]]
        layer_weight = name.endswith(".weight") and all(isinstance(m, (nn.Linear, nn.Embedding)) for m in layers)
        order = _row_order(ref, w) if _keepable(t) and layer_weight and fits(w.shape[-1]) else False
        if order is False:
            _assign(model, aliases[name], torch.from_numpy(np.copy(w)).to(dtype))
            if layer_weight:
                report["dense"].append((name, t.tensor_type.name))
        else:
            kept.append((_Tensor(t), order, aliases[name]))
    for name, tensor in set_aside.items():
        _assign(model, aliases[name], tensor.to(dtype))
    for t, order, names in kept:                    # after the biases are in place
        for name in names:
            layer = name.rpartition(".")[0]
            model.set_submodule(layer, _quantized_module(t, order, model.get_submodule(layer), dtype))
            report["kept"].append((layer, t.name, t.kind))
    empty = [n for n, x in [*model.named_parameters(), *model.named_buffers()] if x.is_meta]
    if empty:
        raise ValueError(f"{Path(path).name}: transformers' conversion of its tensors left {len(empty)} of the "
                         f"model's weights unset ({', '.join(empty[:3])}, ...); quantize='none' loads it as "
                         f"transformers does")
    _log_report(log, path, report)
    return model


def _transformers_conversion(reader, model):
    """transformers' conversion of a GGUF file's tensors into `model`'s, as its own GGUF loading applies it:
    (convert, set_aside). convert(gguf name, dequantized array) -> (the model's parameter name or None, array);
    set_aside: {parameter name: tensor} that the conversion assembles itself (e.g. experts merged into one)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, read_field)

    config = model.config.to_dict()
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(config=config)
    # transformers builds gguf's name table again for each of the model's modules (400 for the default model:
    # 10 s); built once, the same table serves them all
    build = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(build)
    try:
        names = get_gguf_hf_weights_map(model, processor)
    except NotImplementedError as e:               # gguf has no name table for this architecture
        raise ValueError(f"cannot read a {model.config.model_type} model's weights from a GGUF file: "
                         f"{str(e).split('. ')[0]}") from None
    finally:
        gguf.get_tensor_name_map = build
    parsed = {"config": config, "tensors": {}}

    def convert(name: str, weights: np.ndarray):
        out = processor.process(weights=weights, name=name, tensor_key_mapping=names, parsed_parameters=parsed)
        return names.get(out.name), out.weights

    return convert, parsed["tensors"]


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's name -> every name it goes by (tied weights are one parameter under two names)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def _assign(model: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Make `value` the parameter under each of `names` (one parameter, so tied weights stay tied)."""
    param = nn.Parameter(value, requires_grad=model.get_parameter(names[0]).requires_grad)
    for name in names:
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, param)


def _dense(module: nn.Module) -> np.ndarray:
    return module.weight.detach().float().cpu().numpy()


def _targets(model: nn.Module):
    """(name, parent, attribute, module) for each linear and embedding layer, the output projection included."""
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, (nn.Linear, nn.Embedding)):
                yield f"{name}.{attr}" if name else attr, parent, attr, child


def keep_quantized(model: nn.Module, path: str | Path, *, log=None) -> dict:
    """Replace `model`'s layers loaded from the GGUF file at `path` by modules holding its quantized blocks,
    matched by content. Returns {"kept": [(module, gguf tensor, type)], "dense": [(module, why)]}."""
    import gguf

    tensors = [_Tensor(t) for t in gguf.GGUFReader(str(path)).tensors if _keepable(t)]
    waiting: dict[tuple, list] = {}        # (shape, fingerprint) -> the layers whose weights give them, and those
    for target in list(_targets(model)):
        w = _dense(target[3])
        waiting.setdefault((w.shape, _fingerprint(w)), []).append((target, w))
    report = {"kept": [], "dense": []}
    for t in tensors:
        ref = t.dense()                    # each tensor dequantized once
        group = waiting.get((ref.shape, _fingerprint(ref)), [])
        for entry in list(group):
            (name, parent, attr, module), w = entry
            order = _row_order(ref, w)
            if order is False:
                continue
            group.remove(entry)
            if not fits(t.k):
                report["dense"].append((name, f"{t.k} inputs are not a multiple of {GROUP}"))
                continue
            new = _quantized_module(t, order, module, module.weight.dtype)
            setattr(parent, attr, new.to(module.weight.device))
            report["kept"].append((name, t.name, t.kind))
    report["dense"] += [(target[0], "no quantized tensor of the file holds these weights")
                        for group in waiting.values() for target, _ in group]
    _log_report(log, path, report)
    return report
