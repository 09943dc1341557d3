"""Base-model loading: references, the embedded default's cache, and clear errors."""
from __future__ import annotations

import pytest
import torch

from medusa.inference import loading
from medusa.model import MedusaModel
from medusa.training.trainer import TrainConfig


def test_quantized_loading_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="--quantize 8bit.*CUDA"):
        loading.load_base_model("any/model", quantize="8bit")
    with pytest.raises(RuntimeError, match="--quantize 4bit.*CUDA"):
        MedusaModel.from_pretrained(quantize="4bit")


def test_quantize_takes_one_of_its_names():
    with pytest.raises(ValueError, match="quantize must be one of none, gguf, int4, int8, 8bit, 4bit .*got '16bit'"):
        loading.load_base_model("any/model", quantize="16bit")
    with pytest.raises(ValueError, match="quantize must be"):
        TrainConfig(data="", output="", quantize=True)


def test_missing_local_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.gguf"):
        loading.resolve_base_path(str(tmp_path / "no-such.gguf"))
    with pytest.raises(FileNotFoundError, match="does not exist: ./missing/model"):
        loading.resolve_base_path("./missing/model")
    assert loading.resolve_base_path("org/model") == "org/model"          # a Hub id passes through


def test_default_model_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_CACHE", str(tmp_path))
    first = loading.resolve_base_path(None)
    files = {p.name for p in (tmp_path / "gguf").glob("*/*")}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    stamp = (tmp_path / "gguf").glob("*/model.safetensors").__next__().stat().st_mtime_ns
    assert loading.resolve_base_path(None) == first                        # second start: no conversion
    assert next((tmp_path / "gguf").glob("*/model.safetensors")).stat().st_mtime_ns == stamp


def test_gguf_cache_is_named_by_content_not_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_CACHE", str(tmp_path / "cache"))
    data = bytes(range(256)) * 12_000                                      # 3 MB: several read blocks
    edited = bytearray(data)
    edited[len(data) // 2 + 3] ^= 1                                        # one byte in the middle
    for name, content in (("a", data), ("b", data), ("c", bytes(edited)), ("d", data[:-1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.gguf").write_bytes(content)
    key = lambda name: loading._gguf_cache_dir(tmp_path / name / "m.gguf")
    assert key("a") == key("b")                             # another environment's copy of the same wheel
    assert len({key("a"), key("c"), key("d")}) == 3


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        loading.resolve_dtype("float8")
