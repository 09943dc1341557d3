"""The engine: what decoding needs that is fixed when the model is loaded (how to propose, how to verify, the
context limit, the tokenizer for stop strings), and each request's own state as a row of a batch.

A `Request` is what a caller asks for (a prompt and its options); a `Row` is that request being decoded: its
cache row, its length, its next root token, its generator, its context drafts and its output so far. Rows
accept and stop independently (`Row.accept`, `Row.finish`); the decode loop (decode.py) runs them together.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from medusa.inference import packed_linear
from medusa.inference.acceptance import SamplingOptions, accept, accept_greedy, next_token
from medusa.inference.cache import context_limit, mask_layout
from medusa.inference.draft_head import draft_projection
from medusa.inference.greedy_head import greedy_head_for
from medusa.inference.lookup import ContextIndex, LookupOptions
from medusa.inference.propose import Candidates, Proposal, Proposer, TreeShapes
from medusa.inference.quantized import device_of
from medusa.inference.stops import stop_index
from medusa.inference.tree import DynamicTree, TreeBuffers
from medusa.inference.tree_attention import uses_tree_attention
from medusa.inference.verify import Verified, Verifier


class PromptTooLongError(ValueError):
    pass


@dataclass(frozen=True)
class DecodeOptions:
    max_new_tokens: int = 256
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Step:
    tokens: torch.Tensor               # (n,) token ids this step added
    seconds: float                     # wall time of the step
    finish_reason: str | None = None   # on the last step: "eos", "stop", "length", "context" or "cancelled"
    nodes: tuple[int, ...] = ()        # the accepted tree nodes (0 = root), before any stop trimming
    tree_size: int = 1                 # nodes verified this step (0: a last token emitted unverified)
    row: int = 0                       # which request of the batch (its index, or the key it was given)

    @property
    def accepted(self) -> int:
        """Tokens this step produced (the root plus accepted candidates, after any stop trimming)."""
        return self.tokens.numel()


@dataclass
class Request:
    ids: torch.Tensor                  # (T,) the prompt
    opts: DecodeOptions
    tree: TreeShapes | None = None     # None: the engine's
    lookup: LookupOptions | None = None
    key: object = 0                    # reported as Step.row


class Engine:
    """Built once per model: `proposer` (heads, draft projection), `verifier` (forward, attention mode,
    greedy head), the default tree and context drafts, the context limit, the tokenizer (stop strings), the
    calibrated step costs by rows (load.py)."""

    def __init__(self, proposer: Proposer, verifier: Verifier, *, num_layers: int, tree, lookup: LookupOptions,
                 context_limit: int, device, tokenizer=None, load_table=None):
        self.proposer, self.verifier, self.num_layers = proposer, verifier, num_layers
        self.lookup, self.context_limit, self.device, self.tokenizer = lookup, context_limit, device, tokenizer
        self.load_table = load_table        # load.LoadTable: calibrated step costs by rows, or None
        self._shapes: dict = {}
        self.tree = self.shapes(tree)
        self.root_only = self.shapes([])

    def shapes(self, tree) -> TreeShapes:
        """A tree's TreeShapes (paths, TreeBuffers or DynamicTree), shared by every row that decodes with it."""
        key = tree if isinstance(tree, DynamicTree) else tree.paths if isinstance(tree, TreeBuffers) else \
            tuple(tuple(p) for p in tree)
        if key not in self._shapes:
            self._shapes[key] = TreeShapes(tree, self.device, self.verifier.dtype, self.verifier.tree_attention)
        return self._shapes[key]

    def most_nodes(self, req: Request) -> int:
        """The most nodes a step of this request verifies (its tree, its longest drafts, the rows packed
        products pad to)."""
        tree, lookup = req.tree or self.tree, req.lookup if req.lookup is not None else self.lookup
        most = tree.nodes + (lookup.max_tokens if lookup.enabled else 0)
        pad = self.proposer.pad
        return pad(most) if pad is not None and lookup.enabled else most

    def check(self, req: Request) -> None:
        n = req.ids.numel()
        if req.ids.dim() != 1 or n == 0:
            raise ValueError(f"a prompt is a non-empty sequence of token ids, got shape {tuple(req.ids.shape)}")
        if n >= self.context_limit:
            raise PromptTooLongError(f"prompt is {n} tokens but the model's context is {self.context_limit}")

    def capacity(self, req: Request) -> int:
        """Cache entries the request can use: its prompt, its answer and one step's tree, within the context."""
        return min(self.context_limit, req.ids.numel() + req.opts.max_new_tokens + self.most_nodes(req))


