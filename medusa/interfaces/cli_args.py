"""What the `medusa` subcommands share: the model flags and how they load a MedusaModel (`LoadOptions`), the
generation flags, and --threads. Each command module parses with these and calls library functions."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass


def add_threads(p, default: int | None = None) -> None:
    """--threads N: torch's CPU threads for the command (`set_threads` applies it; `main` does for every
    subcommand)."""
    p.add_argument("--threads", type=int, metavar="N", default=default,
                   help="torch CPU threads" + (f" (default {default})" if default else " (default: torch's choice)"))


def set_threads(a) -> None:
    """Apply --threads, where the command has it and it was given."""
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)


def add_quantize(p, choices=None) -> None:
    """--quantize (loading.QUANTIZE), and the older --load-in-8bit / --load-in-4bit that map onto it
    (`quantize_of`)."""
    from medusa.inference.loading import QUANTIZE

    choices = choices or QUANTIZE
    cpu = "; on a CPU: gguf keeps a GGUF file's 4-bit weights (the default there for a GGUF file), int4/int8 " \
          "quantize at load, none dequantizes" if "gguf" in choices else ""
    p.add_argument("--quantize", choices=choices, help=f"base weights: 8bit or 4bit via bitsandbytes (CUDA){cpu}")
    p.add_argument("--load-in-8bit", action="store_true", help="deprecated: --quantize 8bit")
    p.add_argument("--load-in-4bit", action="store_true", help="deprecated: --quantize 4bit")


def quantize_of(a) -> str | None:
    """--quantize, or the one a deprecated --load-in-8bit / --load-in-4bit names (said on stderr); two
    different ones are refused."""
    chosen = [a.quantize] if a.quantize else []
    for q in ("8bit", "4bit"):
        if getattr(a, f"load_in_{q}", False):
            print(f"medusa: --load-in-{q} is deprecated; use --quantize {q}", file=sys.stderr)
            chosen.append(q)
    if len(set(chosen)) > 1:
        raise ValueError(f"choose one quantization, not {' and '.join(sorted(set(chosen)))}")
    return chosen[0] if chosen else None


@dataclass(frozen=True)
class LoadOptions:
    model: str | None = None
    base_model: str | None = None
    tree: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    attn: str | None = None
    lookup: int | None = None
    compile: bool = False
    lookup_short: int | None = None
    chat_template: str | None = None

    @classmethod
    def from_args(cls, a) -> "LoadOptions":
        return cls(model=a.model, base_model=a.base_model, tree=a.tree, device=a.device, dtype=a.dtype,
                   quantize=quantize_of(a), attn=a.attn, lookup=a.lookup, compile=a.compile,
                   lookup_short=a.lookup_short, chat_template=a.chat_template)

    def lookup_options(self):
        """What MedusaModel takes as `lookup` (lookup.as_lookup): None (the default), an int, or LookupOptions
        when the draft length after a weak match is given too."""
        if self.lookup_short is None:
            return self.lookup
        from medusa.inference.lookup import DEFAULT, with_max_tokens

        return with_max_tokens(DEFAULT.max_tokens if self.lookup is None else self.lookup, self.lookup_short)

    def check(self) -> None:
        """Refuse what is wrong before any loading: the device, the dtype, the tree and the chat template (files
        are read)."""
        from medusa.chat_format import read_template
        from medusa.inference.loading import resolve_device, resolve_dtype
        from medusa.inference.tree import load_tree

        device = resolve_device(self.device)
        resolve_dtype(self.dtype)
        if self.tree is not None:
            load_tree(self.tree, device_type=device.type)
        if self.chat_template is not None:
            read_template(self.chat_template)

    def load(self):
        from medusa.chat_format import use_template
        from medusa.model import MedusaModel

        log = lambda m: print(m, file=sys.stderr, flush=True)
        lookup = self.lookup_options()        # bad draft lengths are refused before any loading
        self.check()
        t0 = time.perf_counter()
        model = MedusaModel.from_pretrained(self.model, base_model=self.base_model, dtype=self.dtype,
                                            device=self.device, tree=self.tree, quantize=self.quantize,
                                            attn_implementation=self.attn, lookup=lookup, compile=self.compile,
                                            log=log)
        if model.tokenizer is None:
            raise ValueError(f"{self.base_model or self.model} has no tokenizer; the command line needs one "
                             f"(the Python API works on token ids without it)")
        use_template(model.tokenizer, self.chat_template, log)
        if self.compile:
            log("Compiling the model's forward passes (torch.compile; minutes on a small CPU) ...")
            t1 = time.perf_counter()
            model.warm_up()
            log(f"Compiled in {time.perf_counter() - t1:.0f} s")
        from medusa.inference.tree import tree_label

        log(f"Ready in {time.perf_counter() - t0:.1f} s: {model.heads.num_heads} heads, "
            f"tree of {tree_label(model.tree)}, {model.base_model.dtype}, {model.base_model.device}")
        return model



def gen_options(a) -> dict:
    """The generation flags as model.stream options, checked (call it before loading the model)."""
    from medusa.inference.acceptance import SamplingOptions
    from medusa.inference.decode import DecodeOptions

    DecodeOptions(max_new_tokens=a.max_new_tokens, seed=a.seed,
                  sampling=SamplingOptions(temperature=a.temperature, top_p=a.top_p, mode=a.sampling))
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed,
            "sampling": a.sampling}


def model_args(p: argparse.ArgumentParser) -> None:
    """The model and generation flags of every command that loads a MedusaModel (`LoadOptions.from_args`)."""
    from medusa import chat_format

    g = p.add_argument_group("model")
    g.add_argument("--model", help="heads folder (ours or original Medusa format), or a base model "
                                   "(Hub id, folder, .gguf); default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--base-model", help="override the base model named in a heads checkpoint")
    g.add_argument("--tree", help="tree preset name, dynamic:N (N nodes chosen each step from the heads' confidence) or JSON file of "
                   "paths (default: the heads' own or mc_sim_7b_63)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's)")
    g.add_argument("--attn", help="attention implementation: sdpa, eager, or medusa_tree (each tree node "
                                  "computed like a one-token step: bit-identical greedy output in bf16 on CPU)")
    g.add_argument("--lookup", type=int, metavar="N",
                   help="also verify up to N tokens copied from the context each step (prompt lookup as one more "
                        "tree branch: helps summaries, translations, answers quoting a passage; 2 after a weak "
                        "match, more where packed products pad the step's rows anyway; 0 = off)")
    g.add_argument("--lookup-short", type=int, metavar="M",
                   help="context-draft tokens after a weak match (default 2; M = N drafts N on every match: "
                        "better where rows are cheap, as on GPUs with large trees)")
    g.add_argument("--compile", action="store_true",
                   help="run decoding's forward passes under torch.compile: faster steps (tree steps most) after a "
                        "compilation of minutes on a small CPU at start-up")
    g.add_argument("--chat-template", metavar="FILE", help=chat_format.HELP)
    add_quantize(g)
    add_threads(g)
    s = p.add_argument_group("generation")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 = typical acceptance")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--sampling", choices=["typical", "lossless"], default="typical",
                   help="with temperature > 0: typical acceptance (faster) or lossless rejection sampling "
                        "(exactly the base model's sampling distribution)")
    s.add_argument("--max-new-tokens", type=int, default=512)
    s.add_argument("--seed", type=int, default=None)
