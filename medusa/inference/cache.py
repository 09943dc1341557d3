"""KV-cache surgery: the one module that touches transformers' cache internals.

`TreeCache` is a transformers `Cache` whose layers are preallocated once per request (no `torch.cat` per
step, as `DynamicCache` does) and hand attention only the filled prefix. After a verification pass the
accepted tree nodes' entries are moved down next to the committed prefix and the rest is forgotten:
`compact(start, keep)`.

Why not `DynamicCache.crop`: in transformers 5 it takes a negative count of tokens to remove and a
positive one raises; and it would not let us keep a non-contiguous subset (the accepted path) anyway.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer


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
