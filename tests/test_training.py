"""Training: the loss shift and masking, distillation resumption, Medusa-1/Medusa-2 runs on tiny models."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, random_heads, tiny_model, tiny_tokenizer
from medusa import MedusaModel
from medusa.training.data import collate, read_conversations, tokenize_conversation
from medusa.training.distill import DistillConfig, LocalGenerator, run_distill
from medusa.training.losses import medusa_loss
from medusa.training.prompts import read_prompts
from medusa.training.trainer import TrainConfig, train

ident = lambda i, x: x


def _onehot_features(ids: torch.Tensor, offset: int, K: int = 3) -> torch.Tensor:
    """(K, B, T, V): head i at position t puts all its mass on token t + offset + i."""
    B, T = ids.shape
    feats = torch.full((K, B, T, VOCAB), -30.0)
    for i in range(K):
        for t in range(T - offset - i):
            feats[i, torch.arange(B), t, ids[:, t + offset + i]] = 30.0
    return feats


def test_head_predicting_token_t_plus_2_plus_i_has_zero_loss_and_off_by_one_does_not():
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    right, stats = medusa_loss(_onehot_features(ids, 2), ident, ids, mask)
    assert right.item() < 1e-6 and stats.top1.tolist() == [1.0, 1.0, 1.0]
    for wrong_offset in (1, 3):
        wrong, stats = medusa_loss(_onehot_features(ids, wrong_offset), ident, ids, mask)
        assert wrong.item() > 10 and max(stats.top1.tolist()) < 0.3


def test_loss_counts_only_assistant_targets():
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 8:12] = True
    feats = _onehot_features(ids, 2)
    base, stats = medusa_loss(feats, ident, ids, mask)
    assert stats.count.tolist() == [4, 4, 4]              # targets 8..11 for every head
    spoiled = feats.clone()
    spoiled[:, 0, :4] = torch.randn(3, 4, VOCAB)           # t <= 3: targets t+2+i <= 7, not assistant tokens
    assert medusa_loss(spoiled, ident, ids, mask)[0].item() == pytest.approx(base.item(), abs=1e-6)
    spoiled[0, 0, 6] = torch.randn(VOCAB)                   # head 0 at t=6 predicts token 8: counted
    assert medusa_loss(spoiled, ident, ids, mask)[0].item() > base.item() + 0.1


def test_kl_loss_is_zero_when_head_matches_teacher():
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    base_logits = torch.randn(1, 12, VOCAB) * 3
    logp = torch.log_softmax(base_logits, -1)
    teacher = (logp, torch.arange(VOCAB).expand(1, 12, VOCAB))      # full support: exact KL
    feats = torch.stack([torch.roll(base_logits, -(1 + i), dims=1) for i in range(3)])  # head i at t = base at t+1+i
    loss, _ = medusa_loss(feats, ident, ids, mask, teacher=teacher)
    assert loss.item() < 1e-5
    loss2, _ = medusa_loss(torch.stack([base_logits] * 3), ident, ids, mask, teacher=teacher)
    assert loss2.item() > 0.1


def test_a_draft_vocabulary_loss_is_the_softmax_over_those_tokens_and_skips_targets_outside():
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 14))
    mask = torch.ones_like(ids, dtype=torch.bool)
    vocab = torch.unique(ids[:, 2:])[:-3]                       # three targets' tokens left out
    vocab_map = torch.full((VOCAB,), -1, dtype=torch.long)
    vocab_map[vocab] = torch.arange(vocab.numel())
    feats = torch.randn(3, 2, 14, VOCAB, requires_grad=True)
    loss, stats = medusa_loss(feats, lambda i, x: x[:, vocab], ids, mask, vocab_map=vocab_map)
    manual = []
    for i in range(3):
        logits, target = feats[i, :, : 12 - i].reshape(-1, VOCAB), ids[:, 2 + i:].reshape(-1)
        inside = torch.isin(target, vocab)
        logp = torch.log_softmax(logits[inside][:, vocab], -1)
        manual.append(-logp[torch.arange(int(inside.sum())), vocab_map[target[inside]]].mean())
        assert stats.count[i] == inside.sum() < target.numel()
    assert loss.item() == pytest.approx(sum(0.8 ** i * m for i, m in enumerate(manual)).item(), rel=1e-5)
    # soft targets: teacher mass outside the vocabulary is dropped and the rest renormalised; a position whose
    # teacher tokens all lie outside adds nothing, and no NaN reaches the gradient
    teacher_logp = torch.log_softmax(torch.randn(2, 14, 4), -1)
    teacher_idx = vocab[torch.randint(0, vocab.numel(), (2, 14, 4))]
    outside = torch.tensor([t for t in range(VOCAB) if t not in set(vocab.tolist())])
    teacher_idx[0, 5, :2] = outside[:2]                          # half outside: renormalised over the rest
    teacher_idx[1, 3] = outside[:4]                              # all outside
    kl, _ = medusa_loss(feats, lambda i, x: x[:, vocab], ids, mask, vocab_map=vocab_map,
                        teacher=(teacher_logp, teacher_idx))
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(feats.grad).all()
    keep = torch.isin(ids[:, 2:], vocab)                         # head 0: positions t with target t+2 inside
    t_lp, t_ix = teacher_logp[:, 1:-1][keep], teacher_idx[:, 1:-1][keep]
    lp = torch.log_softmax(feats[0, :, :12][keep][:, vocab], -1)
    valid = torch.isin(t_ix, vocab)
    q = torch.where(valid, t_lp, float("-inf"))
    q = torch.log_softmax(q, -1)
    rows = valid.any(-1)
    term = torch.where(valid, q.exp() * (q - lp.gather(-1, vocab_map[t_ix].clamp(min=0))), 0.0)
    kl0, _ = medusa_loss(feats[:1], lambda i, x: x[:, vocab], ids, mask, vocab_map=vocab_map,
                         teacher=(teacher_logp, teacher_idx))
    assert (~rows).sum() >= 1 and kl0.item() == pytest.approx((term[rows].sum(-1).sum() / keep.sum()).item(), rel=1e-5)


def test_assistant_mask_covers_every_assistant_turn_and_nothing_else():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "AB"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "CD"}]
    ex = tokenize_conversation(tok, msgs, 512)
    assert tok.decode(ex.input_ids[ex.loss_mask]) == "AB<|im_end|>CD<|im_end|>"
    short = tokenize_conversation(tok, msgs, 20)
    assert short.input_ids.numel() == 20 and short.loss_mask.sum() < ex.loss_mask.sum()


def _prompts(path, n=10, bad_line=None):
    with open(path, "w") as f:
        for k in range(n):
            if k == bad_line:
                f.write("{not json\n")
            f.write(json.dumps({"id": f"p{k}", "prompt": f"say {k} and {k * 7}"}) + "\n")


class _Dies(LocalGenerator):
    """Answers `lives` records (or a few more), then fails as a killed process would."""
    lives = 5

    def stream(self, recs):
        for rows in super().stream(recs):
            if self.lives <= 0:
                raise KeyboardInterrupt
            self.lives -= len(rows)
            yield rows


def test_distill_resumes_without_duplicates_or_loss(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    _prompts(tmp_path / "p.jsonl", 10, bad_line=4)
    cfg = DistillConfig(inputs=[str(tmp_path / "p.jsonl")], output=str(tmp_path / "out.jsonl"), max_new_tokens=12,
                        batch_size=3)
    warnings = []
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg, _Dies(model, tok, cfg), log=warnings.append)
    assert any("p.jsonl:5" in w and "skipped" in w for w in warnings)   # the bad line, by its number
    with open(cfg.output, "a") as f:
        f.write('{"id": "p9", "conversa')                               # torn write of a killed run
    first = [json.loads(x)["id"] for x in open(cfg.output) if x.strip().endswith("}")]
    assert 5 <= len(first) < 10
    run_distill(cfg, LocalGenerator(model, tok, cfg), log=lambda m: None)
    rows = [json.loads(x) for x in open(cfg.output)]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(f"p{k}" for k in range(10)) and len(ids) == len(set(ids))
    cfg2 = DistillConfig(inputs=cfg.inputs, output=str(tmp_path / "straight.jsonl"), max_new_tokens=12, batch_size=3)
    run_distill(cfg2, LocalGenerator(model, tok, cfg2), log=lambda m: None)
    straight = {json.loads(x)["id"]: json.loads(x)["conversations"] for x in open(cfg2.output)}
    assert {r["id"]: r["conversations"] for r in rows} == straight


def _generate_alone(model, tok, turns, max_new_tokens):
    """`generate`'s greedy answers to one record's turns, the record alone: the reference for distillation."""
    history, answers, n, finish = [], [], 0, "stop"
    eos = [model.config.eos_token_id, tok.eos_token_id]     # the model's, and the chat's end of turn
    for q in turns:
        history.append({"role": "user", "content": q})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=eos)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        if new[-1] in eos:
            new = new[:-1]
        else:
            finish = "length"
        answers.append(tok.decode(new, skip_special_tokens=True))
        history.append({"role": "assistant", "content": answers[-1]})
        n += len(new)
    return answers, n, finish


WINDOWS = {"llama": {}, "mistral": dict(sliding_window=64),   # Mistral: every layer; Qwen2: its second one
           "qwen2": dict(sliding_window=64, use_sliding_window=True, layer_types=["full_attention", "sliding_attention"])}


@pytest.mark.parametrize("arch", list(WINDOWS))
def test_distill_answers_are_generates_on_each_prompt_alone(tmp_path, arch):
    """Continuous batching: 3 slots for 10 records of many lengths (one long enough to grow the cache, one of
    two turns); every slot is refilled several times, and each answer is `generate`'s on its record alone.
    With a sliding window shorter than most of these prompts plus their answers, those turns are decoded
    alone and the others share the batch."""
    model, tok = tiny_model(arch, max_position_embeddings=1024, **WINDOWS[arch]), tiny_tokenizer()
    with open(tmp_path / "p.jsonl", "w") as f:
        for k in range(9):
            f.write(json.dumps({"id": f"p{k}", "prompt": f"say {k} and {k * 7} " * (1 + k % 4)}) + "\n")
        f.write(json.dumps({"id": "long", "prompt": "a long one " * 40}) + "\n")
        f.write(json.dumps({"id": "two", "turns": ["first question", "second one, longer " * 3]}) + "\n")
    cfg = DistillConfig(inputs=[str(tmp_path / "p.jsonl")], output=str(tmp_path / "out.jsonl"), max_new_tokens=20,
                        batch_size=3)
    run_distill(cfg, LocalGenerator(model, tok, cfg), log=lambda m: None)
    rows = {r["id"]: r for r in map(json.loads, open(cfg.output))}
    assert len(rows) == 11
    for rec in read_prompts(str(tmp_path / "p.jsonl")):
        answers, n, finish = _generate_alone(model, tok, rec.turns, 20)
        row = rows[rec.id]
        assert [c["value"] for c in row["conversations"][1::2]] == answers
        assert (row["new_tokens"], row["finish_reason"]) == (n, finish)
    if arch == "llama":
        assert {r["finish_reason"] for r in rows.values()} == {"stop", "length"}  # both kinds of ending met


def test_distill_skips_a_record_longer_than_the_context(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()           # a context of 256 tokens
    with open(tmp_path / "p.jsonl", "w") as f:
        for k, prompt in enumerate(["short", "far too long " * 30, "short too"]):
            f.write(json.dumps({"id": f"p{k}", "prompt": prompt}) + "\n")
    cfg = DistillConfig(inputs=[str(tmp_path / "p.jsonl")], output=str(tmp_path / "out.jsonl"), max_new_tokens=8,
                        batch_size=2)
    logs = []
    run_distill(cfg, LocalGenerator(model, tok, cfg, log=logs.append), log=lambda m: None)
    assert [r["id"] for r in map(json.loads, open(cfg.output))] == ["p0", "p2"]
    assert any("skipped p1" in m and "context" in m for m in logs)


def test_distill_samples_with_temperature_and_top_p(tmp_path):
    """Sampling: with top-p below the top token's probability only that token is left, so the answers are the
    greedy ones; at temperature 1 they are not."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    _prompts(tmp_path / "p.jsonl", 6)
    out = {}
    for name, temperature, top_p in (("greedy", 0.0, 1.0), ("top", 1.0, 1e-6), ("free", 1.0, 1.0)):
        cfg = DistillConfig(inputs=[str(tmp_path / "p.jsonl")], output=str(tmp_path / f"{name}.jsonl"),
                            max_new_tokens=16, batch_size=4, temperature=temperature, top_p=top_p)
        torch.manual_seed(0)
        run_distill(cfg, LocalGenerator(model, tok, cfg), log=lambda m: None)
        out[name] = {r["id"]: r["conversations"] for r in map(json.loads, open(cfg.output))}
    assert out["top"] == out["greedy"] and out["free"] != out["greedy"]


