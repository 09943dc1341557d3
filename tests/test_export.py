"""Export to serving engines' formats, and upload to the Hub.

Every exported file is checked against the schema its loader reads (see medusa/integrations/export.py): exact
key sets, shapes, config fields. The original format loads back into MedusaModel with identical head logits and
identical decoding; vLLM's is read back by key name and its logits rebuilt by hand. Push is refused, before
any request, without a token or with a folder that does not load; no test touches the network.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# Formats are compared to within 1e-5: one product computed in another shape (all heads at once, one
# head alone) rounds differently on some CPUs (MKL on AMD Zen 4: ~3e-6); a wrong mapping is off by O(1).
from conftest import HIDDEN, VOCAB, tiny_model
from medusa import MedusaModel
from medusa.inference.checkpoint import load_heads_checkpoint, save_heads
from medusa.inference.heads import HeadsConfig, MedusaHeads
from medusa.integrations import export as export_mod
from medusa.integrations.export import export, write_format
from medusa.integrations.hub import CARD_MARK, HubError, model_card, push

PATHS = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_heads(num_heads=3, num_layers=1, shared=True, seed=1, base=None) -> MedusaHeads:
    """Random heads whose every layer has its own weights, so a head or layer mix-up changes the logits."""
    torch.manual_seed(seed)
    heads = MedusaHeads(HeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=num_heads, num_layers=num_layers,
                                    shared_lm_head=shared, base_model_name_or_path=base))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2)
    return heads.eval()


def _hidden(seed=0):
    return torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _prompt(seed=0, n=10):
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """tiny_model("llama") written the way transformers writes it; tiny_model("llama") rebuilds the same weights."""
    folder = tmp_path_factory.mktemp("base")
    tiny_model("llama").save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the original Medusa format (TGI, TensorRT-LLM)


@pytest.mark.parametrize("shared, num_layers", [(True, 1), (False, 1), (True, 2), (False, 2)])
def test_original_export_matches_the_schema(tmp_path, shared, num_layers):
    base = tiny_model("llama")
    m = MedusaModel(base, make_heads(3, num_layers, shared), tree=PATHS)
    out = export(m, tmp_path / "out", "original", base_name="org/tiny-llama")
    assert {p.name for p in out.iterdir()} == {"config.json", "medusa_lm_head.safetensors", "tree.json"}
    config = json.loads((out / "config.json").read_text())
    assert config == {"medusa_num_heads": 3, "medusa_num_layers": num_layers,
                      "base_model_name_or_path": "org/tiny-llama", "hidden_size": HIDDEN, "vocab_size": VOCAB}
    assert "architectures" not in config             # with it, TGI serves without the heads
    w = load_file(str(out / "medusa_lm_head.safetensors"))
    blocks = {f"{h}.{layer}.linear.{kind}" for h in range(3) for layer in range(num_layers)
              for kind in ("weight", "bias")}
    assert set(w) == blocks | {f"{h}.{num_layers}.weight" for h in range(3)}
    for h, head in enumerate(m.heads.heads):
        for layer, block in enumerate(head.blocks):
            assert w[f"{h}.{layer}.linear.weight"].shape == (HIDDEN, HIDDEN)
            assert torch.equal(w[f"{h}.{layer}.linear.weight"], block.linear.weight)
            assert torch.equal(w[f"{h}.{layer}.linear.bias"], block.linear.bias)
        proj = w[f"{h}.{num_layers}.weight"]
        assert proj.shape == (VOCAB, HIDDEN) and proj.dtype == torch.float32
        assert torch.equal(proj, base.lm_head.weight if shared else head.proj.weight)   # shared: expanded per head
    assert json.loads((out / "tree.json").read_text()) == {"devices": {"cpu": {"paths": [list(p) for p in PATHS]}}}


@pytest.mark.parametrize("shared", [True, False])
def test_original_export_loads_back_with_identical_predictions(tmp_path, saved_base, shared):
    reference = tiny_model("llama")
    m = MedusaModel(reference, make_heads(3, 2, shared, seed=5), tree=PATHS)
    with pytest.warns(UserWarning, match="local path"):
        out = export(m, tmp_path / "out", "original", base_name=str(saved_base))
    loaded = MedusaModel.from_pretrained(out)                     # the base comes from the exported config
    assert loaded.heads.config.shared_lm_head is False and loaded.tree == PATHS
    hidden = _hidden(1)
    with torch.no_grad():
        want = m.heads(hidden, reference.lm_head)
        torch.testing.assert_close(loaded.heads(hidden, loaded.base_model.lm_head), want, rtol=1e-5, atol=1e-5)
    for seed in range(2):
        ids = _prompt(seed)
        steps = [(s.tokens.tolist(), s.nodes) for s in loaded.stream(ids, max_new_tokens=24)]
        assert steps == [(s.tokens.tolist(), s.nodes) for s in m.stream(ids, max_new_tokens=24)]
        assert torch.equal(loaded.generate(ids, max_new_tokens=24), m.generate(ids, max_new_tokens=24))


def test_export_from_folders_loads_the_base_only_to_expand_a_shared_projection(tmp_path, saved_base):
    reference = tiny_model("llama")
    heads = make_heads(2, 1, shared=True, seed=7, base=str(saved_base))
    save_heads(tmp_path / "ours", heads, {"cpu": PATHS[:4], "cuda": PATHS})
    with pytest.warns(UserWarning, match="local path"):
        original = export(tmp_path / "ours", tmp_path / "original", "original")     # loads the base for lm_head
    vllm = export(original, tmp_path / "vllm", "vllm", base_name="org/tiny-llama")   # own projections: no base
    config, state, tree = load_heads_checkpoint(original)
    assert (config.shared_lm_head, tree) == (False, {"cpu": PATHS[:4], "cuda": PATHS})    # every device's tree kept
    hidden = _hidden(2)
    with torch.no_grad():
        want = heads(hidden, reference.lm_head)
    torch.testing.assert_close(_vllm_logits(load_file(str(vllm / "model.safetensors")), hidden, 2, 1), want,
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- vLLM


def _vllm_logits(w: dict, hidden: torch.Tensor, num_heads: int, num_layers: int) -> torch.Tensor:
    """vLLM's Medusa forward, written from its key names: x + silu(blocks.i.layers.j(x)), then lm_heads.i."""
    out = []
    for i in range(num_heads):
        x = hidden
        for j in range(num_layers):
            x = x + F.silu(F.linear(x, w[f"blocks.{i}.layers.{j}.weight"], w[f"blocks.{i}.layers.{j}.bias"]))
        out.append(F.linear(x, w[f"lm_heads.{i}.weight"]))
    return torch.stack(out)


