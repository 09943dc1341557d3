"""SlotCache (continuous batching): each row decodes exactly as its sequence would alone, through refills and
the cache's growth."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from conftest import tiny_model
from medusa.inference.cache import SlotCache


def _seq(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_each_row_decodes_as_its_sequence_alone(arch):
    model = tiny_model(arch)
    cache = SlotCache(model.config.get_text_config(decoder=True).num_hidden_layers, rows=3, capacity=4)
    seqs = {}

    def load(row, seed, n):
        prompt = _seq(seed, n)
        prefill = DynamicCache()
        model(prompt[None], past_key_values=prefill, use_cache=True)
        cache.load(row, prefill, n)
        seqs[row] = prompt

    load(0, 1, 5)        # beyond the first capacity: the cache grows on load
    load(1, 2, 9)
    load(2, 3, 3)
    for step in range(12):          # rows end up past the capacity their loads made: it grows on steps too
        if step == 4:
            load(1, 4, 14)          # a finished row's slot takes another prompt, longer than any before
        if step == 7:
            cache.release(2)        # an empty slot keeps stepping, harmlessly
            seqs.pop(2)
        nxt = _seq(100 + step, 3)
        mask = cache.step_mask(model.dtype)
        logits = model(nxt[:, None], past_key_values=cache, attention_mask=mask, position_ids=cache.columns[:, None],
                       use_cache=True).logits[:, -1]
        cache.advance()
        assert torch.isfinite(logits).all()
        for row, seq in seqs.items():
            seqs[row] = torch.cat([seq, nxt[row:row + 1]])
            alone = model(seqs[row][None]).logits[0, -1]
            torch.testing.assert_close(logits[row], alone, atol=2e-4, rtol=2e-4)
    assert cache.lengths.tolist()[:2] == [5 + 12, 14 + 8] and cache.capacity >= 22


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
    assert context_limit(MistralConfig(sliding_window=16, max_position_embeddings=64)) == 16
    assert context_limit(full) == full.max_position_embeddings
