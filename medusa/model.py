"""MedusaModel: a stock transformers causal LM plus Medusa heads, a candidate tree, and the public API."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from medusa.chat_format import eos_token_ids
from medusa.inference import compiled, loading, packed_linear
from medusa.inference.acceptance import SamplingOptions
from medusa.inference.cache import context_limit
from medusa.inference.checkpoint import (build_heads, fetch_heads_repo, is_heads_folder, load_heads_checkpoint,
                                         save_heads)
from medusa.inference.decode import DecodeOptions, Request, Step, decode
from medusa.inference.engine import Engine, build_engine
from medusa.inference.heads import HeadsConfig, MedusaHeads
from medusa.inference.load import read_table
from medusa.inference.lookup import Lookup, as_lookup
from medusa.inference.quantized import dense_weight, device_of, is_quantized, output_rows
from medusa.inference.tree import (DEFAULT_TREE, default_tree, fit_tree_to_heads, load_tree, tree_for_device,
                                   tree_label)

EMBEDDED_DEFAULT = "embedded:" + loading.DEFAULT_MODEL_NAME
DEFAULT_HEADS_DIR = Path(__file__).parent / "default_heads"


def _as_prompts(input_ids, attention_mask, device) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """-> (the prompts as 1-D tensors, the (B, T) input they came from or None for a list of prompts).
    Accepts a (B, T) tensor (left-padded, with its `attention_mask`), a (T,) tensor or a list of ids (one
    prompt), a list of prompts (lists or 1-D tensors, any lengths), or a tokenizer's BatchEncoding / dict."""
    if isinstance(input_ids, dict) or hasattr(input_ids, "keys"):
        attention_mask = input_ids.get("attention_mask", attention_mask)
        input_ids = input_ids["input_ids"]
    if isinstance(input_ids, (list, tuple)) and input_ids and not isinstance(input_ids[0], int):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a (B, T) tensor, not with a list of prompts")
        return [torch.as_tensor(p, dtype=torch.long).reshape(-1).to(device) for p in input_ids], None
    ids = torch.as_tensor(input_ids, dtype=torch.long).to(device)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), (T,) or a list of prompts, got shape {tuple(ids.shape)}")
    if attention_mask is None:
        return list(ids), ids
    mask = torch.as_tensor(attention_mask).to(device).bool()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("only left padding is supported: each attention_mask row must be 0...0 1...1 "
                         "(tokenizer.padding_side = 'left')")
    return [row[m] for row, m in zip(ids, mask)], ids


_PER_ROW = ("max_new_tokens", "stop", "seed", "temperature", "top_p", "eos_token_id")


def _per_row(options: dict, n: int) -> list[dict]:
    """Options for each of n rows: a list (one value per row) where a row's value would be one value.
    `stop` is per row when it is a list of lists (a list of strings is every row's stop strings); so is
    `eos_token_id` (a list of ints is every row's end tokens)."""
    rows = [dict(options) for _ in range(n)]
    for name in _PER_ROW:
        value = options.get(name)
        nested = name in ("stop", "eos_token_id")
        if not isinstance(value, (list, tuple)) or (nested and not any(isinstance(v, (list, tuple)) for v in value)):
            continue
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts: give one value, or one per prompt")
        for row, v in zip(rows, value):
            row[name] = v
    return rows


def _heads_folder(name) -> Path | None:
    """A local heads folder, or a Hub repo id holding heads (fetched); None for anything else (a base model)."""
    path = Path(str(name)).expanduser()
    if path.exists() or str(name).startswith((".", "/", "~")) or str(name).count("/") != 1:
        return path if is_heads_folder(path) else None
    return fetch_heads_repo(str(name))


def _device_type(base_model) -> str:
    """The key trees are calibrated under: the device type, "-int4" added for weights held in 4 bits (their
    steps cost otherwise by node count)."""
    kind = device_of(base_model.get_input_embeddings()).type
    return f"{kind}-int4" if is_quantized(base_model) else kind