def test_distill_packs_fp32_cpu_weights_with_the_same_answers(tmp_path):
    from medusa.inference import packed_linear
    from medusa.training.distill import _local_generator

    if packed_linear.default_backend() is None:
        pytest.skip("torch without oneDNN or MKL")
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    _prompts(tmp_path / "p.jsonl", 6)
    answers, logs, engaged = {}, {}, {}
    for pack in (None, False):
        cfg = DistillConfig(inputs=[str(tmp_path / "p.jsonl")], output=str(tmp_path / f"{pack}.jsonl"),
                            model=str(base), max_new_tokens=12, batch_size=3, pack_weights=pack)
        gen = _local_generator(cfg, logs.setdefault(pack, []).append)
        linears = [m for m in gen.model.modules() if isinstance(m, torch.nn.Linear)]
        packed = [isinstance(m, (packed_linear.OneDNNLinear, packed_linear.PackedLinear)) for m in linears]
        assert all(packed) if pack is None else not any(packed)
        linears[0].register_forward_pre_hook(lambda *_, p=pack: engaged.setdefault(p, []).append(
            packed_linear._ENGAGED.get()))
        run_distill(cfg, gen, log=lambda m: None)
        answers[pack] = {json.loads(x)["id"]: json.loads(x)["conversations"] for x in open(cfg.output)}
    assert any("Packed" in m for m in logs[None]) and not any("Packed" in m for m in logs[False])
    assert engaged[None] and all(engaged[None])           # decoding's products used the packed copies
    assert len(answers[None]) == 6 and answers[None] == answers[False]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """The tiny model's own greedy answers to 48 prompts: self-distillation data."""
    d = tmp_path_factory.mktemp("distilled")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    _prompts(d / "p.jsonl", 48)
    cfg = DistillConfig(inputs=[str(d / "p.jsonl")], output=str(d / "data.jsonl"), max_new_tokens=40, batch_size=16)
    run_distill(cfg, LocalGenerator(model, tok, cfg), log=lambda m: None)
    return d / "data.jsonl"


