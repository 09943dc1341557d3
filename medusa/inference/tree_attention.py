"""Tree attention that gives every tree node the same arithmetic as decoding it alone: `medusa_tree`.

With a 4D mask, a tree node attends to its ancestors at scattered cache positions (siblings masked out in
between), so the attention sums run over the keys in another arrangement than `generate` uses when it
decodes that path token by token. In bf16 (or with quantized products, which take bf16) that moves logits by
a rounding step, and greedy near-ties then flip: the tree's output drifts from `generate`'s. This attention
function (registered with transformers' `AttentionInterface`, so every model that routes attention through it
can use it; no modeling code is copied) gives a tree node a one-token step's exact shapes along its own path:

- attention runs over a padded row of keys: the key count rounded up to a multiple of ROW_MULTIPLE, the extra
  keys blocked (a one-token step reads them from the cache's memory past the row, a BatchCache's capacity
  being such a multiple, or appends zeros; a product's or a softmax's bits can depend on how many rows or
  columns it has, never on what a blocked key holds, as long as it is finite);
- per kv head, the scores are k qᵀ for the `rep` query heads that share it (no kv head is copied);
- a tree step gathers each node's keys and values (its prefix, then its path, then filler) and runs the nodes
  of one padded width as one batch of those products: one group per step, two where the tree's rows straddle
  a multiple of ROW_MULTIPLE, whatever the tree's depth;
- a batch's one-token steps run as one batch of those products, every row padded to the widest: once a row
  is padded to a multiple of ROW_MULTIPLE, more blocked keys after it leave its bits as they are (measured on
  fp32 and bf16, head sizes 16 and 64; `attention_exact` checks it).

A prompt's prefill attends in blocks of queries at fixed cache positions (`_prefill`), so a long prompt prefilled
in chunks while a batch decodes gets the bits of the same prompt prefilled at once (a product's bits depend on
its shapes, and a chunk's would otherwise differ from the whole prompt's).

That a batch of products gives each member the bits it gets alone belongs to the CPU's kernels: `rows_independent`
checks the linear layers' products and `attention_exact` this attention at load. Where both hold, tree
verification is bit-identical to `generate` run with this same attention (its one-token steps are these).

Use: load the base with `attn_implementation="medusa_tree"` (`--attn medusa_tree`); the decode loop then
passes `medusa_tree=plan(step_index(tree_paths(tree), cache_length) for each batch row)` (or that list) on tree
steps instead of a mask.
Plain softmax attention only: soft-capped or sink-token attention is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medusa.inference.quantized import Int4Linear, device_of

NAME = "medusa_tree"
_UNSUPPORTED = ("softcap", "s_aux", "sinks")
ROW_MULTIPLE = 64            # attention rows are padded to a multiple of this many columns
PREFILL_BLOCK = 64           # a prompt's queries attend in blocks starting at multiples of this many positions


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


@torch.no_grad()
def attention_exact(model, nodes: int) -> bool:
    """Whether this machine's kernels give a tree step of up to `nodes` nodes (a chain, the deepest case) the
    attention bits of one-token steps, for the model's head sizes and dtype (see the module's docstring)."""
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = device_of(model.get_output_embeddings())
    gen = torch.Generator(device=device).manual_seed(0)
    probe = nn.Module().eval()
    chain = Paths(torch.arange(nodes, device=device), torch.arange(nodes, device=device).expand(nodes, nodes).tril())
    for prefix in (7, 100, 301):
        q, k, v = (torch.randn(1, h, n, dim, generator=gen, device=device) ** 3 for h, n in
                   ((heads, nodes), (hkv, prefix + nodes), (hkv, prefix + nodes)))
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        tree, _ = tree_attention(probe, q, k, v, None, dim ** -0.5, medusa_tree=[step_index(chain, prefix)])
        for i in range(nodes):
            end = prefix + i + 1
            alone, _ = tree_attention(probe, q[:, :, i:i + 1], k[:, :, :end], v[:, :, :end], None, dim ** -0.5)
            if not torch.equal(tree[:, i], alone[:, 0]):
                return False
    # a batch's one-token steps: rows of other lengths, run padded to the widest
    lengths = (5, 70, 301)
    q, k, v = (torch.randn(len(lengths), h, n, dim, generator=gen, device=device).to(dtype) ** 3 for h, n in
               ((heads, 1), (hkv, max(lengths)), (hkv, max(lengths))))
    root = Paths(torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, 1, dtype=torch.long, device=device))
    rows = [step_index(root, n - 1) for n in lengths]        # each row's lone root, as the verifier passes it
    batch, _ = tree_attention(probe, q, k, v, None, dim ** -0.5, medusa_tree=rows)
    for b, n in enumerate(lengths):
        alone, _ = tree_attention(probe, q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], None, dim ** -0.5)
        if not torch.equal(batch[b], alone[0]):
            return False
    return True


@dataclass(frozen=True)
class Paths:
    depth: torch.Tensor        # (n,)
    ancestors: torch.Tensor    # (n, max depth + 1): node i's path in its first depth[i] + 1 columns, then zeros


def tree_paths(tree) -> Paths:
    """A tree's paths, once per tree shape: each node's depth and its ancestors from the root to itself."""
    depth = tree.depth.to(torch.long)
    width = int(depth.max()) + 1
    ancestors = torch.zeros(depth.numel(), width, dtype=torch.long, device=depth.device)
    for node in range(depth.numel()):
        path = tree.attn_mask[node].nonzero().flatten()           # depth order
        ancestors[node, :path.numel()] = path
    return Paths(depth, ancestors)


@dataclass(frozen=True)
class Group:
    """Nodes of one row's tree step whose attention rows have the same padded `width`: `rows` (g,), `index`
    (g * width,) the cache positions each attends to (its prefix, its path, then position 0 as filler), `pad`
    (g, 1, width) True at the filler; or `index` None: a lone root, over the first `length` positions."""
    rows: torch.Tensor
    index: torch.Tensor | None
    pad: torch.Tensor | None
    width: int
    length: int = 0


def padded(length):
    """The width of an attention row over `length` keys (an int, or a tensor of them): a one-token step and a
    tree node alike run their products and softmax over this many keys, the extra ones blocked (a product's or a
    softmax's bits can depend on how many rows or columns it has), so that nodes at different depths run as one
    batch."""
    return -(-length // ROW_MULTIPLE) * ROW_MULTIPLE


def step_index(paths: Paths, prefix: int) -> tuple[Group, ...]:
    """For a tree step after `prefix` cached tokens: its nodes, grouped by padded row width."""
    lengths = prefix + paths.depth + 1
    widths = padded(lengths)
    groups = []
    for width in widths.unique().tolist():
        rows = (widths == width).nonzero().flatten()
        if rows.numel() == 1 and paths.depth[rows[0]] == 0:     # a lone root: the prefix and itself, in order
            groups.append(Group(rows, None, None, width, prefix + 1))
            continue
        tail = min(width - prefix, paths.ancestors.shape[1])
        index = torch.zeros(rows.numel(), width, dtype=torch.long, device=rows.device)
        index[:, :prefix] = torch.arange(prefix, device=rows.device)
        index[:, prefix:prefix + tail] = paths.ancestors[rows, :tail] + prefix
        pad = torch.arange(width, device=rows.device)[None] >= lengths[rows][:, None]
        index[pad] = 0
        groups.append(Group(rows, index.flatten(), pad[:, None], width))
    return tuple(groups)


@dataclass(frozen=True)
class Plan:
    """A forward's medusa_tree steps, made once per step rather than in every layer: each batch row's groups,
    and the lone roots of all rows (`lone`: their batch rows, also as a tensor `index`, `nodes`, and `pad`
    (R, 1, 1, W) True past each one's keys in a row padded to the `longest`'s width) run as one batch."""
    rows: tuple[tuple[Group, ...], ...]
    lone: list[int]
    index: torch.Tensor | None = None
    nodes: torch.Tensor | None = None
    longest: int = 0
    pad: torch.Tensor | None = None
    every_row: bool = False             # a lone root in every row, in order, and nothing else


def plan(rows) -> Plan:
    """The Plan of a step whose batch row b has the groups `rows[b]` (step_index's)."""
    rows = tuple(rows)
    lone = [(b, grp) for b, groups in enumerate(rows) for grp in groups if grp.index is None]
    if not lone:
        return Plan(rows, [])
    device = lone[0][1].rows.device
    batch_rows = [b for b, _ in lone]
    every = batch_rows == list(range(len(rows))) and all(len(groups) == 1 for groups in rows)
    lengths = torch.tensor([grp.length for _, grp in lone], device=device)
    longest = int(lengths.max())
    pad = (torch.arange(padded(longest), device=device) >= lengths[:, None])[:, None, None]
    return Plan(rows, batch_rows, torch.tensor(batch_rows, device=device), torch.cat([grp.rows for _, grp in lone]),
                longest, pad, every)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hkv, ..., D) -> (B, Hkv * n, ..., D), each kv head repeated n times in place (as transformers does)."""
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _attend(q, k, v, scaling, mask=None):
    """softmax(q kᵀ * scaling + mask) v, with the softmax in fp32 as transformers' eager attention does (prefill)."""
    weights = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if mask is not None:
        weights = weights + mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v), weights


