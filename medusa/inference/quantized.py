"""Weight-only 4-bit products on a CPU: linear layers whose weights stay quantized in memory.

A weight matrix (N outputs, K inputs) is held as 4-bit codes q in groups of 32 along K, each group with a scale
s and a zero z, and multiplied by torch's own CPU kernel (`torch.ops.aten._weight_int4pack_mm_for_cpu`), which
computes with the weights

    w = (q - 8) * s + z                         q in 0..15, s and z in the activations' dtype (bf16)

from the packed codes directly: a step reads an eighth of the fp32 bytes. The activations enter the product in
bf16 and the result leaves it in bf16, cast back to the model's dtype; the rest of the model (norms, attention,
the residual stream) stays as it was. Each row's result is the same whatever other rows share the product
(`rows_independent` checks it at load), so a tree step's tokens get the bits a one-token step gives them.

Formats that fit (how GGUF's blocks map onto the kernel's: gguf_weights.py):
- 4-bit codes with a scale and a zero per group: `Int4Linear(parts=[(q, s, z)])`.
- 8-bit codes c in -128..127 with a scale d per group (GGUF's Q8_0): c + 128 = 16 h + l with h, l in 0..15, so
  w = d c = 16 d (h - 8) + d (l - 8) + 8 d: two 4-bit matrices stacked along N, `parts=[(h, 16 d, 8 d),
  (l, d, 0)]`, multiplied in one call and their halves summed in fp32. Same bytes as int8.

`QuantEmbedding` keeps an embedding's codes as int8 with an fp32 scale and zero per group and dequantizes the
rows it looks up: `codes * scale + zero`, the same operations and rounding as GGUF's own dequantization.

`quantize_groupwise` makes parts from fp32 weights, 4-bit (asymmetric min/max per group, as gpt-fast's int4
handler does) or 8-bit (symmetric), for models that are not stored quantized.
"""
from __future__ import annotations

import torch
from torch import nn

GROUP = 32                      # weights per scale along K: GGUF's block size, and the kernel's group
_N_MULTIPLE = 16                # the kernel packs outputs in tiles of 16
ACT_DTYPE = torch.bfloat16      # the kernel's fast path on a CPU takes bf16 activations (fp32 is ~100x slower)


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def fits(in_features: int) -> bool:
    """Whether a weight with this many inputs can be held in groups of 32."""
    return in_features % GROUP == 0


Parts = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]   # [(codes (N, K) 0..15, scale (N, K/32), zero)]


class Int4Linear(nn.Module):
    """`y = x W^T (+ b)` with W held as 4-bit codes in groups of 32 (see the module's docstring). Inference only."""

    def __init__(self, parts: Parts, bias: torch.Tensor | None = None):
        super().__init__()
        n, k = parts[0][0].shape
        if not fits(k):
            raise ValueError(f"Int4Linear needs inputs in groups of {GROUP}; this weight has {k}")
        self.in_features, self.out_features, self.parts = k, n, len(parts)
        self.padded = n + -n % _N_MULTIPLE
        # the parts stacked along N, each padded with zero rows to a multiple of 16, written in place
        codes = torch.zeros(self.padded * len(parts), k, dtype=torch.int32)
        scales, zeros = torch.zeros(2, self.padded * len(parts), k // GROUP)
        for i, (q, s, z) in enumerate(parts):
            rows = slice(i * self.padded, i * self.padded + n)
            codes[rows], scales[rows], zeros[rows] = q, s, z
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.register_buffer("packed", packed)
        # (K/32, N', 2): the kernel's layout of each group's scale and zero
        sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(ACT_DTYPE).contiguous()
        self.register_buffer("scales_and_zeros", sz)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(ACT_DTYPE), self.packed,
                                                       GROUP, self.scales_and_zeros)
        if self.parts == 1:
            y = (y if self.padded == self.out_features else y[:, :self.out_features]).to(x.dtype)
        else:
            y = sum(y[:, i * self.padded:i * self.padded + self.out_features].float()
                    for i in range(self.parts)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    @torch.inference_mode()
    def dequantize(self) -> torch.Tensor:
        """The weights the kernel multiplies by, as (N, K) fp32 (each column's product with a unit vector)."""
        bias, self.bias = self.bias, None
        try:
            cols = [self.forward(torch.eye(self.in_features)[i:i + 64]) for i in range(0, self.in_features, 64)]
        finally:
            self.bias = bias
        return torch.cat(cols).t().float().contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parts={self.parts}, " \
               f"bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """An embedding held as int8 codes with an fp32 scale and zero per group of 32: row = codes * scale + zero,
    computed in fp32 and given in `dtype` (the model's)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                 padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        if not fits(self.embedding_dim):
            raise ValueError(f"QuantEmbedding needs rows in groups of {GROUP}; these have {self.embedding_dim}")
        self.padding_idx, self.dtype = padding_idx, dtype
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", None if zero is None or not zero.any() else zero.float().contiguous())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        g = self.embedding_dim // GROUP
        w = self.codes[ids].float().unflatten(-1, (g, GROUP)) * self.scale[ids][..., None]
        if self.zero is not None:
            w = w + self.zero[ids][..., None]
        return w.flatten(-2).to(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.num_embeddings, device=self.codes.device))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 codes in groups of {GROUP}"


def int8_parts(codes: torch.Tensor, scale: torch.Tensor) -> Parts:
    """Int4Linear parts for 8-bit codes (N, K) in -128..127 with a scale per group: two 4-bit halves."""
    c = codes.to(torch.int16) + 128
    return [(c >> 4, 16 * scale, 8 * scale), (c & 15, scale, torch.zeros_like(scale))]


def quantize_groupwise(weight: torch.Tensor, bits: int = 4) -> Parts:
    """Int4Linear parts for an fp32 weight (N, K), per group of 32: 4 bits, codes 0..15 spanning the group's
    min..max (as gpt-fast's int4 handler); 8 bits, codes -127..127 scaled by the group's largest magnitude."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)
    if bits == 8:
        scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)
        return int8_parts((w / scale[..., None]).round().clamp(-127, 127).reshape(n, k), scale)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return [(codes, scale, lo + 8 * scale)]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear or embedding module's weight as a dense (N, K) tensor, whether it is held quantized or not."""
    if isinstance(module, (Int4Linear, QuantEmbedding)):
        return module.dequantize()
    return module.weight


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int4Linear, QuantEmbedding)) for m in model.modules())


def quantize_linears(model: nn.Module, *, bits: int = 4, skip=()) -> int:
    """Replace the `nn.Linear`s of `model` (except the modules named in `skip`) by `Int4Linear`s made with
    `quantize_groupwise(bits)`; returns how many were replaced."""
    done = 0
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip and fits(child.in_features):
                setattr(parent, child_name, Int4Linear(quantize_groupwise(child.weight, bits), child.bias))
                done += 1
    return done


def device_of(module: nn.Module) -> torch.device:
    """Where a module's weights are, whether held as parameters or (quantized) as buffers."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def output_rows(linear: nn.Module) -> int:
    """The number of outputs of a linear layer (the vocabulary, for an output projection), quantized or not."""
    return linear.out_features if hasattr(linear, "out_features") else linear.weight.shape[0]
