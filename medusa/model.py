"""MedusaModel: a stock transformers causal LM plus Medusa heads, a candidate tree, and the public API."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from medusa.inference import compiled, loading, packed_linear
from medusa.inference.acceptance import SamplingOptions
from medusa.inference.cache import sliding_window
from medusa.inference.checkpoint import (build_heads, fetch_heads_repo, is_heads_folder, load_heads_checkpoint,
                                         save_heads)
from medusa.inference.decode import DecodeOptions, Step, medusa_decode
from medusa.inference.greedy_head import greedy_head_for
from medusa.inference.heads import HeadsConfig, MedusaHeads, draft_projection
from medusa.inference.lookup import DEFAULT as DEFAULT_LOOKUP, LookupOptions, with_max_tokens
from medusa.inference.tree import (DEFAULT_TREE, DynamicTree, fit_tree_to_heads, load_tree, tree_buffers,
                                   tree_for_device)

EMBEDDED_DEFAULT = "embedded:" + loading.DEFAULT_MODEL_NAME
DEFAULT_HEADS_DIR = Path(__file__).parent / "default_heads"


def context_limit(config) -> int:
    """Longest sequence the base model handles: its position limit, or its sliding window if smaller
    (a single 4D mask cannot express per-layer windows, so we stay where they make no difference)."""
    cfg = config.get_text_config(decoder=True)
    limit = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                  if getattr(cfg, k, None)), 2048)
    window = sliding_window(config)
    return int(min(limit, window) if window else limit)


def _as_input_ids(input_ids, device) -> torch.Tensor:
    """Accept a (1, T) or (T,) tensor, a list of ids, or a tokenizer's BatchEncoding / dict."""
    if isinstance(input_ids, dict) or hasattr(input_ids, "keys"):
        mask = input_ids.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise ValueError("padded input is not supported: medusa decodes one unpadded sequence (batch 1)")
        input_ids = input_ids["input_ids"]
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    return ids.to(device)


def _heads_folder(name) -> Path | None:
    """A local heads folder, or a Hub repo id holding heads (fetched); None for anything else (a base model)."""
    path = Path(str(name)).expanduser()
    if path.exists() or str(name).startswith((".", "/", "~")) or str(name).count("/") != 1:
        return path if is_heads_folder(path) else None
    return fetch_heads_repo(str(name))


def _device_type(base_model) -> str:
    return base_model.get_input_embeddings().weight.device.type


def _lookup_options(lookup) -> LookupOptions:
    """None: the default (up to 10 tokens, 2 after a weak match); an int: at most that many context-draft
    tokens per step (0 = off); or LookupOptions as they are."""
    if lookup is None:
        return DEFAULT_LOOKUP
    if isinstance(lookup, LookupOptions):
        return lookup
    return with_max_tokens(int(lookup))