def _attend_rows(q, k, v, scaling, pad, mask=None) -> torch.Tensor:
    """A one-token step's attention, the same for a tree node: q (..., rep, D) the query heads sharing a kv head,
    k and v (..., W, D) a padded row of keys (W a multiple of ROW_MULTIPLE) -> (..., rep, D); `pad` (..., W)
    True at the filler keys, blocked."""
    scores = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2) * scaling   # a key's scores: its own row
    if mask is not None:
        scores = scores + mask
    scores = scores.masked_fill(pad, float("-inf")).contiguous()
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def _room(x: torch.Tensor, width: int) -> bool:
    """Whether (B, Hkv, L, D) `x`, a view of a cache, has memory of its own for `width` positions per head: each
    head's entries contiguous and at least `width` of them apart (a BatchCache's rows, whose capacity exceeds
    the length in use), within the storage."""
    B, H, _, D = x.shape
    if x.stride(3) != 1 or x.stride(2) != D or x.stride(1) < width * D or (B > 1 and x.stride(0) < H * x.stride(1)):
        return False
    end = x.storage_offset() + (B - 1) * x.stride(0) + (H - 1) * x.stride(1) + width * D
    return end * x.element_size() <= x.untyped_storage().nbytes()


def _padded_keys(key, value, mask, length: int):
    """The first `length` keys and values (B, Hkv, L, D) as a padded row up to padded(length), the mask (if
    any) extended, and the filler columns (W,). The filler is the cache's own memory past the row where it has
    room (zeros or earlier entries: finite, so a blocked key's zero weight leaves the sums as they are), else
    zeros appended (a copy)."""
    width = padded(length)
    if width > length and _room(key, width) and _room(value, width):
        key, value = (x.as_strided((*x.shape[:2], width, x.shape[3]), x.stride(), x.storage_offset())
                      for x in (key, value))
    else:
        key, value = key[:, :, :length], value[:, :, :length]
        if width > length:
            key = nn.functional.pad(key, (0, 0, 0, width - length))
            value = nn.functional.pad(value, (0, 0, 0, width - length))
    if mask is not None and width > length:
        mask = nn.functional.pad(mask[..., :length], (0, width - length))
    return key, value, mask, torch.arange(width, device=key.device) >= length


