"""Evaluating heads: per-head top-k accuracy on held-out conversations, and mean tokens per step (greedy)
on a prompt file. Both work on any heads a user has."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from medusa.inference.heads import draft_projection, ranked_guesses, true_inputs
from medusa.training.data import Example, collate
from medusa.training.jsonl import append_rows, read_rows
from medusa.training.features import last_hidden
from medusa.training.losses import targets


def head_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(K, B, T): the token head i should predict at (b, t), i.e. input_ids[b, t+2+i], or -1 where that is
    past the end or not an assistant token."""
    B, T = input_ids.shape
    out = torch.full((num_heads, B, T), -1, dtype=torch.long, device=input_ids.device)
    for i in range(num_heads):
        keep, target = targets(i, input_ids, loss_mask)
        out[i, :, : keep.shape[1]][keep] = target
    return out


def assistant_positions(base, heads, examples: list[Example], batch_size: int = 8):
    """Per batch of examples, the assistant positions with a target for some head (n of them): (the base's last
    hidden state (n, H), each head's target (K, n), -1 where none, the heads' true token inputs there). Run
    under torch.inference_mode(); `list()` it to hand one pass of the base model to several measures."""
    embedding = base.get_input_embeddings()
    device = embedding.weight.device
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[s:s + batch_size]).items()}
        hidden, _ = last_hidden(base, batch["input_ids"], batch["attention_mask"])
        tgt = head_targets(batch["input_ids"], batch["loss_mask"], heads.num_heads)   # (K, B, T)
        used = (tgt >= 0).any(0)                                                       # (B, T)
        yield hidden[used], tgt[:, used], true_inputs(heads, embedding, batch["input_ids"], used)


