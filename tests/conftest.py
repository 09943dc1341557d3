"""Tiny in-process models of several architectures, and heads that really predict (oracle heads)."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Phi3Config,
                          Qwen2Config)

from medusa.inference.heads import HeadsConfig, MedusaHeads

VOCAB, HIDDEN = 96, 64


def _configs() -> dict:
    # initializer_range 0.3 (not 0.02): with tiny weights a random model's greedy output falls into a
    # one-token loop at once; larger ones give varied continuations, so acceptance is really exercised.
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=0.3)
    return {
        "llama": LlamaConfig(**common),
        "mistral": MistralConfig(**common, sliding_window=None),
        "qwen2": Qwen2Config(**common),
        "gemma2": Gemma2Config(**common, head_dim=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                               sliding_window=256),
        "phi3": Phi3Config(**common),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=256, initializer_range=0.3,
                           bos_token_id=1, eos_token_id=2),
    }


ARCHS = list(_configs())


def tiny_model(arch: str, seed: int = 0, attn: str | None = None, initializer_range: float | None = None, **config):
    """A random model of `arch`; `config` overrides fields of its config (e.g. sliding_window=64)."""
    torch.manual_seed(seed)
    cfg = _configs()[arch]
    for k, v in config.items():
        setattr(cfg, k, v)
    if attn:
        cfg._attn_implementation = attn
    if initializer_range is not None:
        cfg.initializer_range = initializer_range
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def random_heads(num_heads: int = 4, seed: int = 1, shared: bool = True, next_token: bool = False,
                 parent_token: bool = False) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(HeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=num_heads, shared_lm_head=shared,
                                    next_token_input=next_token or parent_token, parent_token_input=parent_token))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2)
    return heads.eval()



def parent_heads_ignoring_parent() -> tuple[MedusaHeads, MedusaHeads]:
    """(parent-token heads whose parent weights are zero, plain next-token heads with the same other weights):
    the two guess alike, by two different code paths."""
    heads, plain = random_heads(parent_token=True), random_heads(next_token=True)
    with torch.no_grad():
        for h in heads.heads:
            if h.parent is not None:
                h.parent.weight.zero_()
    plain.load_state_dict({k: v for k, v in heads.state_dict().items() if ".parent." not in k})
    return heads, plain

class OracleHeads(nn.Module):
    """Heads that know the reference greedy continuation (or several: `sequence` may be a list, one per
    prompt of a batch). At the position whose hidden state is nearest, head i puts the true token t+2+i of
    that sequence at a chosen top-k rank. With `tree`, successive calls walk the tree's
    root-to-leaf paths in turn (ranks along the path, a miss below it), so every node gets accepted;
    otherwise ranks are drawn at random below `max_rank` with a miss one time in `miss_every`.
    Used to force long accepted paths. Same call signature as MedusaHeads."""

    def __init__(self, model, sequence: torch.Tensor, num_heads: int = 4, max_rank: int = 3,
                 miss_every: int = 7, tree: list | None = None):
        super().__init__()
        self.config = HeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=num_heads)
        seqs = sequence if isinstance(sequence, (list, tuple)) else [sequence]
        with torch.no_grad():
            hidden = [model(s[None], output_hidden_states=True).hidden_states[-1][0] for s in seqs]
        self.register_buffer("hidden", torch.cat(hidden))   # (sum T, H)
        # position j of the stacked hidden states: (its sequence's tokens, its index there)
        self.where = [(s.tolist(), t) for s in seqs for t in range(s.numel())]
        self.max_rank, self.miss_every = max_rank, miss_every
        self.leaves = [p for p in tree if not any(q[:-1] == p for q in tree)] if tree else None
        self.calls = 0

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def _ranks(self, t: int) -> list[int | None]:
        if self.leaves:
            leaf = self.leaves[self.calls % len(self.leaves)]
            return [leaf[i] if i < len(leaf) else None for i in range(self.num_heads)]
        picks = [random.Random(t * 1000 + i) for i in range(self.num_heads)]
        return [None if p.randrange(self.miss_every) == 0 else p.randrange(self.max_rank) for p in picks]

    def forward(self, hidden: torch.Tensor, lm_head=None, upto=None, next_embeds=None, parent_embeds=None) -> torch.Tensor:
        if hidden.dim() > 1:     # a batch of positions (evaluation): (n, H) -> (K, n, V)
            return torch.stack([self(h) for h in hidden], dim=1)[:upto]
        j = int((self.hidden - hidden.float()).norm(dim=-1).argmin())
        seq, t = self.where[j]
        ranks = self._ranks(j)
        self.calls += 1
        logits = torch.rand(self.num_heads, VOCAB, generator=torch.Generator().manual_seed(1000 + j))
        for i, rank in enumerate(ranks):
            if rank is None or t + 2 + i >= len(seq):
                continue
            true = seq[t + 2 + i]
            order = [tok for tok in logits[i].argsort(descending=True).tolist() if tok != true]
            ranked = order[:rank] + [true] + order[rank:]
            logits[i, ranked] = torch.linspace(2.0, 1.0, VOCAB)
        return logits.to(hidden.dtype)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A character-level fast tokenizer over VOCAB ids with a ChatML-style template (ids 0-2 special)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 32 + VOCAB - len(specials) - 1)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
