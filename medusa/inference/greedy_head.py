"""The base model's greedy choice at each tree node, from a bf16 copy of its output projection, exactly.

Greedy verification needs only the argmax of each node's logits. With fp32 weights on a CPU the output
projection is the widest product of a step (SmolLM2: 49,152 x 576, a fifth of the model's weights), and a
bf16 copy reads half the bytes. The argmax stays the fp32 one: each bf16 logit is within C * |h| * |w_j| of
the fp32 logit h . w_j, with C = 3u + 2H * 2^-24 (h and w_j rounded to bf16, unit roundoff u = 2^-8 each; the
bf16 result, u again; fp32 accumulation over H products, twice its worst case). So a token can be the argmax
only if its highest possible logit reaches the best token's lowest; those few (a median of 4 for SmolLM2) are
scored again in fp32 from the original rows, and the best of them wins (the lowest id on an exact tie, as
`argmax`). Those products sum in another order than the full fp32 product, as a tree step's already do
than a one-token step's: only ties within fp32 rounding could come out differently.

Used only where it is exact: a plain nn.Linear output projection with fp32 weights on a CPU whose output is
the model's logits unchanged and whose input is the last hidden state (checked once on a probe: no
soft-capping or scaling after it). And only where it is faster: on a CPU that multiplies bf16 natively (x86
AVX512-BF16 or AMX, Arm BF16). Without that, torch's bf16 product of more than a few rows is slower than the
fp32 one, and decoding with this head is slower than without it. The measured costs on both kinds of CPU are in
benchmarks/README.md ("Component timings").
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class GreedyHead:
    """`head(hidden (N, H))` -> (N,) the argmax of `lm_head(hidden)` per row, computed as described above."""

    def __init__(self, lm_head: nn.Linear):
        w = lm_head.weight.detach()
        self.weight = w                                          # the fp32 rows, shared with the model
        self.bias = None if lm_head.bias is None else lm_head.bias.detach().float()
        self.weight_bf16 = w.to(torch.bfloat16)
        self.bias_bf16 = None if self.bias is None else self.bias.to(torch.bfloat16)
        c = 3 * 2.0 ** -8 + 2 * w.shape[1] * 2.0 ** -24
        self.bound = c * w.norm(dim=1)                   # (V,) per token: C * |w_j|
        # a bias adds its own bf16 rounding and its share of the result's: 2u * |b_j|
        self.bias_bound = torch.zeros_like(self.bound) if self.bias is None else 2.0 ** -7 * self.bias.abs()

    def _error(self, scale: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """How far the bf16 logit of `tokens` can be from the fp32 one, for hidden states of norm `scale`."""
        return scale * self.bound[tokens] + self.bias_bound[tokens]

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        approx = F.linear(h.to(torch.bfloat16), self.weight_bf16, self.bias_bf16).float()   # (N, V)
        scale = h.norm(dim=1, keepdim=True)                                                 # (N, 1) |h|
        top = approx.argmax(dim=1, keepdim=True)
        floor = approx.gather(1, top) - self._error(scale, top)       # the true maximum is at least this
        upper = torch.addcmul(approx, scale, self.bound[None])        # each token's highest possible logit
        if self.bias is not None:
            upper += self.bias_bound
        rows, cols = (upper >= floor).nonzero(as_tuple=True)          # the tokens that may be the argmax
        exact = (self.weight[cols] * h[rows]).sum(dim=1)
        if self.bias is not None:
            exact += self.bias[cols]
        n = h.shape[0]
        best = torch.full((n,), float("-inf"), dtype=exact.dtype).scatter_reduce(0, rows, exact, "amax")
        winner = exact == best[rows]
        first = torch.full((n,), torch.iinfo(torch.long).max, dtype=torch.long)
        return first.scatter_reduce(0, rows[winner], cols[winner], "amin")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, AMX-BF16 or Arm BF16)."""
    if hasattr(torch.cpu, "get_capabilities"):            # torch 2.10+
        caps = torch.cpu.get_capabilities()
        return any(caps.get(k, False) for k in ("avx512_bf16", "amx_bf16", "bf16"))
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")   # older torch: x86 only
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def greedy_head_for(model, fast_bf16: bool | None = None) -> GreedyHead | None:
    """A GreedyHead for `model` where it is exact and faster (see above), else None. On a probe, the output
    projection's input must be the last hidden state decoding reads, and its output the logits unchanged.
    `fast_bf16`: whether bf16 products are fast here (default: `native_bf16()`)."""
    lm_head = model.get_output_embeddings()
    w = getattr(lm_head, "weight", None)
    if not isinstance(lm_head, nn.Linear) or w is None or w.dtype != torch.float32 or w.device.type != "cpu":
        return None
    if not (native_bf16() if fast_bf16 is None else fast_bf16):
        return None
    seen = {}
    hook = lm_head.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.arange(1, 6, dtype=torch.long)[None] % w.shape[0], output_hidden_states=True)
    finally:
        hook.remove()
    if "y" not in seen or not (torch.equal(seen["x"], out.hidden_states[-1]) and torch.equal(seen["y"], out.logits)):
        return None
    return GreedyHead(lm_head)
