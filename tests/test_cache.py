"""BatchCache: each row decodes exactly as its sequence would alone, through rows joining, leaving (the last
row moving into the freed slot), compaction and the cache's growth."""
from __future__ import annotations

import torch

from conftest import tiny_model
from medusa.inference.cache import BatchCache


def _seq(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(seed))


def _star_mask(cache: BatchCache, n: int, dtype) -> torch.Tensor:
    """Each row's n new tokens: a root and n - 1 children of it (each sees that row's entries, the root and
    itself)."""
    lengths = cache.lengths[:cache.active]
    sees = torch.eye(n, dtype=torch.bool)
    sees[:, 0] = True
    mask = torch.full((len(lengths), 1, n, max(lengths) + n), torch.finfo(dtype).min)
    for b, length in enumerate(lengths):
        mask[b, 0, :, :length] = 0
        mask[b, 0, :, length:length + n] = torch.where(sees, 0.0, torch.finfo(dtype).min)
    return mask


@torch.no_grad()
def test_each_row_decodes_as_its_sequence_alone(arch):
    model = tiny_model(arch)
    cache = BatchCache.for_model(model, slots=3, capacity=4)
    seqs: dict[int, torch.Tensor] = {}           # cache row -> its sequence so far

    def join(seed, n):
        prompt = _seq(seed, n)
        row = cache.add()
        cache.reserve(n, row=row)                # beyond the first capacity: the cache grows
        with cache.focus(row):
            model(prompt[None], past_key_values=cache, use_cache=True)
        seqs[row] = prompt

    join(1, 5)
    join(2, 9)
    join(3, 3)
    for step in range(10):
        if step == 4:                            # row 0 leaves: the last row moves into its slot
            moved = cache.remove(0)
            seqs[0] = seqs.pop(moved)
            join(4, 14)                          # and a longer prompt takes the free slot
        n = 1 + step % 3
        nxt = torch.stack([_seq(100 + step + r, n) for r in range(cache.active)])
        cache.reserve(n)
        start = torch.tensor(cache.lengths[:cache.active])[:, None]
        positions = start + (torch.arange(n) > 0)                 # the root, then its children
        logits = model(nxt, past_key_values=cache, attention_mask=_star_mask(cache, n, model.dtype),
                       position_ids=positions, use_cache=True).logits
        keep = torch.tensor([0, n - 1]) if n > 1 else torch.tensor([0])   # the root and its last child
        cache.compact_rows(list(range(cache.active)), start[:, 0].tolist(), [keep] * cache.active)
        for row in range(cache.active):
            seqs[row] = torch.cat([seqs[row], nxt[row, keep]])
            alone = model(seqs[row][None]).logits[0, -keep.numel():]
            torch.testing.assert_close(logits[row, keep], alone, atol=2e-4, rtol=2e-4)
            assert cache.lengths[row] == seqs[row].numel()
    assert cache.capacity >= max(cache.lengths)


def test_sliding_window_is_read_where_a_layer_uses_one():
    """The window that one 4D mask cannot apply: Mistral's, Gemma 2's (every other layer), Qwen2's only when
    switched on and given to some layer; none for models without one."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from medusa.inference.cache import sliding_window
    from medusa.model import context_limit

    assert sliding_window(MistralConfig(sliding_window=16)) == 16
    assert sliding_window(MistralConfig(sliding_window=None)) is None
    assert sliding_window(Gemma2Config(sliding_window=512)) == 512
    assert sliding_window(Qwen2Config(sliding_window=512)) is None                  # use_sliding_window off
    assert sliding_window(Qwen2Config(sliding_window=512, use_sliding_window=True, max_window_layers=1,
                                      num_hidden_layers=2)) == 512
    full = Gemma2Config(sliding_window=512, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    assert sliding_window(full) is None and sliding_window(LlamaConfig()) is None
    assert context_limit(MistralConfig(sliding_window=16, max_position_embeddings=64)) == 64   # masks apply it
    assert context_limit(full) == full.max_position_embeddings