def _train(data, out, log=lambda m: None, **kw):
    cfg = TrainConfig(data=str(data), output=str(out), num_heads=3, batch_size=kw.pop("batch_size", 4),
                      epochs=kw.pop("epochs", 2),
                      lr=kw.pop("lr", 1e-2), val_examples=8, log_every=1, checkpoint_every=5, **kw)
    return train(cfg, base=tiny_model("llama"), tokenizer=tiny_tokenizer(), log=log)


def _log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_medusa1_training_lowers_loss_and_round_trips(distilled, tmp_path):
    res = _train(distilled, tmp_path / "h", epochs=4)
    log = _log(tmp_path / "h")
    assert res["finished"] and res["step"] == res["total"] == len(log)
    assert sum(r["loss"] for r in log[-3:]) < 0.7 * sum(r["loss"] for r in log[:3])
    assert len(res["val_accuracy"]["top1"]) == 3
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    m = MedusaModel.from_pretrained(tmp_path / "h", base_model=str(tmp_path / "base"))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "h" / "heads.safetensors"))
    for k, v in m.heads.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    targets = torch.cat([e.input_ids[e.loss_mask] for e in (tokenize_conversation(tok, c, 1024)
                                                              for c in read_conversations(distilled))])
    vocab = m.heads.draft_vocab
    assert res["draft_vocab_size"] == m.heads.config.draft_vocab_size == vocab.numel() < VOCAB
    assert set(vocab.tolist()) <= set(targets.tolist())        # guesses among the trained-on tokens (not val's)
    assert torch.isin(targets, vocab).float().mean() > 0.95
    assert torch.equal(m.draft_head.token_ids, m.heads.draft_vocab)
    ids = tok.apply_chat_template([{"role": "user", "content": "say 3 and 21"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ref = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(ids, max_new_tokens=20, eos_token_id=[]), ref)


def _letter_pairs(path, n=64, seed=0):
    """Answers of letter pairs "xX", x random: at an upper-case letter, token t+2 follows from token t+1 alone."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for k in range(n):
            text = "".join(c + c.upper() for c in rng.choices("abcdefghijklmnopqrstuvwxyz", k=30))
            conv = [{"from": "human", "value": "pairs"}, {"from": "gpt", "value": text}]
            f.write(json.dumps({"id": str(k), "conversations": conv}) + "\n")
    return path


def test_next_token_heads_learn_what_only_the_next_token_tells(tmp_path):
    """Head 0 at an upper-case letter must guess the next pair's upper-case letter: unknowable from the hidden
    state (the next letter is random), certain from the next token. Half of head 0's targets are such."""
    data = _letter_pairs(tmp_path / "pairs.jsonl")
    acc = {}
    for next_token in (False, True):
        res = _train(data, tmp_path / str(next_token), epochs=6, shared_lm_head=False, next_token_input=next_token)
        acc[next_token] = res["val_accuracy"]["top1"][0]
    assert acc[True] > 0.4 and acc[False] < 0.2, acc


def test_parent_token_heads_learn_what_only_the_parent_tells(tmp_path):
    """Head 1 at a lower-case letter must guess the next pair's upper-case letter (token t+3): unknowable from
    the hidden state and the next token, certain from token t+2, the random letter its guess follows."""
    data = _letter_pairs(tmp_path / "pairs.jsonl")
    acc = {}
    for parent in (False, True):
        res = _train(data, tmp_path / str(parent), epochs=6, shared_lm_head=False, next_token_input=True,
                     parent_token_input=parent)
        acc[parent] = res["val_accuracy"]["top1"][1]
    assert acc[True] > 0.4 and acc[False] < 0.2, acc


def test_parent_token_input_needs_next_token_input():
    with pytest.raises(ValueError, match="--parent-token-input needs --next-token-input"):
        TrainConfig(data="x", output="y", parent_token_input=True)


def test_train_help_shows_the_defaults_that_matter(capsys):
    import re

    from medusa.interfaces.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    entries = {" ".join(b.split()).split()[0]: " ".join(b.split()) for b in re.split(r"\n(?=  -)", out)}
    for flag, default in [("--epochs", "1.0"), ("--lr", "0.001"), ("--base-lr", "5e-05"), ("--batch-size", "8"),
                          ("--max-length", "1024"), ("--num-heads", "4"), ("--val-examples", "64")]:
        assert entries[flag].endswith(f"(default: {default})"), entries[flag]
    assert "a tenth" in entries["--val-examples"] and "none under 10" in entries["--val-examples"]
    assert "(default: None)" not in out


def test_step_logs_say_their_accuracies_are_on_training_batches(distilled, tmp_path):
    logs = []
    cfg = TrainConfig(data=str(distilled), output=str(tmp_path / "h"), num_heads=2, batch_size=4, epochs=1,
                      limit=20, val_examples=2, log_every=1)
    train(cfg, base=tiny_model("llama"), tokenizer=tiny_tokenizer(), log=logs.append)
    steps = [m for m in logs if '"top1"' in m and '"saved"' not in m]
    assert steps and all(m.endswith("(top1/top5: per-head accuracy on this step's training batch)") for m in steps)


def test_train_ends_by_calibrating_a_tree_for_this_machine(distilled, tmp_path, capsys):
    """`medusa train` fits the tree to the new heads on its held-out conversations, and decoding then uses it
    (not the untuned presets); a finished run is not calibrated again; --no-calibrate and a run with nothing
    held out keep the preset, and say which."""
    from medusa.inference.tree import load_tree
    from medusa.interfaces.cli import main

    tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    args = ["train", "--data", str(distilled), "--model", str(tmp_path / "base"), "--num-heads", "3",
            "--batch-size", "8", "--val-examples", "4"]
    assert main(args + ["--output", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "Calibrating the tree for cpu on the 4 held-out conversations" in out
    saved = json.loads((tmp_path / "h" / "tree.json").read_text())["devices"]["cpu"]
    assert f"Saved the tree for cpu in {tmp_path / 'h' / 'tree.json'}" in out
    logs = []
    m = MedusaModel.from_pretrained(tmp_path / "h", log=logs.append)
    assert m.tree == load_tree(saved["paths"], 3, "cpu") and not any("preset" in x for x in logs)
    assert main(args + ["--output", str(tmp_path / "h")]) == 0          # finished: nothing to do
    assert "already holds a tree for cpu" in capsys.readouterr().out
    assert main(args + ["--output", str(tmp_path / "n"), "--no-calibrate"]) == 0
    assert "Calibrating" not in capsys.readouterr().out and not (tmp_path / "n" / "tree.json").exists()
    assert main(args + ["--output", str(tmp_path / "few"), "--limit", "9"]) == 0
    out = capsys.readouterr().out
    assert "no conversation was held out" in out and "uses the cpu_8 preset" in out


def test_evaluate_command_on_trained_heads(distilled, tmp_path, capsys):
    """`medusa evaluate` on a heads folder: per-head accuracy on held-out conversations and tokens per step on
    prompts (overall and per category), the same figures as the functions behind it; a bad draft length is
    refused before loading."""
    from medusa.interfaces.cli import main
    from medusa.evaluation.tokens_per_step import tokens_per_step
    from medusa.training.accuracy import head_accuracy
    from medusa.training.prompts import read_prompts

    _train(distilled, tmp_path / "h")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(k), "category": "xy"[k % 2], "prompt": f"say {k} and {k + 7}"}) + "\n"
                               for k in range(4)))
    args = ["evaluate", "--model", str(tmp_path / "h"), "--base-model", str(tmp_path / "base"), "--data",
            str(distilled), "--limit", "4", "--prompts", str(prompts), "--max-new-tokens", "16"]
    capsys.readouterr()
    assert main(args + ["--lookup", "4", "--lookup-short", "4", "--records", str(tmp_path / "rec.jsonl")]) == 0
    runs = [json.loads(x)["run"] for x in (tmp_path / "rec.jsonl").read_text().splitlines()]
    assert runs == ["greedy"] * 4 + ["greedy_with_context_drafts"] * 4
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{\n"):])
    m = MedusaModel.from_pretrained(tmp_path / "h", base_model=str(tmp_path / "base"))
    examples = [tokenize_conversation(m.tokenizer, c, 1024) for c in read_conversations(distilled)[:4]]
    assert report["head_accuracy"] == head_accuracy(m.base_model, m.heads, examples)
    recs = read_prompts(str(prompts))
    want = tokens_per_step(m, recs, max_new_tokens=16, lookup=0)
    assert {k: report["greedy"][k] for k in ("new_tokens", "steps")} == {k: want[k] for k in ("new_tokens", "steps")}
    for cat in "xy":
        alone = tokens_per_step(m, [r for r in recs if r.category == cat], max_new_tokens=16, lookup=0)
        assert report["greedy"]["by_category"][cat] == alone["tokens_per_step"]
    drafts = report["greedy_with_context_drafts"]
    assert drafts["lookup"] == drafts["lookup_short"] == 4 and drafts["tokens_per_step"] >= 1.0
    assert main(args + ["--lookup", "3", "--lookup-short", "5"]) == 2
    err = capsys.readouterr().err
    assert "short draft length" in err and "Ready" not in err


def test_tokens_per_step_records_resume_a_stopped_evaluation(tmp_path):
    """With `records`, each prompt's figures are written as it is done; a re-run decodes only the prompts the
    file lacks (a torn last line is redone) and reports what an uninterrupted run does; a file of the same run
    from other settings (here the token limit, or the tree decoding uses) is refused; the same tree given as
    paths is the same setting."""
    from medusa.evaluation.tokens_per_step import tokens_per_step
    from medusa.training.prompts import PromptRecord

    m = MedusaModel(tiny_model("llama"), random_heads(), tiny_tokenizer(), tree="cpu_small")
    recs = [PromptRecord(id=str(k), turns=(f"say {k} and {k + 7}",), category="xy"[k % 2]) for k in range(5)]
    want = tokens_per_step(m, recs, max_new_tokens=12)
    records = tmp_path / "records.jsonl"
    full = tokens_per_step(m, recs, max_new_tokens=12, records=records)
    lines = records.read_text().splitlines()
    assert len(lines) == 5 and [json.loads(x)["id"] for x in lines] == [r.id for r in recs]
    same = ("new_tokens", "steps", "tokens_per_step", "by_category")
    assert {k: full[k] for k in same} == {k: want[k] for k in same}

    records.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])      # stopped while writing the third
    decoded = []
    stream = m.stream
    m.stream = lambda ids, **kw: decoded.append(ids) or stream(ids, **kw)
    again = tokens_per_step(m, recs, max_new_tokens=12, records=records)
    assert len(decoded) == 3 and {k: again[k] for k in same} == {k: want[k] for k in same}
    assert [json.loads(x)["id"] for x in records.read_text().splitlines()] == [r.id for r in recs]
    decoded.clear()
    tokens_per_step(m, recs, max_new_tokens=12, records=records)
    assert decoded == []
    with pytest.raises(ValueError, match="records.jsonl:1: recorded with other settings \\(max_new_tokens\\)"):
        tokens_per_step(m, recs, max_new_tokens=8, records=records)
    with pytest.raises(ValueError, match="records.jsonl:1: recorded with other settings \\(tree\\)"):
        tokens_per_step(m, recs, max_new_tokens=12, records=records, tree="dynamic:4")   # not the model's tree
    same_tree = MedusaModel(m.base_model, m.heads, m.tokenizer, tree=[list(p) for p in m.tree])
    resumed = tokens_per_step(same_tree, recs, max_new_tokens=12, records=records)    # the same tree, as paths
    assert len(records.read_text().splitlines()) == 5 and {k: resumed[k] for k in same} == {k: want[k] for k in same}
    other_run = tokens_per_step(m, recs[:1], max_new_tokens=8, records=records, run="other")
    assert other_run["prompts"] == 1 and len(records.read_text().splitlines()) == 6


