"""The `medusa` command refusing what it cannot use: one line on stderr naming the culprit, exit code 2, no
traceback; what can be checked without the model is checked before it loads."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_heads, tiny_model, tiny_tokenizer
from medusa.inference.checkpoint import save_heads
from medusa.interfaces.cli import main

OFFLINE_BASE = "org/not-cached-anywhere"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny base (with its tokenizer) and heads naming it."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    heads = random_heads()
    heads.config.base_model_name_or_path = str(root / "base")
    save_heads(root / "heads", heads)
    return root


def refusal(capsys, *args: str) -> tuple[str, str]:
    """Run `medusa generate ARGS`, which must exit with 2 and end with one error line; -> (that line, stderr)."""
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "3", *args]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("medusa generate: error: ") and "Traceback" not in err, err
    return last, err


@pytest.fixture(params=["HF_HUB_OFFLINE", "unreachable"])
def offline(request, monkeypatch):
    """No Hub: offline mode, or a Hub that refuses connections (as with no network), where huggingface_hub would
    retry a file missing from the cache for most of a minute: any such retry fails the test."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    if request.param == "HF_HUB_OFFLINE":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)     # read at import time; transformers asks it
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")      # the discard port: refused

    def no_retry(seconds):
        raise AssertionError(f"huggingface_hub retried (sleeping {seconds} s) instead of failing at once")
    monkeypatch.setattr(_http.time, "sleep", no_retry)


