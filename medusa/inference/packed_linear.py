"""fp32 CPU matrix products for tree steps: weights packed once in MKL's GEMM layout.

MKL's fp32 product of a few rows by a weight matrix is far below the machine's speed, and uneven in the row
count (SmolLM2-135M's output projection, 2 threads: 8 rows 14.6 ms, 13 rows 19.3 ms, 16 rows 10.7 ms). With
the weight packed in advance for 16 rows (`cblas_sgemm_pack`, exposed by torch as
`torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear`), 16 rows take 8.0 ms; torch's packed product runs
only for the exact row count it was packed for, so 8 to 16 rows are zero-padded to 16. Measured on the whole
model (300 cached tokens): a forward of 13 new tokens 104 -> 74-81 ms, of 11 tokens 86-104 -> 71-74 ms;
below 8 rows the stock product is as fast or faster and is kept, so one-token steps are untouched.

`pack_linears(model)` turns the model's fp32 CPU `nn.Linear`s into `PackedLinear` in place (same parameters,
same module tree, tied weights stay tied) and keeps the packed copy as a non-persistent buffer: inference
only (the copy does not follow later weight updates), and it costs as much memory again as those weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 16   # the row count the weights are packed for; 8..16 rows are padded to it
MIN_ROWS = 8     # fewer rows: the stock product (as fast or faster there)


def available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinear(nn.Linear):
    """An nn.Linear whose products of MIN_ROWS..PACK_ROWS rows use a packed copy of its weight."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not MIN_ROWS <= rows <= PACK_ROWS or torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if rows < PACK_ROWS:
            flat = torch.cat([flat, flat.new_zeros(PACK_ROWS - rows, self.in_features)])
        out = torch.ops.mkl._mkl_linear(flat, self.packed, self.weight, self.bias, PACK_ROWS)[:rows]
        return out.reshape(*x.shape[:-1], self.out_features)


def _packable(model: nn.Module) -> list[nn.Linear]:
    """The plain (not yet packed, not quantized) fp32 CPU nn.Linears of `model`."""
    return [m for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]


def pack_linears(model: nn.Module) -> int:
    """Pack every fp32 CPU nn.Linear of `model` in place; returns how many. No-op without MKL."""
    if not available():
        return 0
    linears = _packable(model)
    for module in linears:
        module.__class__ = PackedLinear
        module.register_buffer("packed", torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), PACK_ROWS),
                               persistent=False)
    return len(linears)


def packed_bytes(model: nn.Module) -> int:
    """Memory the packing would take: the fp32 CPU linear weights of `model`."""
    return sum(m.weight.numel() * 4 for m in _packable(model))