def test_killed_training_resumes_to_the_same_end(distilled, tmp_path):
    straight = _train(distilled, tmp_path / "a")
    part = _train(distilled, tmp_path / "b", stop_after=3)
    assert not part["finished"] and part["step"] == 3
    clock = tmp_path / "b" / "checkpoints" / "step-3" / "elapsed.json"
    clock.write_text(json.dumps({"seconds": 1000.0}))               # as if the killed run had taken 1000 s
    resumed = _train(distilled, tmp_path / "b")
    assert resumed["finished"] and resumed["step"] == straight["step"]
    assert resumed["seconds"] >= 1000                               # the total, not this run's share
    from safetensors.torch import load_file
    saved = load_file(str(next((tmp_path / "b" / "checkpoints").glob("step-*/model.safetensors"))))
    assert saved and all(k.startswith("heads.") for k in saved)    # the frozen base is not copied into them
    a, b = load_file(str(tmp_path / "a" / "heads.safetensors")), load_file(str(tmp_path / "b" / "heads.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert [r["loss"] for r in _log(tmp_path / "a")] == pytest.approx([r["loss"] for r in _log(tmp_path / "b")],
                                                                      abs=1e-4)
    heads_file = tmp_path / "b" / "heads.safetensors"
    before = heads_file.stat().st_mtime_ns
    again = _train(distilled, tmp_path / "b")                      # a finished run: nothing redone
    assert again == json.loads((tmp_path / "b" / "medusa_config.json").read_text())["extra"]["result"]
    assert again["step"] == straight["step"] and heads_file.stat().st_mtime_ns == before
    _train(distilled, tmp_path / "c", stop_after=2)
    with pytest.raises(ValueError, match="different run .*batch_size"):   # not a resume of that run
        _train(distilled, tmp_path / "c", batch_size=2)


def test_a_resumed_run_logs_each_step_once(distilled, tmp_path):
    _train(distilled, tmp_path / "h", stop_after=7)
    shutil.rmtree(tmp_path / "h" / "checkpoints" / "step-7")          # killed after logging step 7, before saving it
    resumed = _train(distilled, tmp_path / "h")                        # from step 5: steps 6 and 7 again
    assert [r["step"] for r in _log(tmp_path / "h")] == list(range(1, resumed["total"] + 1))


def test_a_kill_while_saving_a_checkpoint_resumes_from_the_last_complete_one(distilled, tmp_path, monkeypatch):
    """Killed while step 10's checkpoint is written (its weights half on disk): the re-run resumes from step 5,
    and the log holds each step once."""
    from accelerate import Accelerator

    save = Accelerator.save_state

    def dies_while_saving_step_10(self, output_dir=None, **kw):
        where = save(self, output_dir, **kw)
        if "step-10" in str(output_dir):
            weights = Path(output_dir) / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
            raise KeyboardInterrupt
        return where

    monkeypatch.setattr(Accelerator, "save_state", dies_while_saving_step_10)
    with pytest.raises(KeyboardInterrupt):
        _train(distilled, tmp_path / "h")
    monkeypatch.undo()
    assert [r["step"] for r in _log(tmp_path / "h")] == list(range(1, 11))
    said = []
    resumed = _train(distilled, tmp_path / "h", log=said.append)
    total = resumed["total"]
    assert resumed["finished"] and any(m.startswith("resumed from") and m.endswith(f"step-5 (step 5 of {total})")
                                       for m in said)
    assert [r["step"] for r in _log(tmp_path / "h")] == list(range(1, total + 1))


def test_an_incomplete_checkpoint_folder_is_skipped_with_a_warning(distilled, tmp_path):
    _train(distilled, tmp_path / "h", stop_after=7)                    # checkpoints at steps 5 and 7
    ckpts = tmp_path / "h" / "checkpoints"
    shutil.copytree(ckpts / "step-7", ckpts / "step-10")               # written in place, killed midway
    (ckpts / "step-10" / "elapsed.json").unlink()
    weights = ckpts / "step-10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    said = []
    resumed = _train(distilled, tmp_path / "h", log=said.append)
    assert resumed["finished"] and resumed["step"] == 22
    assert any("step-10" in m and "incomplete" in m for m in said)
    assert any(m.startswith("resumed from") and "step-7" in m for m in said)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-20", "step-22"]       # nothing else left behind


def _torchrun(base, data, out, *extra):
    """`medusa train` as 2 CPU processes under torchrun (gloo), one thread each."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "medusa", "train", "--model", str(base), "--data", str(data), "--output", str(out), "--num-heads", "3",
           "--batch-size", "4", "--epochs", "2", "--lr", "1e-2", "--val-examples", "8", "--limit", "44",
           "--log-every", "1", "--checkpoint-every", "5", "--threads", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_cpu_processes_under_torchrun_train_one_run(distilled, tmp_path):
    """Multi-process training through accelerate: 2 processes under torchrun join one run (on a machine
    without GPUs accelerate joins them only when told to use the CPU; else each trained alone, racing on
    one folder, each step logged twice), batches of 4 each take the steps and learning rates of one process
    with batches of 8, and a run stopped and resumed under torchrun ends where the straight one does."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    single = _train(distilled, tmp_path / "one", batch_size=8, limit=44)
    _torchrun(tmp_path / "base", distilled, tmp_path / "two")
    log = _log(tmp_path / "two")
    assert [r["step"] for r in log] == list(range(1, single["total"] + 1))       # one run, each step once
    assert [r["lr"] for r in log] == pytest.approx([r["lr"] for r in _log(tmp_path / "one")])
    _torchrun(tmp_path / "base", distilled, tmp_path / "resumed", "--stop-after", "7")
    assert len(_log(tmp_path / "resumed")) == 7
    _torchrun(tmp_path / "base", distilled, tmp_path / "resumed")
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "two" / "heads.safetensors")), load_file(str(tmp_path / "resumed" / "heads.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    m = MedusaModel.from_pretrained(tmp_path / "two", base_model=str(tmp_path / "base"))
    assert m.heads.config.num_heads == 3


def test_medusa2_keeps_base_greedy_while_heads_improve(distilled, tmp_path):
    res = _train(distilled, tmp_path / "m2", mode="medusa2", epochs=3, base_lr=3e-5, heads_warmup_steps=2,
                 heads_weight=0.2)
    log = _log(tmp_path / "m2")
    assert max(r["base_kl"] for r in log) < 0.01
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])
    assert (tmp_path / "m2" / "adapter" / "adapter_config.json").is_file()
    tok, base = tiny_tokenizer(), tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    m = MedusaModel.from_pretrained(tmp_path / "m2", base_model=str(tmp_path / "base"))
    assert any(not torch.equal(a, b) for a, b in zip(m.base_model.parameters(), base.parameters()))  # LoRA merged
    batch = collate([tokenize_conversation(tok, c, 512) for c in read_conversations(distilled)])
    with torch.no_grad():
        before = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        after = m.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    sel = batch["loss_mask"]
    assert (before[sel] == after[sel]).float().mean() > 0.98   # the base's greedy choice, token by token
    assert res["val_accuracy"]["top1"][0] > 0