def tree_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, medusa_tree=None, **kwargs):
    """query (B, H, q, D); key/value (B, Hkv, kv, D), the cache with this step's entries last.

    A one-token step and each tree node run the same products: per kv head, the `rep` query heads that share
    it against its keys, so no kv head is copied; a tree step gathers each node's keys and values (its prefix,
    then its path) and runs its nodes as one batch of such products."""
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if bad:
        raise ValueError(f"attn_implementation='{NAME}' computes plain softmax attention, but this model's "
                         f"attention uses {', '.join(bad)}: load it with attn_implementation='sdpa' or 'eager'")
    if module.training and dropout:
        raise ValueError(f"attn_implementation='{NAME}' is for inference (no attention dropout)")
    B, H, n, D = query.shape
    hkv = key.shape[1]
    rep = H // hkv
    mask = None if attention_mask is None else attention_mask[..., :key.shape[-2]]
    if medusa_tree is None and n > 1:             # prefill
        return _prefill(query, _repeat_kv(key, rep), _repeat_kv(value, rep), scaling, mask), None
    if medusa_tree is None:                       # one-token step
        k, v, mask, pad = _padded_keys(key, value, mask, key.shape[-2])
        out = _attend_rows(query.reshape(B, hkv, rep, D).contiguous(), k, v, scaling, pad, mask)
        return out.view(B, 1, H, D), None
    step = medusa_tree if isinstance(medusa_tree, Plan) else plan(medusa_tree)
    if step.every_row and n == 1:                 # a batch's one-token steps
        out = _lone_roots(query.reshape(B, hkv, rep, D).contiguous(), key, value, scaling, step)
        return out.view(B, 1, H, D), None
    # a batch row's padding nodes (beyond its own tree) are left out: zeros, never read
    out = (torch.zeros_like if B > 1 else torch.empty_like)(query).view(B, hkv, rep, n, D)
    q = query.view(B, hkv, rep, n, D)
    if step.lone:
        rows, nodes = step.index, step.nodes
        out[rows, :, :, nodes] = _lone_roots(q[rows, :, :, nodes].contiguous(), key, value, scaling, step)
    for b, groups in enumerate(step.rows):        # per batch row, per group of nodes
        for grp in groups:
            if grp.index is None:
                continue
            qg = q[b][:, :, grp.rows].transpose(1, 2).contiguous()          # (Hkv, g, rep, D)
            shape = (hkv, grp.rows.numel(), grp.width, D)
            k = key[b].index_select(1, grp.index).view(shape)
            v = value[b].index_select(1, grp.index).view(shape)
            out[b, :, :, grp.rows] = _attend_rows(qg, k, v, scaling, grp.pad).transpose(1, 2)
    return out.view(B, H, n, D).transpose(1, 2).contiguous(), None


