"""A GGUF file's quantized weights kept as they are stored: its blocks become `Int4Linear` / `QuantEmbedding`
modules (quantized.py) in place of the dequantized fp32 weights transformers loads.

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
dequantization, which embeddings reproduce exactly. Other types (the K-quants, F16) stay as transformers
dequantized them (Q6_K's groups of 16 do not fit the kernel's 32).

Which module holds which tensor is found by content, not by name: each GGUF tensor is dequantized with `gguf`'s
own code (as transformers does when loading the file) and matched to the model weight that equals it, up to a
permutation of its rows (transformers reorders llama-family query and key rows). A weight that matches nothing
(changed since, e.g. a merged adapter) stays as loaded.
"""
from __future__ import annotations

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
    return torch.from_numpy(np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32))


def decode_blocks(kind: str, raw: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A tensor's raw blocks -> (codes (n, k), scale (n, k/32), zero (n, k/32) or None) with
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
        return torch.from_numpy(np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.int32)).reshape(n, k), d, None
    raise ValueError(f"GGUF tensor type {kind} is not kept quantized (supported: {', '.join(SUPPORTED)})")


def _decode_q4_k(raw: np.ndarray, n: int, k: int):
    import gguf

    b = raw.reshape(n * (k // gguf.quants.QK_K), -1)
    d, dmin = _fp16(b[:, :2]), _fp16(b[:, 2:4])                            # (blocks, 1)
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))  # (blocks, 8) each
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = torch.from_numpy((qs & 0x0F).astype(np.int32)).reshape(n, k)
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


def _fingerprint(w: np.ndarray) -> str:
    """A digest of the rows' sums, unchanged by reordering rows."""
    return hashlib.sha1(np.sort(w.astype(np.float64).sum(axis=1)).tobytes()).hexdigest()


def _row_order(ref: np.ndarray, w: np.ndarray):
    """None where `w` equals the dequantized `ref` as it is, the row order of `ref` that makes it so, or False."""
    if np.array_equal(ref, w):
        return None
    rows = {r.tobytes(): i for i, r in enumerate(ref)}
    order = [rows.get(r.tobytes()) for r in w]
    return False if None in order else torch.tensor(order)


def _dense(module: nn.Module) -> np.ndarray:
    return module.weight.detach().float().cpu().numpy()


def _targets(model: nn.Module):
    """(parent, attribute, module) for each linear and embedding layer, the output projection included."""
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, (nn.Linear, nn.Embedding)):
                yield f"{name}.{attr}" if name else attr, parent, attr, child


def keep_quantized(model: nn.Module, path: str | Path, *, log=None) -> dict:
    """Replace `model`'s layers loaded from the GGUF file at `path` by modules holding its quantized blocks.
    Returns {"kept": [(module, gguf tensor, type)], "dense": [(module, why)]}."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = [_Tensor(t) for t in reader.tensors if t.tensor_type.name in SUPPORTED and len(t.shape) == 2]
    waiting: dict[tuple, list] = {}        # (shape, fingerprint) -> the layers whose weights give them
    for target in list(_targets(model)):
        w = _dense(target[3])
        waiting.setdefault((w.shape, _fingerprint(w)), []).append(target)
    report = {"kept": [], "dense": []}
    for t in tensors:
        ref = t.dense()                    # each tensor dequantized once
        group = waiting.get((ref.shape, _fingerprint(ref)), [])
        for target in list(group):
            name, parent, attr, module = target
            order = _row_order(ref, _dense(module))
            if order is False:
                continue
            group.remove(target)
            if not fits(t.k):
                report["dense"].append((name, f"{t.k} inputs are not a multiple of {GROUP}"))
                continue
            codes, scale, zero = decode_blocks(t.kind, t.raw, t.n, t.k)
            if order is not None:
                codes, scale = codes[order], scale[order]
                zero = None if zero is None else zero[order]
            if isinstance(module, nn.Embedding):
                new = QuantEmbedding(codes, scale, zero, padding_idx=module.padding_idx)
            else:
                new = Int4Linear(int4_parts(t.kind, codes, scale, zero), module.bias)
            setattr(parent, attr, new.to(module.weight.device))
            report["kept"].append((name, t.name, t.kind))
    report["dense"] += [(name, "no quantized tensor of the file holds these weights")
                        for group in waiting.values() for name, *_ in group]
    if log:
        kinds = sorted({k for _, _, k in report["kept"]})
        log(f"Keeping {len(report['kept'])} weights of {Path(path).name} quantized ({', '.join(kinds) or 'none'}: "
            f"4-bit products); {len(report['dense'])} as loaded")
    return report


def quantized_types(path: str | Path) -> set[str]:
    """The quantized tensor types in a GGUF file (empty for an F32/F16/BF16 file)."""
    import gguf

    dense = {"F32", "F16", "BF16", "F64"}
    return {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors} - dense