@pytest.mark.parametrize("shared, num_layers", [(True, 1), (False, 2)])
def test_vllm_export_matches_the_schema_and_the_logits(tmp_path, shared, num_layers):
    base = tiny_model("qwen2")
    m = MedusaModel(base, make_heads(4, num_layers, shared, seed=3))
    out = export(m, tmp_path / "out", "vllm", base_name="org/tiny-qwen")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    config = json.loads((out / "config.json").read_text())
    assert config == {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": HIDDEN,
                      "vocab_size": VOCAB, "truncated_vocab_size": VOCAB, "num_heads": 4,
                      "num_hidden_layers": num_layers, "medusa_fc_bias": True, "original_lm_head": False,
                      "base_model_name_or_path": "org/tiny-qwen"}
    # MedusaConfig.from_pretrained renames every key holding "num" and "heads"/"layers": only these two may
    assert [k for k in config if "num" in k] == ["num_heads", "num_hidden_layers"]
    w = load_file(str(out / "model.safetensors"))
    assert set(w) == ({f"blocks.{i}.layers.{j}.{kind}" for i in range(4) for j in range(num_layers)
                       for kind in ("weight", "bias")} | {f"lm_heads.{i}.weight" for i in range(4)})
    assert all(w[f"lm_heads.{i}.weight"].shape == (VOCAB, HIDDEN) for i in range(4))
    assert all(w[f"blocks.{i}.layers.0.bias"].shape == (HIDDEN,) for i in range(4))
    hidden = _hidden(4)
    with torch.no_grad():
        want = m.heads(hidden, base.lm_head)
    torch.testing.assert_close(_vllm_logits(w, hidden, 4, num_layers), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- base names, dtypes, refusals


def test_embedded_default_is_written_as_its_hub_id(tmp_path):
    save_heads(tmp_path / "heads", make_heads(2, 1, shared=False, base="embedded:SmolLM2-135M-Instruct"))
    for fmt in ("original", "vllm"):
        out = export(tmp_path / "heads", tmp_path / fmt, fmt)
        assert json.loads((out / "config.json").read_text())["base_model_name_or_path"] == SMOL
    ours = export(tmp_path / "heads", tmp_path / "ours", "ours")       # our loader reads the embedded GGUF itself
    assert load_heads_checkpoint(ours)[0].base_model_name_or_path == "embedded:SmolLM2-135M-Instruct"


def test_dtype_option_converts_every_tensor(tmp_path):
    m = MedusaModel(tiny_model("llama"), make_heads(2, 1, shared=True))
    out = export(m, tmp_path / "out", "vllm", dtype="bfloat16")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert next(m.heads.parameters()).dtype == torch.float32         # the model itself is left alone


def test_refusals(tmp_path, monkeypatch):
    m = MedusaModel(tiny_model("llama"), make_heads(2, 1, shared=True))
    with pytest.raises(ValueError, match="name no base model"):
        export(m, tmp_path / "a", "original")
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export(m, tmp_path / "a", "onnx", base_name="org/x")
    with pytest.raises(ValueError, match="share the base model's lm_head"):
        write_format(m.heads, tmp_path / "b", "vllm", base_name="org/x")
    conditioned = MedusaHeads(HeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=2, next_token_input=True))
    for fmt in ("original", "vllm"):
        with pytest.raises(ValueError, match="next token's embedding"):
            write_format(conditioned, tmp_path / "n", fmt, base_name="org/x", lm_head_weight=torch.zeros(VOCAB, HIDDEN))
    write_format(conditioned, tmp_path / "n", "ours", base_name="org/x")
    assert load_heads_checkpoint(tmp_path / "n")[0].next_token_input
    stale = tmp_path / "stale"
    save_heads(stale, make_heads(2, 1, shared=False))               # our format: would win over config.json
    with pytest.raises(ValueError, match="not empty"):
        export(m, stale, "original", base_name="org/x")
    export(m, stale, "original", base_name="org/x", overwrite=True)
    assert not (stale / "medusa_config.json").exists() and load_heads_checkpoint(stale)[0].shared_lm_head is False
    with pytest.raises(ValueError, match="heads folder itself"):
        export(stale, stale, "vllm", overwrite=True)
    monkeypatch.setattr(export_mod, "DEFAULT_HEADS_DIR", tmp_path / "no_default_heads")
    with pytest.raises(FileNotFoundError, match="no trained heads ship"):
        export(None, tmp_path / "c", "vllm")


