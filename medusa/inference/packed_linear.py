"""fp32 CPU matrix products for the decode loop's forward passes: weights packed once, in oneDNN's or MKL's
layout.

The stock fp32 product of a few rows by a weight matrix (MKL's `sgemm`) is far below the machine's speed and
uneven in the row count. Two remedies, both from torch's CPU build:

- **oneDNN** (the default where torch has it): each weight reordered once into oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`, the op inductor uses for frozen weights) and multiplied with
  `torch.ops.mkldnn._linear_pointwise`, which serves every row count from the one copy. Results are fp32
  products (no reduced-precision accumulation), rounded differently.
- **MKL** (`cblas_sgemm_pack`, `torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear`): one copy per
  packed row count (4, 8 and 16), each product of `min_rows` to 16 rows zero-padded up to the next.

What each costs by row count, per machine: benchmarks/README.md, "Component timings" (`scripts/forward_cost.py`).

`pack_linears(model, backend)` turns the model's fp32 CPU `nn.Linear`s into `OneDNNLinear` / `PackedLinear`
in place (same parameters, same module tree, tied weights stay tied) and keeps the packed copies as
non-persistent buffers: inference only (the copies do not follow later weight updates), each as large as
those weights again. The packed copies are used only inside `engaged()` -- the decode loop's own forward
passes: anything else that runs the model (`generate`, a training step, the user's code) gets the stock
product, bit for bit.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("onednn", "mkl")
_ENGAGED = contextvars.ContextVar("medusa_packed_products", default=False)

PACK_SIZES = (4, 8, 16)   # the row counts the weights are packed for (one copy each); rows pad up to the next
MIN_ROWS = 4              # fewer rows: the stock product (as fast or faster there)
LEAN = ((16,), 8)         # one copy only, for 8-16 rows: where memory allows no more
ONEDNN_ROWS_HINT = 16     # the row count oneDNN's weight layout is chosen for (it serves any)


def available(backend: str = "mkl") -> bool:
    if backend == "onednn":
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if backend == "mkl":
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    raise ValueError(f"unknown weight packing {backend!r}: one of {BACKENDS}")


def default_backend() -> str | None:
    """The packing used when none is named: oneDNN where torch has it, else MKL, else None."""
    return next((b for b in BACKENDS if available(b)), None)


@contextlib.contextmanager
def engaged():
    """Packed copies serve the products of the forward passes run inside this block (the decode loop's)."""
    token = _ENGAGED.set(True)
    try:
        yield
    finally:
        _ENGAGED.reset(token)


def _stock(module: nn.Linear) -> bool:
    """Whether this call takes the stock product: outside `engaged()`, under compilation (inductor packs
    frozen weights itself, compiled.py), or where gradients are wanted."""
    return (not _ENGAGED.get() or torch.compiler.is_compiling()
            or torch.is_grad_enabled() and module.weight.requires_grad)


class OneDNNLinear(nn.Linear):
    """An nn.Linear whose products (inside `engaged()`) use a copy of its weight in oneDNN's layout (buffer
    `packed_onednn`), for any row count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows == 0 or _stock(self):
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, self.in_features), self.packed_onednn,
                                                 self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


class PackedLinear(nn.Linear):
    """An nn.Linear whose products of `min_rows` to `sizes[-1]` rows (inside `engaged()`) use an MKL-packed
    copy of its weight, the one for the smallest packed row count that holds them (buffers `packed_{size}`)."""

    sizes: tuple[int, ...]
    min_rows: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile the stock product, decided before the row count is read (no guard on it)
        if _stock(self):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        if not self.min_rows <= rows <= self.sizes[-1]:
            return F.linear(x, self.weight, self.bias)
        size = next(n for n in self.sizes if n >= rows)
        flat = x.reshape(rows, self.in_features)
        if rows < size:
            flat = torch.cat([flat, flat.new_zeros(size - rows, self.in_features)])
        out = torch.ops.mkl._mkl_linear(flat, getattr(self, f"packed_{size}"), self.weight, self.bias, size)[:rows]
        return out.reshape(*x.shape[:-1], self.out_features)


def is_packed(model: nn.Module) -> bool:
    """Whether any linear of `model` holds packed copies."""
    return any(isinstance(m, (OneDNNLinear, PackedLinear)) for m in model.modules())


def padded_rows(model: nn.Module):
    """n -> the rows a forward of n tokens pays for in `model`'s MKL-packed products (the next packed row
    count), or None when the model has none (oneDNN's products pad nothing)."""
    packed = next((m for m in model.modules() if isinstance(m, PackedLinear)), None)
    if packed is None:
        return None
    sizes, lo = packed.sizes, packed.min_rows
    return lambda n: next(s for s in sizes if s >= n) if lo <= n <= sizes[-1] else n


def _packable(model: nn.Module) -> list[nn.Linear]:
    """The plain (not yet packed, not quantized) fp32 CPU nn.Linears of `model`."""
    return [m for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]


def _to_onednn(module: nn.Linear) -> None:
    module.__class__ = OneDNNLinear
    packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), ONEDNN_ROWS_HINT)
    module.register_buffer("packed_onednn", packed, persistent=False)