@torch.inference_mode()
def guess_table(base, heads, examples: list[Example], *, max_rank: int = 10, batch_size: int = 8,
                chunk: int = 256, positions=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per assistant position with a target for some head (n of them): (probs, hit, valid); probs and hit
    (K, n, max_rank): head i's probability for its rank-r guess (softmax, over the draft vocabulary where there
    is one) and whether that guess is token t+2+i; valid (K, n): whether head i has a target there. Heads
    guess as at decode time (through `draft_projection`), a chunk at a time; heads that take the next token
    get the true one (at decode time: the root, the base's own next token), and heads
    that take their parent's token the true one too (what a path still being accepted holds), so their
    accuracy is conditional on the path so far. `positions`: `assistant_positions` already run, else run here."""
    lm_head = draft_projection(base.get_output_embeddings(), heads)
    K = heads.num_heads
    probs, hits, valid = [], [], []
    positions = positions if positions is not None else assistant_positions(base, heads, examples, batch_size)
    for h, tgt, inputs in positions:                                                   # (n, H), (K, n)
        for c in range(0, h.shape[0], chunk):
            part = {k: v[..., c:c + chunk, :] for k, v in inputs.items()}
            p, top = ranked_guesses(heads(h[c:c + chunk], lm_head, **part), lm_head, max_rank)   # (K, n, R)
            probs.append(p.cpu())
            t = tgt[:, c:c + chunk]
            hits.append(((top == t[..., None]) & (t[..., None] >= 0)).cpu())
            valid.append((t >= 0).cpu())
    if not probs:
        return (torch.zeros(K, 0, max_rank), torch.zeros(K, 0, max_rank, dtype=torch.bool),
                torch.zeros(K, 0, dtype=torch.bool))
    return torch.cat(probs, 1), torch.cat(hits, 1), torch.cat(valid, 1)


@torch.inference_mode()
def dynamic_accepted(heads, hidden: torch.Tensor, next_embeds: torch.Tensor, tgt: torch.Tensor, lm_head, embedding,
                     *, width: int, topk: int = 10, chunk: int = 64) -> torch.Tensor:
    """Heads that take their parent's token, grown as at decode time (dynamic.grow: each node's children follow
    that node's own token, right or wrong) at n positions: `hidden` (n, H), the root's embedding `next_embeds`
    (n, H), the text's tokens `tgt` (K, n) (-1: none). -> (n, width): for the `width` most probable nodes in
    the order a DynamicTree chooses them, the candidates accepted if that node's path were the deepest
    chosen one (its depth when all its tokens are the text's, else 0). A DynamicTree of b nodes accepts 1 (the
    root) + the max over the first b - 1."""
    from medusa.inference.dynamic import grow

    parts = []
    for c in range(0, hidden.shape[0], chunk):
        g = grow(heads, hidden[c:c + chunk], next_embeds[c:c + chunk], lm_head, embedding,
                 depth=min(heads.num_heads, width), width=width, topk=topk)
        right, depths = [], []
        for d, ids in enumerate(g.ids):
            t = tgt[d, c:c + chunk, None]
            ok = (ids == t) & (t >= 0)
            right.append(ok if d == 0 else ok & right[-1].gather(1, g.parent[d]))
            depths.append(right[-1] * (d + 1))
        parts.append(torch.cat(depths, 1).gather(1, g.order())[:, :width])          # in choice order
    return torch.cat(parts) if parts else torch.zeros(0, width, dtype=torch.long)


def dynamic_parent_tokens(base, heads, examples: list[Example], budgets, *, topk: int = 10, batch_size: int = 8,
                          chunk: int = 64, positions=None) -> dict[int, float]:
    """Heads that take their parent's token with a DynamicTree of each budget (nodes): the mean tokens a step
    accepts at the positions where every head has a target (`dynamic_accepted`; one growth wide enough for the
    largest budget serves all). `positions`: `assistant_positions` already run, else run here."""
    lm_head = draft_projection(base.get_output_embeddings(), heads)
    embedding, most = base.get_input_embeddings(), max(budgets)
    total, n = {b: 0.0 for b in budgets}, 0
    positions = positions if positions is not None else assistant_positions(base, heads, examples, batch_size)
    for h, tgt, inputs in positions:
        full = (tgt >= 0).all(0)
        accepted = dynamic_accepted(heads, h[full], inputs["next_embeds"][full], tgt[:, full], lm_head, embedding,
                                    width=most - 1, topk=topk, chunk=chunk)
        for b in budgets:
            total[b] += float(accepted[:, : b - 1].amax(1).sum()) if b > 1 else 0.0
        n += accepted.shape[0]
    return {b: 1 + total[b] / max(n, 1) for b in budgets}


def rank_accuracy(base, heads, examples: list[Example], *, max_rank: int = 10, batch_size: int = 8) -> torch.Tensor:
    """(K, max_rank): the fraction of assistant tokens t+2+i that head i ranks exactly r-th (from 0)."""
    _, hit, valid = guess_table(base, heads, examples, max_rank=max_rank, batch_size=batch_size)
    return accuracy_by_rank(hit, valid)


def accuracy_by_rank(hit: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`guess_table`'s hit and valid -> (K, R): the fraction of each head's targets it ranks exactly r-th."""
    return hit.float().sum(1) / valid.sum(1).clamp(min=1)[:, None]


def head_accuracy(base, heads, examples: list[Example], *, ks=(1, 5, 10), batch_size: int = 8) -> dict:
    """Fraction of assistant tokens t+2+i that head i ranks in its top k, for each k in `ks`."""
    if not examples:
        return {}
    cum = rank_accuracy(base, heads, examples, max_rank=max(ks), batch_size=batch_size).cumsum(dim=1)
    tokens = sum(int(e.loss_mask[2:].sum()) for e in examples)
    return {f"top{k}": [round(x, 4) for x in cum[:, k - 1].tolist()] for k in ks} | {"tokens": tokens}


def _recorded(records: Path, run: str, settings: dict, warn=None) -> dict[str, dict]:
    """Prompt id -> its line in `records` for this run; a line of the same run from other settings is refused."""
    done = {}
    for line_no, row in read_rows(records, warn=warn):
        if row.get("run") != run or not isinstance(row.get("id"), str):
            continue
        theirs = row.get("settings") or {}
        if theirs != settings:
            diff = sorted(k for k in set(settings) | set(theirs) if settings.get(k) != theirs.get(k))
            raise ValueError(f"{records}:{line_no}: recorded with other settings ({', '.join(diff)}) than this "
                             f"{run!r} run: give another records file")
        done[row["id"]] = row
    return done


def tokens_per_step(model, prompts, *, max_new_tokens: int = 256, tree=None, lookup=None, log=None,
                    records: str | Path | None = None, run: str = "greedy", settings: dict | None = None) -> dict:
    """Greedy decoding of each prompt's first turn with the model's chat template. `lookup=0`: the heads alone,
    no context drafts (None: the model's setting). Prompts with a category (dev prompts, Spec-Bench) also get
    the figure per category. `records`: a JSONL file that gets a line per prompt as it is done (`run`, the
    caller's `settings` plus the tree, device type and dtype decoding used, id, category, tokens, steps,
    seconds); prompts it already holds for this run are not decoded again, so a stopped evaluation resumes
    where it was."""
    from medusa.chat_format import encode_prompt
    from medusa.inference.tree import load_tree, tree_fingerprint

    used = model.tree if tree is None else load_tree(tree, model.heads.num_heads, model.device_type)
    settings = dict(settings or {}, max_new_tokens=max_new_tokens, tree=tree_fingerprint(used),
                    device=model.device_type, dtype=str(model.base_model.dtype).removeprefix("torch."))
    done = _recorded(Path(records), run, settings, warn=log) if records else {}
    tokens = steps = 0
    seconds = 0.0
    by_category: dict[str, list[int]] = {}          # category -> [tokens, steps]
    for n, rec in enumerate(prompts, 1):
        row = done.get(rec.id)
        if row is None:
            ids = encode_prompt(model.tokenizer, [{"role": "user", "content": rec.turns[0]}])
            t0 = time.perf_counter()
            row = {"run": run, "settings": settings, "id": rec.id, "category": rec.category, "tokens": 0, "steps": 0}
            for step in model.stream(ids, max_new_tokens=max_new_tokens, tree=tree, lookup=lookup):
                row["tokens"] += step.accepted
                row["steps"] += 1
            row["seconds"] = round(time.perf_counter() - t0, 3)
            if records:
                append_rows(Path(records), [row])
        tokens, steps, seconds = tokens + row["tokens"], steps + row["steps"], seconds + row["seconds"]
        if rec.category is not None:
            c = by_category.setdefault(rec.category, [0, 0])
            c[0] += row["tokens"]
            c[1] += row["steps"]
        if log:
            log(f"{n}/{len(prompts)}: {tokens / max(steps, 1):.3f} tokens/step so far")
    report = {"prompts": len(prompts), "new_tokens": tokens, "steps": steps,
              "tokens_per_step": round(tokens / max(steps, 1), 4), "seconds": round(seconds, 1)}
    if by_category:
        report["by_category"] = {cat: round(t / max(s, 1), 4) for cat, (t, s) in sorted(by_category.items())}
    return report