def test_distill_through_an_openai_compatible_endpoint(tmp_path):
    """The API back end against a live `medusa serve` app: same answers as local greedy generation."""
    from serving import serve, tiny_medusa

    m = tiny_medusa()
    _prompts(tmp_path / "p.jsonl", 6)
    api = DistillConfig(inputs=[str(tmp_path / "p.jsonl")], output=str(tmp_path / "api.jsonl"), max_new_tokens=10,
                        batch_size=4, concurrency=3, api_model="tiny")
    with serve(m) as server:
        api.api_base = server.url + "/v1"
        result = run_distill(api, log=lambda s: None)
    assert result["answered"] == 6
    local = DistillConfig(inputs=api.inputs, output=str(tmp_path / "local.jsonl"), max_new_tokens=10, batch_size=4)
    run_distill(local, LocalGenerator(m.base_model, m.tokenizer, local), log=lambda s: None)
    rows = lambda p: {r["id"]: r["conversations"] for r in map(json.loads, open(p))}
    assert rows(api.output) == rows(local.output)


def test_feature_cache_grows_with_the_data(distilled, tmp_path):
    from medusa.training.features import FeatureDataset, build_feature_cache

    model, tok = tiny_model("llama"), tiny_tokenizer()
    examples = [tokenize_conversation(tok, c, 256) for c in read_conversations(distilled)]
    logs = []
    build_feature_cache(model, examples[:20], tmp_path, log=logs.append)
    first = FeatureDataset(tmp_path, examples[:20])
    build_feature_cache(model, examples, tmp_path, log=logs.append)
    assert logs[-1].startswith(f"features: {len(examples) - 20}/{len(examples) - 20} new examples (20 cached")
    grown = FeatureDataset(tmp_path, examples)
    with torch.no_grad():
        direct = model(examples[25].input_ids[None], output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(grown[25]["hidden"].float(), direct, atol=0.05, rtol=0.02)   # stored in bf16
    for k in range(20):
        assert torch.equal(first[k]["hidden"], grown[k]["hidden"])
    twice = FeatureDataset(tmp_path, examples[:3] + examples[:1])     # a repeated conversation
    assert torch.equal(twice[3]["hidden"], twice[0]["hidden"])


def test_last_hidden_skips_the_output_projection_only(arch):
    from medusa.training.features import last_hidden

    model = tiny_model(arch)
    ids = torch.randint(3, VOCAB, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0                                                   # a left-padded row
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        hidden, logits = last_hidden(model, ids, attn)
        hidden2, logits2 = last_hidden(model, ids, attn, logits=True)
    assert logits is None
    assert torch.equal(hidden, full.hidden_states[-1]) and torch.equal(hidden2, full.hidden_states[-1])
    assert torch.equal(logits2, full.logits)