def _to_mkl(module: nn.Linear, sizes: tuple[int, ...], min_rows: int) -> None:
    module.__class__ = PackedLinear
    module.sizes, module.min_rows = sizes, min_rows
    for size in sizes:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), size)
        module.register_buffer(f"packed_{size}", packed, persistent=False)


def pack_linears(model: nn.Module, sizes: tuple[int, ...] | None = None, min_rows: int | None = None, *,
                 backend: str = "mkl") -> int:
    """Pack every fp32 CPU nn.Linear of `model` in place; returns how many linears (0 where torch lacks the
    backend). MKL only: `sizes`, the packed row counts (default PACK_SIZES), and `min_rows`, the fewest rows
    that use them (default MIN_ROWS); oneDNN's one copy serves every row count."""
    if not available(backend):
        return 0
    linears = _packable(model)
    if backend == "onednn":
        if sizes is not None or min_rows is not None:
            raise ValueError("oneDNN packs one copy for every row count: sizes and min_rows are MKL's")
        for module in linears:
            _to_onednn(module)
        return len(linears)
    sizes = tuple(sorted(PACK_SIZES if sizes is None else sizes))
    min_rows = MIN_ROWS if min_rows is None else min_rows
    if not sizes or min_rows < 1:
        raise ValueError(f"pack sizes must be given and min_rows >= 1, got {sizes}, {min_rows}")
    for module in linears:
        _to_mkl(module, sizes, min_rows)
    return len(linears)


def fitting(model: nn.Module, budget: float, backend: str) -> dict | None:
    """The `pack_linears` arguments for the most packed copies whose memory fits in `budget` bytes: oneDNN's
    one copy; MKL's copies for all of PACK_SIZES, else LEAN's one. None when nothing fits."""
    if backend == "onednn":
        options = [({}, 1)]                                     # (pack_linears arguments, copies)
    else:
        options = [({"sizes": s, "min_rows": r}, len(s)) for s, r in ((PACK_SIZES, MIN_ROWS), LEAN)]
    return next((args for args, copies in options if packed_bytes(model, copies) <= budget), None)


def packed_bytes(model: nn.Module, copies: int = 1) -> int:
    """Memory `copies` packed copies of the fp32 CPU linear weights of `model` take."""
    return sum(m.weight.numel() * 4 for m in _packable(model)) * copies


PACKINGS = ("auto", "onednn", "mkl", "off")
AUTO_BUDGET = 2 * 2**30   # "auto" packs only where the copies take at most this many bytes


def packing(how) -> str:
    """`pack_weights=` as one of PACKINGS: "auto" = oneDNN where torch has it, else MKL, when the copies take at
    most 2 GiB; "onednn" or "mkl" = that backend whatever the memory; "off" = stock products. The older
    spellings map onto these: None = "auto", True = the "auto" backend whatever the memory, False = "off"."""
    if how is None:
        return "auto"
    if isinstance(how, bool):
        now = (default_backend() or "off") if how else "off"
        warnings.warn(f"pack_weights={how} is deprecated: use pack_weights=\"{now}\" (one of "
                      f"{', '.join(PACKINGS)})", DeprecationWarning, stacklevel=3)
        return now
    if how not in PACKINGS:
        raise ValueError(f"unknown weight packing {how!r}: one of {', '.join(PACKINGS)}")
    return how


def pack_for_inference(model: nn.Module, how: str = "auto", log=None) -> str | None:
    """Pack `model`'s fp32 CPU weights for products run inside `engaged()`, as `how` says (`packing`). Returns
    the backend used, or None where nothing was packed."""
    how = packing(how)
    backend = default_backend() if how == "auto" else None if how == "off" else how
    if backend is None:
        return None
    if not available(backend):
        raise ValueError(f"pack_weights={backend!r}: this torch build has no {backend} (one of "
                         f"{[b for b in BACKENDS if available(b)]})")
    options = fitting(model, AUTO_BUDGET if how == "auto" else float("inf"), backend)
    if options is None or not pack_linears(model, backend=backend, **options):
        return None
    if log:
        rows = "any row count" if backend == "onednn" else f"{'/'.join(map(str, options['sizes']))} rows"
        log(f"Packed fp32 CPU weights for decoding's products ({backend}, {rows})")
    return backend
