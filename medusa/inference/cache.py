"""KV-cache surgery: the one module that touches transformers' cache internals.

`BatchCache` is a transformers `Cache` holding up to `slots` independent sequences, one row each, preallocated
(no `torch.cat` per step, as `DynamicCache` does). Rows in use are always the first `active` ones, so a forward
pass over them reads a slice of the buffers, never a copy. Each row keeps its own length: a forward writes every
row's new entries at that row's own columns, and attention sees columns up to the longest row (the caller's 4D
mask hides what a row does not own). After a verification pass a row's accepted tree nodes are moved down next
to its committed prefix and the rest is forgotten (`compact`); a finished row's slot is refilled by the last
row (`remove`), so the batch stays packed.

A forward over one row (`focus(row)`, or a cache with one row in use) writes and reads a contiguous prefix of
that row, exactly as a single-sequence cache does: a one-token step with no mask then takes the same attention
kernel as `generate`.

The cache keeps every position: sliding-window layers see only their last `sliding_window(config)` positions
through the masks the decode loop gives them (verify.py), not by forgetting entries.

Why not `DynamicCache.crop`: in transformers 5 it takes a negative count of tokens to remove and a
positive one raises; and it would not let us keep a non-contiguous subset (the accepted path) anyway.
"""
from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, StaticLayer

from medusa.inference.tree_attention import padded


def sliding_window(config) -> int | None:
    """The attention window of the base model's sliding-window layers, if it has any in use (Mistral's
    `sliding_window`; Gemma 2/3's layers marked "sliding_attention"; Qwen2's `use_sliding_window`)."""
    cfg = config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def context_limit(config) -> int:
    """Longest sequence the base model handles: its position limit (sliding-window layers get their own
    masks, so a window does not shorten it)."""
    cfg = config.get_text_config(decoder=True)
    return int(next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                     if getattr(cfg, k, None)), 2048))


def mask_layout(config) -> tuple[int | None, tuple[str, ...] | None]:
    """(the sliding window or None, the layer types a model takes one mask each for, or None when one mask
    serves every layer). Models with `layer_types` (Qwen2, Gemma 2/3, ...) take a dict of masks by layer type;
    others with a window (Mistral) apply it to every layer through their one mask."""
    window = sliding_window(config)
    types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    return window, (tuple(sorted(set(types))) if window and types else None)


class _Layer(StaticLayer):
    """One layer's keys and values, (slots, kv heads, capacity, head dim), allocated on first use.

    Not "compileable" (lengths are Python ints): transformers then treats it like a DynamicCache and, for a
    one-token step without a mask, skips the mask and takes the same attention kernel as `generate`, so plain
    steps are bit-identical to it even in bf16 (an explicit all-zero mask is not: ~0.4 logit error)."""

    is_compileable = False

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, slots: int, capacity: int) -> None:
        k, v = key_states, value_states
        self.keys = k.new_zeros(slots, k.shape[1], capacity, k.shape[3])
        self.values = v.new_zeros(slots, v.shape[1], capacity, v.shape[3])
        self.max_cache_len, self.is_initialized = capacity, True

    def grow(self, capacity: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, :old.shape[2]] = old
            setattr(self, name, new)
        self.max_cache_len = capacity