def test_cli_export(tmp_path, saved_base):
    heads_dir = tmp_path / "heads"
    save_heads(heads_dir, make_heads(2, 1, shared=True, base=str(saved_base)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "medusa", "export", "--model", str(heads_dir), *args],
                                       capture_output=True, text=True, env=env, timeout=300)
    r = run("--format", "vllm", "--output", str(tmp_path / "vllm"), "--base-name", "org/tiny-llama")
    assert r.returncode == 0, r.stderr
    assert "vllm format written to" in r.stdout and "model.safetensors" in r.stdout
    assert json.loads((tmp_path / "vllm" / "config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    r = run("--output", str(tmp_path / "vllm"))                         # --format original by default
    assert r.returncode == 2 and "not empty" in r.stderr
    r = run("--output", str(tmp_path / "vllm"), "--force")
    assert r.returncode == 0, r.stderr
    m = MedusaModel.from_pretrained(tmp_path / "vllm")              # original format now; base = saved_base
    ids = _prompt(3)
    ref = tiny_model("llama").generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(ids, max_new_tokens=16), ref)


# ---------------------------------------------------------------- push


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """No token anywhere (HF_TOKEN empty, an empty HF home), and any Hub call fails the test."""
    import huggingface_hub
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))          # read at import time
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    calls = []

    def forbidden(self, *args, **kwargs):
        calls.append(kwargs)
        raise AssertionError("a Hub request was attempted")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", forbidden)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", forbidden)
    return calls