class MedusaModel(nn.Module):
    def __init__(self, base_model, heads: MedusaHeads, tokenizer=None, tree=None, lookup: Lookup | None = None,
                 compile: bool = False):
        super().__init__()
        self.base_model = base_model
        self.heads = heads
        self.tokenizer = tokenizer
        self.tree = load_tree(tree if tree is not None else fit_tree_to_heads(load_tree(DEFAULT_TREE), heads.num_heads),
                              heads.num_heads, self.device_type)
        self.lookup = as_lookup(lookup)
        self._check_compatible()
        # held in a tuple, not as a submodule: the compiled wrapper shares base_model's parameters
        self._compiled = (compiled.compile_forward(base_model),) if compile else ()
        self.engine = self._build_engine(base_model, heads, tokenizer, compile)

    def _build_engine(self, base_model, heads, tokenizer, compile: bool) -> Engine:
        """What decoding fixes at load (engine.build_engine); compiled runs keep the lm_head in their graph."""
        return build_engine(base_model, heads, tokenizer, tree=self.tree, lookup=self.lookup,
                            forward=self._compiled[0] if compile else None)

    def _apply(self, fn, *args, **kwargs):
        """`to`, `cuda`, `half` ... move or cast the base model and the heads, then rebuild the engine (its
        masks, greedy head and draft projection follow the weights). Packed weights cannot follow: they are
        copies in a CPU library's layout, so a model loaded with them refuses to change device or dtype."""
        probe = torch.empty(0, dtype=torch.float32, device=device_of(self.base_model.get_input_embeddings()))
        moved = fn(probe)
        if packed_linear.is_packed(self.base_model) and (moved.device, moved.dtype) != (probe.device, probe.dtype):
            raise RuntimeError(f"this model's fp32 CPU weights are packed for decoding (pack_weights), and packed "
                               f"copies cannot move to {moved.device} / {moved.dtype}: load it with device=... / "
                               f"dtype=... instead, or with pack_weights=\"off\" to move it later")
        if is_quantized(self.base_model) and moved.device != probe.device:
            raise RuntimeError(f"this model's weights are held quantized for CPU products (quantize=), which cannot "
                               f"move to {moved.device}: load it with device=... instead")
        super()._apply(fn, *args, **kwargs)
        if "engine" in self.__dict__:
            table = self.engine.load_table
            self.engine = self._build_engine(self.base_model, self.heads, self.tokenizer, self.is_compiled)
            self.engine.load_table = table
        return self

    @property
    def load_table(self):
        """The calibrated step costs by rows a batch sizes its trees by (inference/load.py), or None: measured
        as each batch runs. `load.read_table(heads folder, device type)` reads the one `medusa calibrate` saved."""
        return self.engine.load_table

    @load_table.setter
    def load_table(self, table) -> None:
        self.engine.load_table = table

    @property
    def draft_head(self) -> nn.Module:
        """What turns the heads' features into guesses (draft_head.draft_projection)."""
        return self.engine.proposer.draft_head

    @property
    def greedy_head(self):
        """The base's greedy choice per node without its fp32 output projection (greedy_head.py), or None."""
        return self.engine.verifier.greedy_head

    @greedy_head.setter
    def greedy_head(self, head) -> None:
        self.engine.verifier.greedy_head = head

    @property
    def device_type(self) -> str:
        """Where decoding runs ("cpu", "cuda", ...; "cpu-int4" with 4-bit weights): trees are calibrated per kind."""
        return _device_type(self.base_model)

    @property
    def is_compiled(self) -> bool:
        return bool(self._compiled)

    def warm_up(self) -> int:
        """Run each kind of forward pass decoding meets once (compiling them if `compile=True`); returns the
        number of steps run. Call it before timing anything."""
        return compiled.warm_up(self.stream, self.base_model.get_input_embeddings().num_embeddings)

    def _check_compatible(self) -> None:
        cfg = self.base_model.config.get_text_config(decoder=True)
        hc = self.heads.config
        if hc.hidden_size != cfg.hidden_size:
            raise ValueError(f"heads have hidden size {hc.hidden_size} but the base model's is {cfg.hidden_size}")
        vocab = output_rows(self.base_model.get_output_embeddings())
        if hc.vocab_size != vocab:
            raise ValueError(f"heads have vocabulary size {hc.vocab_size} but the base model's is {vocab}")

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, *, base_model=None, dtype=None,
                        device=None, tree=None, num_heads: int = 4, num_layers: int = 1,
                        shared_lm_head: bool = True, quantize: str | None = None,
                        attn_implementation: str | None = None, lookup: Lookup | None = None,
                        pack_weights: str = "auto", compile: bool = False, log=None) -> "MedusaModel":
        """Load heads + base. `name_or_path` is a heads folder (ours or the original Medusa format), a base
        model (Hub id, folder or GGUF file; new untrained heads), or None for the embedded default.
        `quantize`: None (a GGUF file on a CPU loads as stored, its 4-bit weights kept; anything else as stored),
        "none", "gguf", "int4", "int8" (CPU) or "8bit", "4bit" (bitsandbytes, CUDA): loading.QUANTIZE.
        `lookup`: tokens copied from the context per step as extra candidates: an int or LookupOptions
        (lookup.as_lookup).
        `pack_weights`: copies of fp32 CPU weights packed for the decode loop's products: "auto", "onednn",
        "mkl" or "off" (packed_linear.packing). The model then stays where it was loaded (see `to`).
        `compile`: run decoding's forward passes under torch.compile (compiled.py; call `warm_up()` to compile
        before first use: minutes on a small CPU)."""
        log = log or (lambda m: None)
        config, state, saved_tree, folder = None, None, None, None
        if name_or_path is None:
            if (DEFAULT_HEADS_DIR / "medusa_config.json").is_file():
                config, state, saved_tree = load_heads_checkpoint(DEFAULT_HEADS_DIR)
                folder = DEFAULT_HEADS_DIR
            else:
                log("No trained heads ship for the default model yet: using untrained heads (about 1 token per step).")
            base_ref = base_model
        elif (heads_dir := _heads_folder(name_or_path)) is not None:
            name_or_path = folder = heads_dir
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
        adapter = (config.extra or {}).get("adapter") if config is not None else None
        cpu_quantize = loading.resolve_quantize(quantize, base_ref, loading.resolve_device(device))
        later = cpu_quantize if adapter and cpu_quantize in ("gguf", "int4", "int8") else None
        try:
            model, tokenizer = loading.load_base_model(base_ref, dtype=dtype, device=device,
                                                       quantize="none" if later else cpu_quantize,
                                                       attn_implementation=attn_implementation, log=log)
        except loading.BaseModelUnavailable as e:
            if config is None or name_or_path is None or base_model is not None:   # not the heads' own base
                raise
            raise loading.BaseModelUnavailable(f"{e}; the heads in {name_or_path} name it as their base: pass "
                                               f"--base-model (base_model=), a local folder or Hub id") from None
        if adapter:  # Medusa-2: the base was fine-tuned with LoRA alongside the heads
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(Path(name_or_path).expanduser() / adapter)).merge_and_unload()
            model.eval()
            if later:   # quantized after the merge (a GGUF file keeps only the layers the adapter left unchanged)
                loading.quantize_in_place(model, later, base_ref, log=log)
        packed_linear.pack_for_inference(model, pack_weights, log)
        text_cfg = model.config.get_text_config(decoder=True)
        vocab = output_rows(model.get_output_embeddings())
        if config is None:
            config = HeadsConfig(hidden_size=text_cfg.hidden_size, vocab_size=vocab, num_heads=num_heads,
                                 num_layers=num_layers, shared_lm_head=shared_lm_head,
                                 base_model_name_or_path=str(base_ref) if base_ref else EMBEDDED_DEFAULT)
        elif not config.vocab_size:
            config.vocab_size = vocab  # original shared-projection variant does not record it
        heads = build_heads(config, state)
        if state is None:
            heads.init_projections_from(dense_weight(model.get_output_embeddings()))
        head_dtype = model.dtype if model.dtype.is_floating_point else torch.float16
        heads.to(device=device_of(model.get_output_embeddings()), dtype=head_dtype).eval()
        if tree is None:
            kind = _device_type(model)
            tree = tree_for_device(saved_tree, kind) if saved_tree else None
            if tree is None:
                preset = default_tree(kind)
                tree = fit_tree_to_heads(load_tree(preset), heads.num_heads)
                why = (f"The heads' trees were calibrated for {', '.join(sorted(saved_tree))}, not {kind}"
                       if saved_tree else "No tree is calibrated for these heads")
                log(f"{why}: decoding on {kind} with the {preset} preset ({tree_label(tree)}); `medusa calibrate` "
                    f"fits a tree to this model and machine.")
        m = cls(model, heads, tokenizer, tree=tree, lookup=lookup, compile=compile)
        m._note_inexact(log)
        if folder is not None and (table := read_table(folder, m.device_type)) is not None:
            m.load_table = table
            log(f"Trees sized to the load by the step costs calibrated on {table.machine or 'an unnamed machine'}")
        return m

    def _note_inexact(self, log) -> None:
        """Say where greedy output cannot be exactly `generate`'s on this machine: in reduced precision, a tree
        step's products must give each row the bits it gets alone (tree_attention.rows_independent), and under
        medusa_tree attention each node the attention bits of a one-token step (tree_attention.attention_exact)."""
        quantized = is_quantized(self.base_model)
        dtype = torch.bfloat16 if quantized else self.base_model.dtype     # quantized products take bf16
        if dtype not in (torch.bfloat16, torch.float16):
            return
        from medusa.inference.tree_attention import attention_exact, rows_independent, uses_tree_attention

        rows = self.engine.most_nodes(Request(torch.zeros(1), self.decode_options(), self.engine.shapes(self.tree),
                                              self.lookup))
        if uses_tree_attention(self.base_model) and not attention_exact(self.base_model, rows):
            log(f"Note: this machine's attention products do not give a tree node of a {rows}-node step the bits of "
                f"a one-token step (tree_attention.attention_exact), so greedy output can differ from `generate`'s "
                f"where two tokens nearly tie.")
        elif not rows_independent(self.base_model, rows):
            what, fix = ("quantized weights", 'fp32 (quantize="none")') if quantized else (str(dtype)[6:], "fp32")
            log(f"Note: with {what} this machine's matrix products of {rows} rows (a step's tree, or a batch's) do "
                f"not give each row the bits it gets alone, so greedy output can differ from `generate`'s where two "
                f"tokens nearly tie; {fix} avoids it.")

    def save_pretrained(self, folder: str | os.PathLike, *, save_tree: bool = True) -> Path:
        """Write the heads (and the tree in use, as this device type's) in our format; the base model is
        referenced by name."""
        return save_heads(folder, self.heads, {self.device_type: self.tree} if save_tree else None)

    # ---------------------------------------------------------------- generation
    @property
    def context_limit(self) -> int:
        return self.engine.context_limit

    def decode_options(self, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                       posterior_threshold: float = 0.09, posterior_alpha: float = 0.3, sampling: str = "typical",
                       stop=None, eos_token_id=None, seed: int | None = None) -> DecodeOptions:
        eos = eos_token_ids(self.base_model, self.tokenizer, eos_token_id)
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        sampling = SamplingOptions(temperature=temperature, top_p=top_p, posterior_threshold=posterior_threshold,
                                   posterior_alpha=posterior_alpha, mode=sampling)
        return DecodeOptions(max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos,
                             stop_strings=stop, seed=seed)

    def requests(self, input_ids, attention_mask=None, *, tree=None, lookup=None,
                 **options) -> tuple[list[Request], torch.Tensor | None]:
        """The requests `stream` decodes, and the (B, T) input they came from (None for a list of prompts)."""
        prompts, padded = _as_prompts(input_ids, attention_mask, device_of(self.base_model.get_input_embeddings()))
        if not prompts:
            raise ValueError("no prompt given")
        paths = self.tree if tree is None else load_tree(tree, self.heads.num_heads, self.device_type)
        shapes = self.engine.shapes(paths)
        lookup = as_lookup(lookup, self.lookup)
        reqs = [Request(ids, self.decode_options(**opts), shapes, lookup, key=i)
                for i, (ids, opts) in enumerate(zip(prompts, _per_row(options, len(prompts))))]
        for r in reqs:
            self.engine.check(r)
        return reqs, padded

    def stream(self, input_ids, attention_mask=None, *, tree=None, lookup=None, max_batch: int | None = None,
               trees_by_load: bool = True, **options) -> Iterator[Step]:
        """One Step per decoding step of each prompt (Step.tokens: the ids it added; Step.row: which prompt).
        `input_ids`: see `generate`. `tree` and `lookup` override the model's for this call; `max_batch`: rows
        decoded at once (default: all); `trees_by_load`: in a batch, greedy and lossless rows skip their trees
        on steps where that is faster (inference/load.py; their output is the same). Options (each one value,
        or a list with one per prompt): see `decode_options`."""
        reqs, _ = self.requests(input_ids, attention_mask, tree=tree, lookup=lookup, **options)
        return self._decode(reqs, max_batch, trees_by_load)

    def _decode(self, reqs: list[Request], max_batch: int | None, trees_by_load: bool) -> Iterator[Step]:
        return decode(self.engine, reqs, slots=min(max_batch or len(reqs), len(reqs)), trees_by_load=trees_by_load)

    def generate_baseline(self, input_ids, generate_kwargs: dict | None = None, *, attention_mask=None,
                          **options) -> torch.Tensor:
        """transformers' own `generate` on the base model with the same options: the reference medusa is
        measured against. A list of prompts is left-padded into one batch. `generate_kwargs` go to `generate`
        as they are (e.g. prompt_lookup_num_tokens)."""
        prompts, ids = _as_prompts(input_ids, attention_mask, device_of(self.base_model.get_input_embeddings()))
        pad = self._pad_id()
        if ids is None or attention_mask is None:
            width = max(p.numel() for p in prompts)
            ids = torch.stack([torch.cat([p.new_full((width - p.numel(),), pad), p]) for p in prompts])
            mask = torch.stack([torch.arange(width, device=ids.device) >= width - p.numel() for p in prompts])
        else:
            mask = torch.as_tensor(attention_mask).to(ids.device)
        opts = self.decode_options(**options)
        s = opts.sampling
        if not s.greedy and opts.seed is not None:
            torch.manual_seed(opts.seed)
        tok = self.tokenizer
        return self.base_model.generate(
            ids, attention_mask=mask.long(), max_new_tokens=opts.max_new_tokens, do_sample=not s.greedy,
            temperature=None if s.greedy else s.temperature, top_p=None if s.greedy else s.top_p, top_k=None,
            eos_token_id=list(opts.eos_token_ids) or None, pad_token_id=pad,
            stop_strings=list(opts.stop_strings) or None, tokenizer=tok if opts.stop_strings else None,
            **(generate_kwargs or {}))

    def generate(self, input_ids, attention_mask=None, *, max_batch: int | None = None, trees_by_load: bool = True,
                 **options):
        """Like transformers' generate. A (B, T) tensor (left-padded, with its `attention_mask`) gives
        (B, T + new): each row its prompt as given, its new tokens, then the pad token where it ended early. A
        list of prompts (token lists or 1-D tensors of any lengths) gives a list of 1-D tensors, each prompt
        followed by its new tokens. Options: see `stream`."""
        reqs, padded = self.requests(input_ids, attention_mask, **options)
        new: list[list[torch.Tensor]] = [[] for _ in reqs]
        for step in self._decode(reqs, max_batch, trees_by_load):
            new[step.row].append(step.tokens)
        grown = [torch.cat(n) if n else r.ids.new_zeros(0) for r, n in zip(reqs, new)]
        if padded is None:
            return [torch.cat([r.ids, g]) for r, g in zip(reqs, grown)]
        width = max(g.numel() for g in grown)
        out = padded.new_full((padded.shape[0], padded.shape[1] + width), self._pad_id())
        out[:, :padded.shape[1]] = padded
        for b, g in enumerate(grown):
            out[b, padded.shape[1]:padded.shape[1] + g.numel()] = g
        return out

    def _pad_id(self) -> int:
        """What fills a row that ended early: the tokenizer's pad token, the generation config's, or EOS."""
        tok, gc = self.tokenizer, self.base_model.generation_config
        for cand in (getattr(tok, "pad_token_id", None), gc.pad_token_id, getattr(tok, "eos_token_id", None),
                     gc.eos_token_id):
            if isinstance(cand, (list, tuple)):
                cand = cand[0] if cand else None
            if cand is not None:
                return int(cand)
        return 0