@pytest.mark.parametrize("fmt", ["ours", "original"])
def test_heads_naming_a_hub_base_offline_ask_for_base_model(folders, tmp_path, capsys, offline, fmt):
    from medusa.integrations.export import export

    heads = tmp_path / "heads"
    if fmt == "ours":
        shutil.copytree(folders / "heads", heads)
        config = json.loads((heads / "medusa_config.json").read_text())
        (heads / "medusa_config.json").write_text(json.dumps({**config, "base_model_name_or_path": OFFLINE_BASE}))
    else:   # what `medusa export` writes for vLLM and the original Medusa
        export(folders / "heads", heads, "original", base_model=str(folders / "base"), base_name=OFFLINE_BASE)
    line, _ = refusal(capsys, "--model", str(heads))
    assert f"cannot load the base model {OFFLINE_BASE}: it is not in the local Hugging Face cache" in line
    assert "pass --base-model" in line
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')           # a command that loads by itself
    assert main(["evaluate", "--model", str(heads), "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("pass --base-model (base_model=), a local "
                                                                     "folder or Hub id")
    line, _ = refusal(capsys, "--model", OFFLINE_BASE)                 # a base itself: no heads to blame
    assert f"cannot load the base model {OFFLINE_BASE}" in line and "--base-model" not in line


def test_a_cached_hub_base_loads_without_the_hub(folders, tmp_path, monkeypatch, capsys, offline):
    """Offline, a base in the local Hugging Face cache is read from it, at once."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / f"models--{OFFLINE_BASE.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(folders / "base", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    heads = tmp_path / "heads"
    shutil.copytree(folders / "heads", heads)
    config = json.loads((heads / "medusa_config.json").read_text())
    (heads / "medusa_config.json").write_text(json.dumps({**config, "base_model_name_or_path": OFFLINE_BASE}))
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "3", "--model", str(heads), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 3


def test_a_config_field_of_the_wrong_type_is_named_with_its_file(folders, tmp_path, capsys):
    heads = tmp_path / "heads"
    shutil.copytree(folders / "heads", heads)
    config = json.loads((heads / "medusa_config.json").read_text())
    (heads / "medusa_config.json").write_text(json.dumps({**config, "hidden_size": "576"}))
    line, _ = refusal(capsys, "--model", str(heads))
    assert f"{heads / 'medusa_config.json'}: hidden_size must be an integer, not '576'" in line
    base = tmp_path / "base"                                          # the base model's own config.json
    shutil.copytree(folders / "base", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_size": "576"}))
    line, _ = refusal(capsys, "--model", str(folders / "heads"), "--base-model", str(base))
    assert f"cannot load the base model {base}: its config.json is invalid" in line
    assert "'hidden_size' expected int, got str (value: '576')" in line


def test_a_weights_file_instead_of_its_folder_is_refused(folders, capsys):
    line, err = refusal(capsys, "--model", str(folders / "heads" / "heads.safetensors"))
    assert "heads.safetensors is a file" in line and f"a folder (here {folders / 'heads'})" in line
    assert "Loading base model" in err          # found out while loading (what the test below must not see)


def test_pickled_base_weights_refused_by_weights_only_say_so(folders, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(folders / "base", base)
    state = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save({**state, "args": argparse.Namespace(lr=1e-3)}, base / "pytorch_model.bin")   # as old trainers did
    line, _ = refusal(capsys, "--model", str(folders / "heads"), "--base-model", str(base))
    assert "pytorch_model.bin" in line and "weights_only=True" in line and "argparse.Namespace" in line


@pytest.mark.parametrize("args, says", [
    (["--max-new-tokens", "-5"], "max_new_tokens must be >= 1, got -5"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--device", "cuda"], "device 'cuda': torch"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--tree", "{dir}/not_json.json"], "tree file {dir}/not_json.json is not valid JSON"),
    (["--tree", "{dir}/letters.json"], "tree path ['a'] is not a list of whole-number ranks"),
    (["--tree", "{dir}/halves.json"], "tree path [0.5] is not a list of whole-number ranks"),
    (["--tree", "{dir}/per_device.json"], "tree path [0, 0.5] is not a list of whole-number ranks"),
], ids=["max-new-tokens", "temperature", "device", "dtype", "tree-not-json", "tree-letters", "tree-halves",
        "tree-per-device"])
def test_arguments_are_checked_before_loading(folders, tmp_path, capsys, monkeypatch, args, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "not_json.json").write_text("[[0], [1")
    (tmp_path / "letters.json").write_text('[["a"]]')
    (tmp_path / "halves.json").write_text("[[0.5]]")
    (tmp_path / "per_device.json").write_text('{"devices": {"cpu": {"paths": [[0], [0, 0.5]]}}}')
    line, err = refusal(capsys, "--model", str(folders / "heads"), *[a.format(dir=tmp_path) for a in args])
    assert says.format(dir=tmp_path) in line and "Loading" not in err


@pytest.mark.parametrize("args, says", [
    (["train", "--epochs", "-1"], "epochs must be > 0, got -1.0"),
    (["train", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["train", "--lr", "0"], "lr must be > 0, got 0.0"),
    (["train", "--data", "{dir}/missing.jsonl"], "training data not found: {dir}/missing.jsonl"),
    (["distill", "--max-new-tokens", "-5"], "max_new_tokens must be >= 1, got -5"),
    (["distill", "--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (["distill", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["bench", "--max-new-tokens", "-5"], "max_new_tokens must be >= 1, got -5"),
    (["bench", "--batch-size", "1,x"], "--batch-size takes comma-separated whole numbers, got '1,x'"),
], ids=["train-epochs", "train-batch", "train-lr", "train-data", "distill-max-new-tokens", "distill-temperature",
        "distill-batch", "bench-max-new-tokens", "bench-batch"])
def test_train_distill_and_bench_check_their_arguments_before_loading(tmp_path, capsys, monkeypatch, args, says):
    from medusa.inference import loading

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(loading, "load_base_model", no_loading)
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": "1", "prompt": "hi", "turns": ["hi"]}) + "\n")
    files = {"train": ["--data", f"{tmp_path}/data.jsonl", "--output", f"{tmp_path}/out"],
             "distill": ["--input", f"{tmp_path}/data.jsonl", "--output", f"{tmp_path}/out.jsonl"],
             "bench": ["--questions", f"{tmp_path}/data.jsonl", "--output", f"{tmp_path}/bench"]}[args[0]]
    assert main([args[0], *files, *[a.format(dir=tmp_path) for a in args[1:]]]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"medusa {args[0]}: error: {says.format(dir=tmp_path)}", err


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_chat_and_serve_check_generation_flags_before_loading(folders, capsys, monkeypatch, command):
    import medusa.interfaces.server

    served = []
    monkeypatch.setattr(medusa.interfaces.server, "serve", lambda *a, **kw: served.append(kw))   # never listen
    assert main([command, "--model", str(folders / "heads"), "--max-new-tokens", "-5"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"medusa {command}: error: max_new_tokens must be >= 1, got -5"]
    assert served == []


def test_quantize_flags_and_their_deprecated_aliases(capsys):
    from medusa.interfaces.cli import build_cli
    from medusa.interfaces.cli_args import LoadOptions, quantize_of

    parser, _ = build_cli()
    quantize = lambda *flags: LoadOptions.from_args(parser.parse_args(["generate", "--prompt", "hi", *flags])).quantize
    assert quantize() is None and quantize("--quantize", "4bit") == "4bit"
    assert quantize("--load-in-8bit") == "8bit" and quantize("--load-in-8bit", "--quantize", "8bit") == "8bit"
    assert "--load-in-8bit is deprecated; use --quantize 8bit" in capsys.readouterr().err
    with pytest.raises(ValueError, match="choose one quantization, not 4bit and 8bit"):
        quantize("--quantize", "4bit", "--load-in-8bit")
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "hi", "--quantize", "16bit"])
    assert quantize_of(parser.parse_args(["train", "--data", "d", "--output", "o", "--load-in-4bit"])) == "4bit"


def test_quantize_without_cuda_is_refused_in_one_line(folders, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line, _ = refusal(capsys, "--model", str(folders / "base"), "--load-in-4bit")
    assert "--quantize 4bit" in line and "CUDA" in line