class MedusaModel(nn.Module):
    def __init__(self, base_model, heads: MedusaHeads, tokenizer=None, tree=None, lookup=None, compile: bool = False):
        super().__init__()
        self.base_model = base_model
        self.heads = heads
        self.tokenizer = tokenizer
        self.tree = load_tree(tree if tree is not None else fit_tree_to_heads(load_tree(DEFAULT_TREE), heads.num_heads),
                              heads.num_heads, self.device_type)
        self.lookup = _lookup_options(lookup)
        self._check_compatible()
        self.draft_head = draft_projection(base_model.get_output_embeddings(), heads)
        # held in a tuple, not as a submodule: the compiled wrapper shares base_model's parameters
        self._compiled = (compiled.compile_forward(base_model),) if compile else ()
        # greedy verification without the fp32 lm_head, or None (compiled runs keep the lm_head in their graph)
        self.greedy_head = None if compile else greedy_head_for(base_model)

    @property
    def device_type(self) -> str:
        """Where decoding runs ("cpu", "cuda", ...): trees are calibrated per device type."""
        return _device_type(self.base_model)

    @property
    def is_compiled(self) -> bool:
        return bool(self._compiled)

    def warm_up(self) -> int:
        """Run each kind of forward pass decoding meets once (compiling them if `compile=True`); returns the
        number of steps run. Call it before timing anything."""
        return compiled.warm_up(self.stream, self.base_model.get_input_embeddings().weight.shape[0])

    def _check_compatible(self) -> None:
        cfg = self.base_model.config.get_text_config(decoder=True)
        hc = self.heads.config
        if hc.hidden_size != cfg.hidden_size:
            raise ValueError(f"heads have hidden size {hc.hidden_size} but the base model's is {cfg.hidden_size}")
        vocab = self.base_model.get_output_embeddings().weight.shape[0]
        if hc.vocab_size != vocab:
            raise ValueError(f"heads have vocabulary size {hc.vocab_size} but the base model's is {vocab}")

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, *, base_model=None, dtype=None,
                        device=None, tree=None, num_heads: int = 4, num_layers: int = 1,
                        shared_lm_head: bool = True, load_in_8bit: bool = False, load_in_4bit: bool = False,
                        attn_implementation: str | None = None, lookup=None, pack_weights: bool | str | None = None,
                        compile: bool = False, log=None) -> "MedusaModel":
        """Load heads + base. `name_or_path` is a heads folder (ours or the original Medusa format), a base
        model (Hub id, folder or GGUF file; new untrained heads), or None for the embedded default.
        `lookup`: tokens copied from the context per step as extra candidates (0 = off; see lookup.py).
        `pack_weights`: copies of fp32 CPU weights packed for the decode loop's products (packed_linear.py):
        "onednn" or "mkl"; None = oneDNN where torch has it (else MKL) when the copies take at most 2 GiB;
        True = the same regardless of memory; False = none.
        `compile`: run decoding's forward passes under torch.compile (compiled.py; call `warm_up()` to compile
        before first use: minutes on a small CPU)."""
        log = log or (lambda m: None)
        config, state, saved_tree = None, None, None
        if name_or_path is None:
            if (DEFAULT_HEADS_DIR / "medusa_config.json").is_file():
                config, state, saved_tree = load_heads_checkpoint(DEFAULT_HEADS_DIR)
            else:
                log("No trained heads ship for the default model yet: using untrained heads (about 1 token per step).")
            base_ref = base_model
        elif (heads_dir := _heads_folder(name_or_path)) is not None:
            name_or_path = heads_dir
            config, state, saved_tree = load_heads_checkpoint(heads_dir)
            base_ref = base_model or config.base_model_name_or_path
            if base_ref is None:
                raise ValueError(f"{name_or_path} names no base model: pass base_model= (--base-model)")
        else:
            if base_model is not None:
                raise ValueError(f"{name_or_path} is not a heads folder, so base_model= has nothing to override")
            base_ref = name_or_path
        if base_ref == EMBEDDED_DEFAULT:
            base_ref = None
        log(f"Loading base model {base_ref or EMBEDDED_DEFAULT} ...")
        model, tokenizer = loading.load_base_model(base_ref, dtype=dtype, device=device, load_in_8bit=load_in_8bit,
                                                   load_in_4bit=load_in_4bit,
                                                   attn_implementation=attn_implementation, log=log)
        adapter = (config.extra or {}).get("adapter") if config is not None else None
        if adapter:  # Medusa-2: the base was fine-tuned with LoRA alongside the heads
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(Path(name_or_path).expanduser() / adapter)).merge_and_unload()
            model.eval()
        if pack_weights is not False:
            packed_linear.pack_for_inference(model, pack_weights, log)
        text_cfg = model.config.get_text_config(decoder=True)
        vocab = model.get_output_embeddings().weight.shape[0]
        if config is None:
            config = HeadsConfig(hidden_size=text_cfg.hidden_size, vocab_size=vocab, num_heads=num_heads,
                                 num_layers=num_layers, shared_lm_head=shared_lm_head,
                                 base_model_name_or_path=str(base_ref) if base_ref else EMBEDDED_DEFAULT)
        elif not config.vocab_size:
            config.vocab_size = vocab  # original shared-projection variant does not record it
        heads = build_heads(config, state)
        if state is None:
            heads.init_projections_from(model.get_output_embeddings())
        head_dtype = model.dtype if model.dtype.is_floating_point else torch.float16
        heads.to(device=model.get_output_embeddings().weight.device, dtype=head_dtype).eval()
        if tree is None and saved_tree is not None:
            kind = _device_type(model)
            tree = tree_for_device(saved_tree, kind)
            if tree is None:
                log(f"The heads' trees were calibrated for {', '.join(sorted(saved_tree))}, not {kind}: using the "
                    f"{DEFAULT_TREE} preset (`medusa calibrate` fits one to this machine).")
        return cls(model, heads, tokenizer, tree=tree, lookup=lookup, compile=compile)

    def save_pretrained(self, folder: str | os.PathLike, *, save_tree: bool = True) -> Path:
        """Write the heads (and the tree in use, as this device type's) in our format; the base model is
        referenced by name."""
        return save_heads(folder, self.heads, {self.device_type: self.tree} if save_tree else None)

    # ---------------------------------------------------------------- generation
    @property
    def context_limit(self) -> int:
        return context_limit(self.base_model.config)

    def decode_options(self, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                       posterior_threshold: float = 0.09, posterior_alpha: float = 0.3, sampling: str = "typical",
                       stop=None, eos_token_id=None, seed: int | None = None) -> DecodeOptions:
        eos = eos_token_id if eos_token_id is not None else self.base_model.generation_config.eos_token_id
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        sampling = SamplingOptions(temperature=temperature, top_p=top_p, posterior_threshold=posterior_threshold,
                                   posterior_alpha=posterior_alpha, mode=sampling)
        return DecodeOptions(max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos,
                             stop_strings=stop, seed=seed)

    def stream(self, input_ids, *, tree=None, lookup=None, **options) -> Iterator[Step]:
        """One Step per decoding step (Step.tokens: the ids it added). `tree` and `lookup` override the model's
        for this call. Options: see `decode_options`."""
        ids = _as_input_ids(input_ids, self.base_model.get_input_embeddings().weight.device)
        paths = self.tree if tree is None else load_tree(tree, self.heads.num_heads, self.device_type)
        opts = self.decode_options(**options)
        tree = paths if isinstance(paths, DynamicTree) else tree_buffers(paths)
        return medusa_decode(self.base_model, self.heads, ids, tree, opts,
                             context_limit=self.context_limit, tokenizer=self.tokenizer, draft_head=self.draft_head,
                             lookup=self.lookup if lookup is None else _lookup_options(lookup),
                             forward=self._compiled[0] if self._compiled else None, greedy_head=self.greedy_head)

    def generate_baseline(self, input_ids, generate_kwargs: dict | None = None, **options) -> torch.Tensor:
        """transformers' own `generate` on the base model with the same options: the reference medusa is
        measured against. `generate_kwargs` go to `generate` as they are (e.g. prompt_lookup_num_tokens)."""
        ids = _as_input_ids(input_ids, self.base_model.get_input_embeddings().weight.device)
        opts = self.decode_options(**options)
        s = opts.sampling
        if not s.greedy and opts.seed is not None:
            torch.manual_seed(opts.seed)
        tok = self.tokenizer
        pad = None if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return self.base_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=opts.max_new_tokens, do_sample=not s.greedy,
            temperature=None if s.greedy else s.temperature, top_p=None if s.greedy else s.top_p, top_k=None,
            eos_token_id=list(opts.eos_token_ids) or None, pad_token_id=pad,
            stop_strings=list(opts.stop_strings) or None, tokenizer=tok if opts.stop_strings else None,
            **(generate_kwargs or {}))

    def generate(self, input_ids, **options) -> torch.Tensor:
        """Like transformers' generate: (1, prompt + new) token ids."""
        ids = _as_input_ids(input_ids, self.base_model.get_input_embeddings().weight.device)
        new = [step.tokens for step in self.stream(ids, **options)]
        return torch.cat([ids[0], *new])[None]