def build_engine(base_model, heads=None, tokenizer=None, *, tree=(), lookup: LookupOptions = LookupOptions(),
                 forward=None) -> Engine:
    """The engine for `base_model` with `heads` (None: plain decoding, whose tree is the root alone): the heads'
    draft projection, how forwards run (`forward`, e.g. a compiled one, else the model; the attention mode; a
    greedy head without the fp32 lm_head where exact and not compiled), the default tree and drafts."""
    embedding = base_model.get_input_embeddings()
    dtype = next(base_model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float16
    lm_head = base_model.get_output_embeddings()
    proposer = Proposer(heads, lm_head if heads is None else draft_projection(lm_head, heads), embedding,
                        pad=None if forward is not None else packed_linear.padded_rows(base_model))
    window, layer_types = mask_layout(base_model.config)
    tree_attention = uses_tree_attention(base_model)
    verifier = Verifier(forward if forward is not None else base_model, dtype=dtype,
                        greedy_head=None if forward is not None else greedy_head_for(base_model),
                        tree_attention=tree_attention, window=window, layer_types=layer_types)
    limit = context_limit(base_model.config)
    if tree_attention and window:       # medusa_tree gathers a node's whole prefix: stay inside the window
        limit = min(limit, window)
    return Engine(proposer, verifier, num_layers=base_model.config.get_text_config(decoder=True).num_hidden_layers,
                  tree=tree, lookup=lookup, context_limit=limit, device=device_of(embedding), tokenizer=tokenizer)


class Row:
    """A request being decoded. `length`: its cached entries; `root`: its next token once chosen."""

    def __init__(self, engine: Engine, req: Request, slot: int, last_logits, last_hidden, seconds: float):
        self.engine, self.req, self.opts, self.slot = engine, req, req.opts, slot
        self.key, self.capacity = req.key, engine.capacity(req)
        self.shapes = req.tree or engine.tree
        lookup = req.lookup if req.lookup is not None else engine.lookup
        self.context = ContextIndex(req.ids.tolist(), lookup) if lookup.enabled else None
        self.gen = (torch.Generator(device=req.ids.device).manual_seed(req.opts.seed)
                    if req.opts.seed is not None else None)
        self.eos = set(req.opts.eos_token_ids)
        self.length, self.generated, self.root = req.ids.numel(), [], None
        self.last_logits, self.last_hidden = last_logits, last_hidden
        self.seconds = seconds            # prefill time, counted in its first step

    @property
    def greedy(self) -> bool:
        return self.opts.sampling.greedy

    def choose_root(self) -> Step | None:
        """Pick this step's root; returns the row's last Step when it ends without a forward (no room left,
        or its last token: nothing will read that token's KV entry or logits)."""
        if self.capacity - self.length < 1:
            return self.finish([], "context")
        if self.root is None:
            self.root = next_token(self.last_logits, self.opts.sampling, self.gen)
        if self.opts.max_new_tokens - len(self.generated) == 1 or int(self.root) in self.eos:
            return self.finish([int(self.root)], None, nodes=(0,), size=0)
        return None

    @property
    def exact(self) -> bool:
        """Whether this row's output is the same whatever tree verifies it (greedy, lossless sampling)."""
        return self.greedy or self.opts.sampling.mode == "lossless"

    def proposal(self, tree: TreeShapes | None = None, drafts: bool = True) -> Proposal:
        """What the proposer needs of this row: its tree, root, hidden state, context and room. `tree`: the
        tree the load asks for this step (load.py), taken by an exact row: the root alone (no candidates),
        or a calibrated tree in place of the engine's; `drafts`: whether such a row adds context drafts (not
        where the load's costs were calibrated without them). The root alone where the cache has no room."""
        room, shapes, context = self.capacity - self.length, self.shapes, self.context
        if tree is not None and self.exact:
            if tree.nodes == 1 or shapes is self.engine.tree:
                shapes = tree
            context = context if drafts and tree.nodes > 1 else None
        if room < shapes.nodes:
            return Proposal(self.engine.root_only, self.root, self.last_hidden, None, room)
        return Proposal(shapes, self.root, self.last_hidden, context, room)

    def accept(self, c: Candidates, v: Verified) -> torch.Tensor:
        """The accepted nodes (root first); sets the next root (greedy, lossless) or the logits to draw it from."""
        if v.choice is not None:
            best, n_acc = accept_greedy(v.choice, c.tokens, c.tree)
        else:
            best, n_acc, self.root = accept(v.logits, c.tokens, c.tree, self.opts.sampling, self.gen)
        path = c.tree.retrieve[best, : n_acc + 1]
        last = path[-1]
        self.last_hidden = v.hidden[last]
        if v.choice is not None:
            self.root = v.choice[last]          # greedy: the next root is the base's choice after the last node
        else:
            self.last_logits = v.logits[last]
        return path

    def advance(self, c: Candidates, path: torch.Tensor) -> Step:
        """After the cache kept `path`: count it, and apply the stops to its tokens."""
        self.length += path.numel()
        new = c.tokens[path].tolist()
        if self.context is not None:
            self.context.extend(new)
        return self.finish(new, None, nodes=tuple(path.tolist()), size=c.tokens.numel())

    def finish(self, new: list[int], reason: str | None, nodes: tuple = (), size: int = 0) -> Step:
        """This step's Step: the new tokens cut at EOS, the token budget or a stop string."""
        remaining = self.opts.max_new_tokens - len(self.generated)
        cut = next((i + 1 for i, tok in enumerate(new) if tok in self.eos), None)
        if cut is not None:
            new, reason = new[:cut], "eos"
        if len(new) >= remaining:
            new, reason = new[:remaining], reason or "length"
        self.generated += new
        k = stop_index(self.engine.tokenizer, self.generated, len(new), self.opts.stop_strings)
        if k is not None:
            del self.generated[len(self.generated) - len(new) + k:]
            new, reason = new[:k], "stop"
        if reason is None and self.length >= self.capacity:
            reason = "context"
        seconds, self.seconds = self.seconds, 0.0
        return Step(torch.tensor(new, dtype=torch.long, device=self.engine.device), seconds, reason, nodes=nodes,
                    tree_size=size, row=self.key)

