"""The decode loop, in one place: prefill, then propose -> verify -> accept -> compact, one step at a time.

Candidates: the heads' guesses laid out as the tree, plus (when on) a chain of tokens copied from the context
(lookup.py). Verification runs the stock transformers model over all of them in ONE forward pass, with a
4D additive float mask (0 = attend, dtype min = blocked) and explicit position ids over the KV cache.
All per-request state lives in local variables; nothing is stored on the model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.profiler import record_function

from medusa.inference.acceptance import SamplingOptions, accept, accept_greedy, next_token
from medusa.inference.cache import TreeCache
from medusa.inference.dynamic import propose_dynamic
from medusa.inference.heads import propose
from medusa.inference.lookup import ContextIndex, LookupOptions
from medusa.inference.packed_linear import engaged, padded_rows
from medusa.inference.tree import DynamicTree, TreeBuffers, tree_buffers, with_drafts
from medusa.inference.tree_attention import path_groups, step_index, uses_tree_attention


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
    finish_reason: str | None = None   # on the last step: "eos", "stop", "length" or "context"
    nodes: tuple[int, ...] = ()        # the accepted tree nodes (0 = root), before any stop trimming
    tree_size: int = 1                 # nodes verified this step (0: a last token emitted unverified)

    @property
    def accepted(self) -> int:
        """Tokens this step produced (the root plus accepted candidates, after any stop trimming)."""
        return self.tokens.numel()


class _Trees:
    """The step's tree with 0..max_tokens context drafts appended, and its mask or path groups, built once each
    (a dynamic tree's: once per shape it takes)."""

    def __init__(self, tree: TreeBuffers | DynamicTree, device, dtype, tree_attention: bool):
        self.tree, self.device, self.dtype, self.tree_attention = tree, device, dtype, tree_attention
        self.cache: dict[tuple, tuple] = {}

    @property
    def nodes(self) -> int:
        return self.tree.num_nodes

    def get(self, drafted: int, paths: tuple = ()) -> tuple[TreeBuffers, object]:
        """-> (tree, its medusa_tree path groups or its additive (N, N) mask). `paths`: a dynamic tree's
        choice this step."""
        key = (paths, drafted)
        if key not in self.cache:
            heads_tree = tree_buffers(list(paths)) if isinstance(self.tree, DynamicTree) else self.tree
            t = with_drafts(heads_tree, drafted).to(self.device)
            self.cache[key] = (t, path_groups(t) if self.tree_attention else _additive(t, self.dtype))
        return self.cache[key]


class _MaskBuffer:
    """The (1, 1, N, L + N) additive mask, kept in one preallocated buffer and updated incrementally."""

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device):
        self.min = torch.finfo(dtype).min
        self.buf = torch.full((1, 1, n, capacity), self.min, dtype=dtype, device=device)
        self.committed = 0  # columns [0, committed) are already 0 (visible to every node)

    def view(self, length: int, block: torch.Tensor) -> torch.Tensor:
        n = block.shape[0]
        self.buf[..., self.committed:length] = 0
        self.committed = length
        self.buf[0, 0, :n, length:length + n] = block
        return self.buf[:, :, :n, :length + n]


def _additive(tree: TreeBuffers, dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=tree.attn_mask.device)
    return torch.where(tree.attn_mask, zero, torch.finfo(dtype).min)


NO_LOGITS = torch.empty(0, dtype=torch.long)   # logits_to_keep for a forward whose logits nobody reads


def _forward(model, ids, cache, positions, mask=None, logits_to_keep=0, **extra):
    with engaged():   # packed weights serve this loop's products (packed_linear.py), never `generate`'s
        out = model(input_ids=ids, past_key_values=cache, position_ids=positions, attention_mask=mask,
                    use_cache=True, output_hidden_states=True, logits_to_keep=logits_to_keep, **extra)
    # logits and the heads' input come from the same forward (soft-capped models need out.logits)
    return out.logits[0], out.hidden_states[-1][0]