def _prefill(query, key, value, scaling, mask) -> torch.Tensor:
    """Eager attention (as the transformers models write it) for a prompt's n tokens, the cache's last n entries,
    in blocks of queries that start at multiples of PREFILL_BLOCK cache positions, each block over the keys up to
    its last query: a block's products then have the same shapes whether the prompt is prefilled at once or in
    chunks of a multiple of PREFILL_BLOCK tokens (a batch's long prompt; decode.Batch), so both give it the
    same bits. -> (B, n, H, D)."""
    n = query.shape[2]
    start = key.shape[-2] - n
    outs, lo = [], 0
    while lo < n:
        hi = min(n, lo + PREFILL_BLOCK - (start + lo) % PREFILL_BLOCK)
        end = start + hi
        block = None if mask is None else mask[..., lo:hi, :end]
        outs.append(_attend(query[:, :, lo:hi], key[:, :, :end], value[:, :, :end], scaling, block)[0])
        lo = hi
    return torch.cat(outs, 2).transpose(1, 2).contiguous()


def _lone_roots(q, key, value, scaling, step: Plan) -> torch.Tensor:
    """The lone roots of a batch's rows (each row's one-token step, or a tree's root alone in its width), q
    (R, Hkv, rep, D), each over its own row's first `length` keys in cache order, as one batch of one-token
    products padded to the widest: a row's bits do not depend on how many blocked keys follow its own
    (attention_exact checks it). -> (R, Hkv, rep, D)."""
    if step.lone != list(range(key.shape[0])):
        key, value = key.index_select(0, step.index), value.index_select(0, step.index)
    k, v, _, _ = _padded_keys(key, value, None, step.longest)
    return _attend_rows(q, k, v, scaling, step.pad)