class BatchCache(Cache):
    """`slots` sequences of up to `capacity` entries each (capacity grows on demand). Capacity is kept a
    multiple of tree_attention.ROW_MULTIPLE: medusa_tree's padded row of keys is then a view of the row's own
    memory, not a copy."""

    def __init__(self, num_layers: int, slots: int = 1, capacity: int = 256):
        capacity = padded(max(capacity, 1))
        super().__init__(layers=[_Layer(max_cache_len=capacity) for _ in range(num_layers)])
        self.slots, self.capacity = slots, capacity
        self.lengths = [0] * slots          # entries each row holds
        self.active = 0                     # rows in use: the first `active`
        self._focus: int | None = None
        self._step = None                   # (columns (B, n), row index (B, n), width) of the forward under way

    @classmethod
    def for_model(cls, model, slots: int = 1, capacity: int = 256) -> "BatchCache":
        return cls(model.config.get_text_config(decoder=True).num_hidden_layers, slots, capacity)

    # ------------------------------------------------------------------ rows
    def add(self) -> int:
        """Take the next free slot (empty); returns its row."""
        if self.active >= self.slots:
            raise RuntimeError(f"all {self.slots} slots of the cache are in use")
        self.active += 1
        self.lengths[self.active - 1] = 0
        return self.active - 1

    def remove(self, row: int) -> int | None:
        """Free `row`: the last row in use moves into it. Returns the row that moved there (None if none did)."""
        last = self.active - 1
        if not 0 <= row <= last:
            raise IndexError(f"row {row} is not in use ({self.active} rows are)")
        self.active = last
        if row == last:
            return None
        n = self.lengths[last]
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[row, :, :n] = layer.keys[last, :, :n]
                layer.values[row, :, :n] = layer.values[last, :, :n]
        self.lengths[row] = n
        return last

    @contextlib.contextmanager
    def focus(self, row: int):
        """Forwards inside this block see row `row` alone (a prompt's prefill while other rows wait)."""
        self._focus = row
        try:
            yield
        finally:
            self._focus = None

    def reserve(self, n: int, row: int | None = None) -> None:
        """Make room for n more entries in every row in use (or in `row`)."""
        need = (self.lengths[row] if row is not None else max(self.lengths[:max(self.active, 1)])) + n
        if need <= self.capacity:
            return
        self.capacity = padded(max(need, 2 * self.capacity))
        for layer in self.layers:
            if layer.is_initialized:
                layer.grow(self.capacity)
            else:
                layer.max_cache_len = self.capacity

    def compact(self, start: int, keep: torch.Tensor, row: int = 0) -> None:
        """Row `row` keeps its entries at start + keep (ascending) as start, start + 1, ...; the rest is dropped."""
        n = keep.numel()
        if n:
            src = keep + start
            for layer in self.layers:
                if layer.is_initialized:
                    layer.keys[row, :, start:start + n] = layer.keys[row].index_select(1, src)
                    layer.values[row, :, start:start + n] = layer.values[row].index_select(1, src)
        self.lengths[row] = start + n

    def compact_rows(self, rows: list[int], starts: list[int], keeps: list[torch.Tensor]) -> None:
        """`compact` for several rows at once (one gather and one scatter per layer)."""
        if len(rows) == 1:
            return self.compact(starts[0], keeps[0], rows[0])
        device = keeps[0].device
        width = max(k.numel() for k in keeps)
        # a shorter row repeats its last move (same source, same place): harmless
        src = torch.stack([(k + s)[torch.arange(width, device=device).clamp(max=k.numel() - 1)]
                           for k, s in zip(keeps, starts)])
        dst = torch.stack([s + torch.arange(width, device=device).clamp(max=k.numel() - 1)
                           for k, s in zip(keeps, starts)])
        r = torch.tensor(rows, device=device)[:, None].expand_as(src)
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[r, :, dst] = layer.keys[r, :, src]
                layer.values[r, :, dst] = layer.values[r, :, src]
        for row, s, k in zip(rows, starts, keeps):
            self.lengths[row] = s + k.numel()

    def copy_in(self, row: int, src: "BatchCache", src_row: int = 0) -> None:
        """Row `row` (just added) takes the entries of `src`'s row `src_row` (a prompt prefilled apart)."""
        n = src.lengths[src_row]
        self.reserve(n, row=row)
        for layer, other in zip(self.layers, src.layers):
            if not other.is_initialized:
                continue
            if not layer.is_initialized:
                layer.allocate(other.keys, other.values, self.slots, self.capacity)
            layer.keys[row, :, :n] = other.keys[src_row, :, :n]
            layer.values[row, :, :n] = other.values[src_row, :, :n]
        self.lengths[row] = n

    def truncate(self, length: int, row: int = 0) -> None:
        """Forget row `row`'s entries from `length` on (nothing is freed: the next update overwrites them)."""
        self.lengths[row] = min(self.lengths[row], length)

    # ------------------------------------------------------------------ what transformers calls
    def _single(self) -> int | None:
        return self._focus if self._focus is not None else 0 if self.active <= 1 else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer, n = self.layers[layer_idx], key_states.shape[-2]
        if layer_idx == 0:
            self._step = None
        if not layer.is_initialized:
            layer.allocate(key_states, value_states, self.slots, self.capacity)
        row = self._single()
        if row is not None:
            start, end = self.lengths[row], self.lengths[row] + n
            if end > self.capacity:
                raise RuntimeError(f"KV cache overflow: {start} + {n} tokens > capacity {self.capacity}")
            layer.keys[row:row + 1, :, start:end] = key_states
            layer.values[row:row + 1, :, start:end] = value_states
            out = layer.keys[row:row + 1, :, :end], layer.values[row:row + 1, :, :end]
        else:
            cols, rows, width = self._columns(n, key_states.shape[0])
            layer.keys[rows, :, cols] = key_states.transpose(1, 2)
            layer.values[rows, :, cols] = value_states.transpose(1, 2)
            out = layer.keys[:self.active, :, :width], layer.values[:self.active, :, :width]
        if layer_idx == len(self.layers) - 1:       # the forward's last layer: count its entries
            for r in ([row] if row is not None else range(self.active)):
                self.lengths[r] += n
        return out

    def _columns(self, n: int, batch: int):
        if self._step is None:
            if batch != self.active:
                raise RuntimeError(f"a forward over the cache takes its {self.active} rows in use, not {batch}")
            lengths = torch.tensor(self.lengths[:batch], device=self.layers[0].keys.device)
            width = int(lengths.max()) + n
            if width > self.capacity:
                raise RuntimeError(f"KV cache overflow: {width} columns > capacity {self.capacity}")
            cols = lengths[:, None] + torch.arange(n, device=lengths.device)
            self._step = cols, torch.arange(batch, device=lengths.device)[:, None].expand_as(cols), width
        return self._step

    def get_seq_length(self, layer_idx: int = 0) -> int:
        row = self._single()
        return self.lengths[row] if row is not None else max(self.lengths[:self.active], default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def nbytes(self) -> int:
        """Memory held by the keys and values."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))