def test_push_without_a_token_fails_before_any_request(tmp_path, no_hub):
    save_heads(tmp_path / "heads", make_heads(2, 1, shared=False, base="org/not-cached-anywhere"))
    with pytest.raises(HubError, match="no Hugging Face token: pass --token"):
        push(tmp_path / "heads", "me/heads", log=lambda m: None)
    assert no_hub == [] and not (tmp_path / "heads" / "README.md").exists()


def test_push_refuses_a_folder_that_does_not_load(tmp_path, saved_base, no_hub):
    quiet = dict(token="hf_not_used", log=lambda m: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Medusa heads folder"):
        push(tmp_path / "empty", "me/heads", **quiet)
    bad = tmp_path / "bad"
    save_heads(bad, make_heads(2, 1, shared=False))
    cfg = json.loads((bad / "medusa_config.json").read_text())
    (bad / "medusa_config.json").write_text(json.dumps({**cfg, "num_heads": 3}))
    with pytest.raises(ValueError, match="do not match their config"):
        push(bad, "me/heads", **quiet)
    small = tmp_path / "small"                                       # heads for a base of another size
    save_heads(small, MedusaHeads(HeadsConfig(hidden_size=32, vocab_size=VOCAB, num_heads=2,
                                              base_model_name_or_path=str(saved_base))))
    with pytest.raises(ValueError, match="hidden size 32 but the base model's is 64"):
        push(small, "me/heads", **quiet)
    assert no_hub == []


def test_push_uploads_the_folder_with_a_model_card(tmp_path, monkeypatch, no_hub):
    import huggingface_hub

    folder = tmp_path / "heads"
    heads = make_heads(2, 1, shared=False, base="org/not-cached-anywhere")
    heads.config.extra = {"trained_on": "sharegpt", "steps": 1200}
    from medusa.inference.tree import DynamicTree
    save_heads(folder, heads, {"cpu": PATHS[:5], "cuda": PATHS[:2], "mps": DynamicTree(6)})   # 2 heads: 2 levels
    seen = {}

    def create_repo(self, repo_id, **kw):
        seen["create"] = (repo_id, kw.get("private"), self.token)

    def upload_folder(self, **kw):
        seen["upload"] = kw
        return type("CommitInfo", (), {"commit_url": f"https://hub.test/{kw['repo_id']}/commit/1"})()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    logs = []
    url = push(folder, "me/heads", token="hf_test", private=True, log=logs.append)
    assert url == "https://hub.test/me/heads/commit/1"
    assert seen["create"] == ("me/heads", True, "hf_test")
    assert seen["upload"]["repo_id"] == "me/heads" and Path(seen["upload"]["folder_path"]) == folder
    assert any("not available offline: heads checked on their own" in m for m in logs)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: medusa\nbase_model: org/not-cached-anywhere\ntags:\n- medusa\n"
                           "- speculative-decoding\n---\n")
    assert "- trained_on: sharegpt" in card and "- steps: 1200" in card
    assert "| candidate tree | 6 nodes for cpu, 3 nodes for cuda, 6 nodes (dynamic) for mps (`tree.json`) |" in card
    (folder / "README.md").write_text("# my own card\n")                   # a card without our mark is kept
    push(folder, "me/heads", token="hf_test", log=logs.append)
    assert (folder / "README.md").read_text() == "# my own card\n"


def test_model_card_for_the_embedded_default_names_the_gguf_weights():
    config = HeadsConfig(hidden_size=576, vocab_size=49152, base_model_name_or_path="embedded:SmolLM2-135M-Instruct")
    card = model_card(config, None, "me/heads")
    assert f"base_model: {SMOL}\n" in card and CARD_MARK in card and "Q4_1 GGUF" in card


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("token, message", [("", "no Hugging Face token"),
                                            ("hf_fake", "cannot reach the Hugging Face Hub at http://127.0.0.1")])
def test_hf_utils_command_fails_cleanly(tmp_path, token, message):
    """The original's command. With a token, the Hub endpoint is a closed port on loopback: a network failure."""
    save_heads(tmp_path / "heads", make_heads(2, 1, shared=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    cmd = [sys.executable, "-m", "medusa.hf_utils", "--folder", str(tmp_path / "heads"), "--repo", "me/heads"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
