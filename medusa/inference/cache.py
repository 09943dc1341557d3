"""KV-cache surgery: the one module that touches transformers' cache internals.

`TreeCache` is a transformers `Cache` whose layers are preallocated once per request (no `torch.cat` per
step, as `DynamicCache` does) and hand attention only the filled prefix. After a verification pass the
accepted tree nodes' entries are moved down next to the committed prefix and the rest is forgotten:
`compact(start, keep)`.

`SlotCache` holds many independent requests, a row each (continuous batching, `medusa distill`): a row's
entries sit at columns [0, length) whatever the other rows hold, each decoding step writes every row's new
entry at that row's own column, and a finished row's slot is refilled with another request's prompt.

Neither cache applies a sliding window: one 4D mask serves every layer, so a model whose layers see only
their last `sliding_window(config)` positions is exact only while a sequence stays that short.

Why not `DynamicCache.crop`: in transformers 5 it takes a negative count of tokens to remove and a
positive one raises; and it would not let us keep a non-contiguous subset (the accepted path) anyway.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer


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


class _TreeLayer(StaticLayer):
    """A preallocated layer (its tensors come from StaticLayer's lazy init) with a Python-int fill level.

    Not "compileable" (its length is a Python int): transformers then treats it like a DynamicCache and,
    for a one-token step without a mask, skips the mask and takes the same attention kernel as `generate`,
    so plain steps are bit-identical to it even in bf16 (an explicit all-zero mask is not: ~0.4 logit error)."""

    is_compileable = False

    def __init__(self, max_cache_len: int):
        super().__init__(max_cache_len=max_cache_len)
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, start = key_states.shape[-2], self.length
        if start + n > self.max_cache_len:
            raise RuntimeError(f"KV cache overflow: {start} + {n} tokens > capacity {self.max_cache_len}")
        self.keys[:, :, start:start + n] = key_states
        self.values[:, :, start:start + n] = value_states
        self.length = start + n
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def compact(self, start: int, keep: torch.Tensor) -> None:
        """Entries start + keep[j] move to start + j; the layer then holds start + len(keep) tokens."""
        n = keep.numel()
        if self.is_initialized and n:
            src = keep + start
            self.keys[:, :, start:start + n] = self.keys.index_select(2, src)
            self.values[:, :, start:start + n] = self.values.index_select(2, src)
        self.length = start + n


class TreeCache(Cache):
    """Preallocated cache for one request: capacity fixed at creation, contents compacted in place."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[_TreeLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity

    @classmethod
    def for_model(cls, model, capacity: int) -> "TreeCache":
        cfg = model.config.get_text_config(decoder=True)
        return cls(cfg.num_hidden_layers, capacity)

    @property
    def length(self) -> int:
        return self.layers[0].length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def compact(self, start: int, keep: torch.Tensor) -> None:
        """Keep the entries at positions start + keep (ascending, on the cache's device) and drop the rest."""
        for layer in self.layers:
            layer.compact(start, keep)

    def truncate(self, length: int) -> None:
        """Forget everything from `length` on (nothing is freed: the next update overwrites it)."""
        for layer in self.layers:
            layer.length = min(layer.length, length)


class _SlotLayer(StaticLayer):
    """One layer of a SlotCache: a step's entries go to each row's own column (`SlotCache.columns`)."""

    is_compileable = False

    def __init__(self, owner: "SlotCache"):
        super().__init__(max_cache_len=0)
        self.owner = owner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        if key_states.shape[0] != o.rows or key_states.shape[-2] != 1:
            raise RuntimeError(f"a SlotCache step takes one token for each of its {o.rows} rows, "
                               f"not {tuple(key_states.shape[:1] + key_states.shape[2:3])}")
        self.keys[o.row_index, :, o.columns] = key_states[:, :, 0]
        self.values[o.row_index, :, o.columns] = value_states[:, :, 0]
        return self.keys[:, :, :o.width], self.values[:, :, :o.width]

    def get_seq_length(self) -> int:
        return self.owner.width - 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0


class SlotCache(Cache):
    """`rows` independent sequences. `load(row, cache, n)` puts the first n entries of a one-row cache (a
    prompt's prefill) in a slot; `step_mask()` gives the (rows, 1, 1, width) additive mask of the next step,
    whose entries land at column `lengths[row]` of each row; `advance()` then counts them."""

    def __init__(self, num_layers: int, rows: int, capacity: int = 256):
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.rows, self.capacity = rows, capacity
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.row_index = torch.arange(rows)
        self.columns, self.width = self.lengths, 1

    @classmethod
    def for_model(cls, model, rows: int) -> "SlotCache":
        return cls(model.config.get_text_config(decoder=True).num_hidden_layers, rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width - 1

    def _reserve(self, like: Cache, n: int) -> None:
        """Allocate on first use (shapes, dtype and device from `like`), grow to hold n entries a row."""
        if n <= self.capacity and self.layers[0].is_initialized:
            return
        self.capacity = max(n, 2 * self.capacity) if self.layers[0].is_initialized else max(n, self.capacity)
        for layer, src in zip(self.layers, like.layers):
            k, v = src.keys, src.values
            keys = k.new_zeros(self.rows, k.shape[1], self.capacity, k.shape[3])
            values = v.new_zeros(self.rows, v.shape[1], self.capacity, v.shape[3])
            if layer.is_initialized:
                keys[:, :, :layer.keys.shape[2]] = layer.keys
                values[:, :, :layer.values.shape[2]] = layer.values
            layer.keys, layer.values, layer.is_initialized = keys, values, True
            layer.max_cache_len = self.capacity
        self.lengths = self.lengths.to(k.device)
        self.row_index = self.row_index.to(k.device)

    def load(self, row: int, prefill: Cache, n: int) -> None:
        """Slot `row` now holds the first n entries of `prefill`, a one-row cache (the rest of the row is stale
        and never seen: the mask stops at the row's length). Room for the steps to come is made by
        `step_mask`, which grows the cache when a row reaches its capacity."""
        self._reserve(prefill, n + 1)
        for layer, src in zip(self.layers, prefill.layers):
            layer.keys[row, :, :n] = src.keys[0, :, :n]
            layer.values[row, :, :n] = src.values[0, :, :n]
        self.lengths[row] = n

    def release(self, row: int) -> None:
        """An empty slot: its steps write column 0 and attend only to it (finite, ignored outputs)."""
        self.lengths[row] = 0

    def step_mask(self, dtype) -> torch.Tensor:
        """Prepare the next step (every row writes its column `lengths[row]`) and return its additive mask."""
        width = int(self.lengths.max()) + 1
        if width > self.capacity:
            self._reserve(self, width)
        self.columns, self.width = self.lengths.clone(), width
        visible = torch.arange(width, device=self.lengths.device)[None] <= self.lengths[:, None]
        zero = torch.zeros((), dtype=dtype, device=self.lengths.device)
        return torch.where(visible, zero, torch.finfo(dtype).min)[:, None, None, :]

    def advance(self) -> None:
        """Count the step's entries."""
        self.lengths += 1
