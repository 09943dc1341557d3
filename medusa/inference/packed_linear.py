"""fp32 CPU matrix products for tree steps: weights packed once in MKL's GEMM layout.

MKL's fp32 product of a few rows by a weight matrix is far below the machine's speed, and uneven in the row
count (SmolLM2-135M's output projection, 2 threads: 8 rows 14.6 ms, 13 rows 19.3 ms, 16 rows 10.7 ms). With
the weight packed in advance for 16 rows (`cblas_sgemm_pack`, exposed by torch as
`torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear`), 16 rows take 8.0 ms; torch's packed product runs
only for the exact row count it was packed for, so rows are zero-padded up to the next packed count: copies
for 4, 8 and 16 rows. Measured on the whole model (300 cached tokens, 2 threads; `scripts/forward_cost.py`),
stock / packed 16 only / packed 4+8+16: N=3 47 / 47 / 53 ms (so below 4 rows the stock product stays, and
one-token steps are untouched), N=4 62 / 62 / 52, N=6 66 / 67 / 62, N=8 76 / 73 / 61, N=12 90 / 75 / 74,
N=14 100 / 76 / 76.

`pack_linears(model)` turns the model's fp32 CPU `nn.Linear`s into `PackedLinear` in place (same parameters,
same module tree, tied weights stay tied) and keeps the packed copies as non-persistent buffers: inference
only (the copies do not follow later weight updates), and each costs as much memory again as those weights
(`LEAN`: one copy, for 8-16 rows, where memory is short).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_SIZES = (4, 8, 16)   # the row counts the weights are packed for (one copy each); rows pad up to the next
MIN_ROWS = 4              # fewer rows: the stock product (as fast or faster there)
LEAN = ((16,), 8)         # one copy only, for 8-16 rows: where memory allows no more


def available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinear(nn.Linear):
    """An nn.Linear whose products of `min_rows` to `sizes[-1]` rows use a packed copy of its weight, the one
    for the smallest packed row count that holds them (buffers `packed_{size}`)."""

    sizes: tuple[int, ...]
    min_rows: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile the stock product, decided before the row count is read (no guard on it): with
        # freezing, inductor packs the weights itself for oneDNN, which is fast for any row count (compiled.py)
        if torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        if not self.min_rows <= rows <= self.sizes[-1] or torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        size = next(n for n in self.sizes if n >= rows)
        flat = x.reshape(rows, self.in_features)
        if rows < size:
            flat = torch.cat([flat, flat.new_zeros(size - rows, self.in_features)])
        out = torch.ops.mkl._mkl_linear(flat, getattr(self, f"packed_{size}"), self.weight, self.bias, size)[:rows]
        return out.reshape(*x.shape[:-1], self.out_features)


def padded_rows(model: nn.Module):
    """n -> the rows a forward of n tokens pays for in `model`'s packed products (the next packed row count),
    or None when the model has no packed linears."""
    packed = next((m for m in model.modules() if isinstance(m, PackedLinear)), None)
    if packed is None:
        return None
    sizes, lo = packed.sizes, packed.min_rows
    return lambda n: next(s for s in sizes if s >= n) if lo <= n <= sizes[-1] else n


def _packable(model: nn.Module) -> list[nn.Linear]:
    """The plain (not yet packed, not quantized) fp32 CPU nn.Linears of `model`."""
    return [m for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]


def pack_linears(model: nn.Module, sizes: tuple[int, ...] = PACK_SIZES, min_rows: int = MIN_ROWS) -> int:
    """Pack every fp32 CPU nn.Linear of `model` in place, once per row count in `sizes`; returns how many
    linears. No-op without MKL."""
    if not available():
        return 0
    sizes = tuple(sorted(sizes))
    if not sizes or min_rows < 1:
        raise ValueError(f"pack sizes must be given and min_rows >= 1, got {sizes}, {min_rows}")
    linears = _packable(model)
    for module in linears:
        module.__class__ = PackedLinear
        module.sizes, module.min_rows = sizes, min_rows
        for size in sizes:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), size)
            module.register_buffer(f"packed_{size}", packed, persistent=False)
    return len(linears)


def fitting(model: nn.Module, budget: int) -> tuple[tuple[int, ...], int] | None:
    """(sizes, min_rows) of the most packed copies whose memory fits in `budget` bytes: all of PACK_SIZES,
    else LEAN, else None."""
    return next((c for c in ((PACK_SIZES, MIN_ROWS), LEAN) if packed_bytes(model, c[0]) <= budget), None)


def packed_bytes(model: nn.Module, sizes: tuple[int, ...] = PACK_SIZES) -> int:
    """Memory the packing would take: the fp32 CPU linear weights of `model`, once per packed row count."""
    return sum(m.weight.numel() * 4 for m in _packable(model)) * len(sizes)