def _verify(run, greedy_head, tokens, cache, positions, **extra):
    """The tree's forward -> (logits (N, V) or None, hidden (N, H), the base's greedy choice per node or None).
    With `greedy_head` (greedy decoding, greedy_head.py) the model skips its output projection."""
    if greedy_head is None:
        return (*_forward(run, tokens[None], cache, positions, **extra), None)
    _, hidden = _forward(run, tokens[None], cache, positions, logits_to_keep=NO_LOGITS, **extra)
    return None, hidden, greedy_head(hidden)


def _stop_index(tokenizer, generated: list[int], n_new: int, stop_strings) -> int | None:
    """If a stop string appears, how many of this step's n_new tokens to keep (the one completing it included)."""
    if not stop_strings or tokenizer is None:
        return None
    done = len(generated) - n_new
    if not any(s in tokenizer.decode(generated) for s in stop_strings):
        return None
    for k in range(1, n_new + 1):
        if any(s in tokenizer.decode(generated[:done + k]) for s in stop_strings):
            return k
    return n_new


@torch.inference_mode()
def medusa_decode(model, heads, input_ids: torch.Tensor, tree: TreeBuffers | DynamicTree, opts: DecodeOptions, *,
                  context_limit: int, tokenizer=None, draft_head=None,
                  lookup: LookupOptions | None = None, forward=None, greedy_head=None) -> Iterator[Step]:
    """Yield one Step per decoding step. input_ids: (1, T) on the model's device. `tree`: a static tree's
    buffers, or a DynamicTree (its paths chosen each step from the heads' probabilities). `draft_head`: the projection
    for the heads' guesses (default: the model's lm_head; see heads.draft_projection). `lookup`: also verify
    tokens copied from the context each step (lookup.py). `forward`: what runs the model's forward passes,
    e.g. `compiled.compile_forward(model)` (default: the model itself). `greedy_head`: the base's argmax at each
    node without its fp32 output projection (greedy_head.py), used for greedy decoding without `forward`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"medusa decodes one sequence at a time: input_ids must be (1, T), got {tuple(input_ids.shape)}")
    prompt_len = input_ids.shape[1]
    if prompt_len == 0:
        raise ValueError("empty prompt")
    if prompt_len >= context_limit:
        raise PromptTooLongError(f"prompt is {prompt_len} tokens but the model's context is {context_limit}")
    device, dtype = input_ids.device, next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float16
    lookup = lookup if lookup is not None and lookup.enabled else None
    # rows a step pays for anyway (packed products pad up to their row count): context drafts may fill them
    pad = padded_rows(model) if lookup and forward is None else None
    most = tree.num_nodes + (lookup.max_tokens if lookup else 0)
    most = pad(most) if pad is not None else most
    capacity = min(context_limit, prompt_len + opts.max_new_tokens + most)
    cache = TreeCache.for_model(model, capacity)
    # medusa_tree attention takes each node's path instead of a mask (see tree_attention.py); lone roots need neither
    tree_attention = uses_tree_attention(model)
    trees, root_only = _Trees(tree, device, dtype, tree_attention), _Trees(tree_buffers([]), device, dtype, tree_attention)
    mask = None if tree_attention else _MaskBuffer(most, capacity, dtype, device)
    context = ContextIndex(input_ids[0].tolist(), lookup) if lookup else None
    draft_head = draft_head if draft_head is not None else model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    gen = torch.Generator(device=device).manual_seed(opts.seed) if opts.seed is not None else None
    eos = set(opts.eos_token_ids)
    run = forward if forward is not None else model
    greedy_head = greedy_head if opts.sampling.greedy and forward is None else None

    t0 = time.perf_counter()
    input_ids = input_ids.clone()   # an inference tensor like every later input: one compiled graph serves both
    positions = torch.arange(prompt_len, device=device)[None]
    with record_function("medusa.prefill"):
        logits, hidden = _forward(run, input_ids, cache, positions, logits_to_keep=1)
    last_logits, last_hidden = logits[-1], hidden[-1]
    length, generated, root = prompt_len, [], None
    prefill_seconds = time.perf_counter() - t0

    while True:
        t0 = time.perf_counter()
        remaining, room = opts.max_new_tokens - len(generated), capacity - length
        if room < 1:
            yield Step(torch.empty(0, dtype=torch.long, device=device), 0.0, "context")
            return
        root = root if root is not None else next_token(last_logits, opts.sampling, gen)
        if remaining == 1 or int(root) in eos:
            # the last token needs no forward pass: nothing will read its KV entry or its logits
            new, nodes, size = [int(root)], (0,), 0
        else:
            source = trees if room >= tree.num_nodes else root_only
            # propose: the root is the base's own next token; the heads fill the rest of the tree, and context
            # drafts (if on) add a chain under the root
            with record_function("medusa.propose"):
                n_tree = source.nodes
                fill = (lambda n: pad(n_tree + n) - n_tree) if pad is not None else None
                drafts = context.draft(int(root), room - n_tree, fill) if context is not None else []
                if isinstance(source.tree, DynamicTree) and n_tree > 1:
                    paths, pick = propose_dynamic(heads, source.tree, last_hidden, root, draft_head, embedding)
                    t, shape = source.get(len(drafts), paths)
                    tokens = pick(t)
                else:
                    t, shape = source.get(len(drafts))
                    tokens = propose(heads, t, last_hidden, root, draft_head, embedding)
                if drafts:
                    tokens = torch.cat([tokens, torch.tensor(drafts, dtype=torch.long, device=device)])  # (N,)
            # verify: one forward over the whole tree
            with record_function("medusa.verify"):
                # a lone root needs no mask: the model's own causal path then matches `generate` exactly
                positions = (length + t.depth)[None]
                if t.num_nodes == 1:
                    logits, hidden, choice = _verify(run, greedy_head, tokens, cache, positions)
                elif tree_attention:
                    logits, hidden, choice = _verify(run, greedy_head, tokens, cache, positions,
                                                     medusa_tree=step_index(shape, length))
                else:
                    logits, hidden, choice = _verify(run, greedy_head, tokens, cache, positions,
                                                     mask=mask.view(length, shape))
            with record_function("medusa.accept"):
                if choice is not None:
                    best, n_acc = accept_greedy(choice, tokens, t)
                else:
                    best, n_acc, root = accept(logits, tokens, t, opts.sampling, gen)
                path = t.retrieve[best, : n_acc + 1]                                  # accepted nodes
            # compact: keep only the accepted nodes' KV entries
            with record_function("medusa.compact"):
                cache.compact(length, path)
            length += path.numel()
            last_hidden = hidden[path[-1]]
            if choice is not None:
                root = choice[path[-1]]         # greedy: the next root is the base's choice after the last node
            else:
                last_logits = logits[path[-1]]
            new, nodes, size = tokens[path].tolist(), tuple(path.tolist()), t.num_nodes
            if context is not None:
                context.extend(new)

        finish = None
        cut = next((i + 1 for i, tok in enumerate(new) if tok in eos), None)
        if cut is not None:
            new, finish = new[:cut], "eos"
        if len(new) >= remaining:
            new, finish = new[:remaining], finish or "length"
        generated += new
        k = _stop_index(tokenizer, generated, len(new), opts.stop_strings)
        if k is not None:
            del generated[len(generated) - len(new) + k:]
            new, finish = new[:k], "stop"
        if finish is None and length >= capacity:
            finish = "context"
        seconds = time.perf_counter() - t0 + prefill_seconds
        prefill_seconds = 0.0
        yield Step(torch.tensor(new, dtype=torch.long, device=device), seconds, finish, nodes=nodes,
                   tree_size=size)
        if finish:
            return
