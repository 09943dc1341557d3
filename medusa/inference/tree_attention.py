"""Tree attention that gives every tree node the same arithmetic as decoding it alone: `medusa_tree`.

With a 4D mask, a tree node attends to its ancestors at scattered cache positions (siblings masked out in
between), so the attention sums run over the keys in another arrangement than `generate` uses when it
decodes that path token by token. In bf16 that moves logits by a rounding step, and greedy near-ties then
flip: the tree's output drifts from `generate`'s. This attention function (registered with transformers'
`AttentionInterface`, so every model that routes attention through it can use it; no modeling code is
copied) computes eager attention, and for a tree step gathers, for each node, the prefix followed by its own
path in order, grouped by depth so each group is one batched product with exactly the shapes of a one-token
step. On CPUs whose bf16 matrix products are row-consistent (measured: up to 32 rows), tree verification is
then bit-identical to `generate` run with this same attention (its one-token steps are plain eager math).

Use: load the base with `attn_implementation="medusa_tree"` (`--attn medusa_tree`); the decode loop then
passes `medusa_tree=[step_index(groups, cache_length) for each batch row]` on tree steps instead of a mask.
Plain softmax attention only: soft-capped or sink-token attention is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from medusa.inference.quantized import Int4Linear, device_of

NAME = "medusa_tree"
_UNSUPPORTED = ("softcap", "s_aux", "sinks")


def register() -> None:
    """Make `attn_implementation="medusa_tree"` known to transformers (idempotent). Its masks are eager's:
    without one, transformers would build sdpa-style masks and drop them for causal prefill (sdpa then
    relies on `is_causal`, which a custom function never sees)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, tree_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def uses_tree_attention(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME


@torch.no_grad()
def rows_independent(model, rows: int) -> bool:
    """Whether this device's matrix products give each of `rows` rows the bits it gets alone, for the model's
    own linear layers, one of each shape (it depends on the CPU and the library: oneDNN's bf16 product is
    row-independent up to some row count on some CPUs, MKL's fp32 one is not). medusa_tree is bit-identical to `generate` only for trees of at most that
    many nodes."""
    device = device_of(model.get_output_embeddings())
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = {}
    for m in [model.get_output_embeddings(), *model.modules()]:
        if isinstance(m, (nn.Linear, Int4Linear)):
            shapes.setdefault((type(m), m.in_features, m.out_features, m.bias is not None), m)
    for lin in shapes.values():
        x = torch.randn(rows, lin.in_features, generator=gen, device=device)
        # gaussian inputs alone can hide it: real activations are heavy-tailed (an AMD CPU's bf16 products
        # differ only for those), so cubes and large values too
        for probe in (x, x ** 3, x * 100):
            probe = probe.to(lin.weight.dtype if isinstance(lin, nn.Linear) else torch.float32)
            if not torch.equal(lin(probe), torch.cat([lin(probe[r:r + 1]) for r in range(rows)])):
                return False
    return True


def path_groups(tree) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per depth d: (node indices (n,), each node's ancestors from the root to itself (n, d + 1))."""
    groups = []
    for d in range(int(tree.depth.max()) + 1):
        rows = (tree.depth == d).nonzero().flatten()
        ancestors = torch.stack([tree.attn_mask[r].nonzero().flatten() for r in rows])  # depth order
        groups.append((rows, ancestors))
    return tuple(groups)


def step_index(groups, prefix: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """For a tree step after `prefix` cached tokens: per depth group, (node indices, the cache positions each
    node attends to: the prefix, then its path)."""
    out = []
    for rows, ancestors in groups:
        before = torch.arange(prefix, device=ancestors.device).expand(rows.numel(), prefix)
        out.append((rows, torch.cat([before, ancestors + prefix], dim=1)))
    return tuple(out)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hkv, ..., D) -> (B, Hkv * n, ..., D), each kv head repeated n times in place (as transformers does)."""
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _attend(q, k, v, scaling, mask=None):
    """softmax(q kᵀ * scaling + mask) v, with the softmax in fp32 as transformers' eager attention does."""
    weights = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if mask is not None:
        weights = weights + mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v), weights


def tree_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, medusa_tree=None, **kwargs):
    """query (B, H, q, D); key/value (B, Hkv, kv, D), the cache with this step's entries last.

    A one-token step and each tree node run the same products: per kv head, the `rep` query heads that share
    it as `rep` rows against its keys (B, Hkv, rep, D) @ (B, Hkv, D, kv), so no kv head is copied."""
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if bad:
        raise ValueError(f"attn_implementation='{NAME}' computes plain softmax attention, but this model's "
                         f"attention uses {', '.join(bad)}: load it with attn_implementation='sdpa' or 'eager'")
    if module.training and dropout:
        raise ValueError(f"attn_implementation='{NAME}' is for inference (no attention dropout)")
    B, H, n, D = query.shape
    hkv = key.shape[1]
    rep = H // hkv
    mask = None if attention_mask is None else attention_mask[..., : key.shape[-2]]
    if medusa_tree is None and n > 1:             # prefill: eager attention, as the transformers models write it
        out, weights = _attend(query, _repeat_kv(key, rep), _repeat_kv(value, rep), scaling, mask)
        return out.transpose(1, 2).contiguous(), weights
    if medusa_tree is None:                       # one-token step
        out, weights = _attend(query.view(B, hkv, rep, D), key, value, scaling, mask)
        return out.view(B, 1, H, D), weights
    # a batch row's padding nodes (beyond its own tree) are in no group: zeros, never read
    out = (torch.zeros_like if B > 1 else torch.empty_like)(query).view(B, hkv, rep, n, D)
    q = query.view(B, hkv, rep, n, D)
    for b, groups in enumerate(medusa_tree):      # per batch row, per depth group
        for rows, idx in groups:                  # idx: (g, prefix + depth + 1) cache positions per node
            o, _ = _attend(q[b:b + 1, :, :, rows].transpose(2, 3), key[b:b + 1, :, idx], value[b:b + 1, :, idx],
                           scaling)
            out[b:b + 1, :, :, rows] = o.transpose(2, 3)    # o: (1, Hkv, g, rep, D)
    return out.view(B, H, n, D).transpose(1, 2).contiguous(), None
