"""Trees fitted to a model and a machine (`medusa calibrate`).

1. Measure how often head i's rank-r guess is the true token (on greedy continuations of calibration data).
2. For each node budget, build the tree that maximizes the expected tokens per step: the paper's greedy
   construction, where a path's chance of being accepted is the product of its heads' rank accuracies; and
   a dynamic tree of that size (tree.DynamicTree: the same construction at every step from the heads' own
   probabilities). Count the tokens each would accept on the calibration data.
3. Time real decoding steps with each of those trees on this machine (in `rounds` passes over all of them, so
   that a shared machine's drift and bursts fall on every tree alike), and keep the tree with the most
   expected tokens per second. The tree is saved beside the heads, where the loader picks it up.
"""
from __future__ import annotations

import gc
import itertools
import json
import statistics
from pathlib import Path

import torch

from medusa.chat_format import encode_prompt
from medusa.inference.draft_head import draft_projection
from medusa.inference.dynamic import grow
from medusa.inference.tree import DynamicTree, most_likely_paths, tree_nodes, tree_spec
from medusa.training.accuracy import accuracy_by_rank, assistant_positions, guess_table
from medusa.training.data import Example

DEFAULT_BUDGETS = (1, 4, 8, 12, 16, 24, 32, 48, 64)


def expected_tokens(tree: list[tuple[int, ...]], acc: torch.Tensor) -> float:
    """1 (the root) + the sum over nodes of the chance that the whole path to the node is accepted."""
    total = 1.0
    for path in tree:
        p = 1.0
        for depth, r in enumerate(path):
            p *= float(acc[depth, r])
        total += p
    return total


def time_steps(model, ids: torch.Tensor, tree, *, steps: int = 12) -> list[float]:
    """Seconds of `steps` decoding steps with `tree` (the whole step: heads, verify, accept, compact), after the
    prefill's, with no context drafts: they come on top of the calibrated tree, only on steps where the context
    offers some."""
    stream = model.stream(ids, max_new_tokens=steps * 8, tree=tree, lookup=0, eos_token_id=[])
    times = [s.seconds for s in itertools.islice(stream, steps + 1)]   # the rest of the answer is never run
    return times[1:] or times


def measured_tokens(tree, probs: torch.Tensor, hit: torch.Tensor) -> float:
    """Mean tokens a step accepts at these positions (`guess_table`'s probs and hit, every head with a target):
    1 (the root) + `accepted_depths`."""
    return 1 + float(accepted_depths(tree, probs, hit).float().mean()) if hit.shape[1] else 1.0


def accepted_depths(tree, probs: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """(n,) candidates a tree accepts at each position: the depth of its deepest path whose guesses are all
    right (`guess_table`'s probs and hit (K, n, R)). `tree`: a static tree's paths, or a DynamicTree, which
    chooses its paths at each position from the heads' probabilities there (for heads that take their
    parent's token, see `dynamic_accepted`: their guesses depend on the path)."""
    K, n, _ = hit.shape
    best = torch.zeros(n, dtype=torch.long)
    if isinstance(tree, DynamicTree):
        depth, hits = tree.depth(K), hit.permute(1, 0, 2).tolist()
        for j, (p_j, h_j) in enumerate(zip(probs[:, :, : tree.topk].permute(1, 0, 2).tolist(), hits)):
            chosen = most_likely_paths(p_j[:depth], tree.nodes)
            best[j] = max((len(p) for p in chosen if all(h_j[d][r] for d, r in enumerate(p))), default=0)
        return best
    for path in tree:
        ok = torch.ones(n, dtype=torch.bool)
        for d, r in enumerate(path):
            ok &= hit[d, :, r]
        best = torch.maximum(best, ok * len(path))
    return best


@torch.inference_mode()
def dynamic_accepted(heads, hidden: torch.Tensor, next_embeds: torch.Tensor, tgt: torch.Tensor, lm_head, embedding,
                     *, width: int, topk: int = 10, chunk: int = 64) -> torch.Tensor:
    """Heads that take their parent's token, grown as at decode time (dynamic.grow: each node's children follow
    that node's own token, right or wrong) at n positions: `hidden` (n, H), the root's embedding `next_embeds`
    (n, H), the text's tokens `tgt` (K, n) (-1: none). -> (n, width): for the `width` most probable nodes in
    the order a DynamicTree chooses them, the candidates accepted if that node's path were the deepest
    chosen one (its depth when all its tokens are the text's, else 0). A DynamicTree of b nodes accepts 1 (the
    root) + the max over the first b - 1."""
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


def calibrate(model, examples: list[Example], timing_ids: torch.Tensor, *, budgets=DEFAULT_BUDGETS,
              max_rank: int = 10, rounds: int = 3, dynamic: bool = True, log=print) -> dict:
    """For each budget, the static tree with the most expected tokens per step and (with `dynamic`, for heads
    that allow it, budgets of 3+ nodes) a DynamicTree of that size; each one's tokens per step measured on the
    examples' positions and its steps timed here. -> {"best": the row with the most tokens per second, "rows",
    "rank_accuracy"}."""
    from medusa.inference.tree_attention import rows_independent, uses_tree_attention

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")

    if uses_tree_attention(model.base_model):   # larger trees would lose bit-exactness with generate
        exact = [b for b in budgets if rows_independent(model.base_model, b)]
        if len(exact) < len(budgets):
            log(f"medusa_tree attention is exact here up to {max(exact, default=1)} nodes: "
                f"skipping budgets {sorted(set(budgets) - set(exact))}")
        budgets = exact or [1]
    # heads that follow their parent's token: a dynamic tree's children hang on tokens off the text, grown
    # below from the same pass of the base model over the examples
    dynamic_budgets = [b for b in budgets if dynamic and b >= 3]
    grow_budgets = dynamic_budgets if model.heads.config.parent_token_input else []
    with torch.inference_mode():
        positions = list(assistant_positions(model.base_model, model.heads, examples)) if grow_budgets else None
    probs, hit, valid = guess_table(model.base_model, model.heads, examples, max_rank=max_rank, positions=positions)
    acc = accuracy_by_rank(hit, valid)
    log("rank accuracy (head x rank): " + json.dumps([[round(x, 3) for x in row[:5]] for row in acc.tolist()]))
    full = valid.all(0)                       # positions where a path of any depth can be judged
    probs, hit = probs[:, full], hit[:, full]
    trees = [(b, most_likely_paths(acc, b) if b > 1 else []) for b in budgets]
    trees += [(b, DynamicTree(b, topk=max_rank)) for b in dynamic_budgets]
    grown = dynamic_parent_tokens(model.base_model, model.heads, examples, grow_budgets, topk=max_rank,
                                  positions=positions) if grow_budgets else {}
    time_steps(model, timing_ids, "root", steps=2)  # warm-up
    times: list[list[float]] = [[] for _ in trees]
    for _ in range(rounds):
        for i, (_, tree) in enumerate(trees):
            times[i] += time_steps(model, timing_ids, tree or "root")
    rows = []
    for i, (budget, tree) in enumerate(trees):
        sec = statistics.median(times[i])
        exp = grown[budget] if isinstance(tree, DynamicTree) and grown else measured_tokens(tree, probs, hit)
        kind = "dynamic" if isinstance(tree, DynamicTree) else "static"
        rows.append({"budget": budget, "nodes": tree_nodes(tree), "dynamic": kind == "dynamic",
                     "expected_tokens_per_step": round(exp, 3), "step_ms": round(sec * 1000, 2),
                     "expected_tokens_per_s": round(exp / sec, 2), "tree": tree})
        log(f"budget {budget:3d} {kind:7s}: {exp:.2f} tokens/step, {sec * 1000:.1f} ms/step, "
            f"{exp / sec:.1f} tokens/s expected")
    best = max(rows, key=lambda r: r["expected_tokens_per_s"])
    return {"best": best, "rows": rows, "rank_accuracy": acc.tolist()}


def save_tree(folder: str | Path, result: dict, device_type: str) -> Path:
    """tree.json beside the heads (read by the loader), as the tree for `device_type` ("cpu", "cuda", ...),
    with the calibration figures for reference and, where `result` has one, the load table (step costs by rows,
    calibrate_load.py). Trees saved for other device types are kept."""
    path = Path(folder) / "tree.json"
    path.parent.mkdir(parents=True, exist_ok=True)   # a new --save-to folder: never lose the run at its end
    data = json.loads(path.read_text()) if path.is_file() else {}
    data = {"paths": data} if isinstance(data, list) else data
    best = result["best"]
    data.setdefault("devices", {})[device_type] = {
        "paths": tree_spec(best["tree"]),
        "calibration": {k: v for k, v in best.items() if k != "tree"} |
                       {"budgets": [{k: v for k, v in r.items() if k != "tree"} for r in result["rows"]]}}
    if result.get("load") is not None:
        data["devices"][device_type]["load"] = result["load"].to_json()
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def timing_prompt(tokenizer) -> torch.Tensor:
    """The prompt whose decoding steps calibration times: (1, P) ids."""
    return encode_prompt(tokenizer, [{"role": "user", "content": "Write a story about a lighthouse."}])


def calibrate_trained(cfg, *, log=print) -> dict | None:
    """The brief calibration that ends `medusa train`: the heads just saved in `cfg.output` (a TrainConfig),
    loaded as decoding loads them, on this machine, measured on the run's held-out conversations, each budget
    timed in two rounds; the chosen tree saved for this device type. None, said in the log, where no
    conversation was held out or the tree saved is newer than the heads."""
    from medusa.chat_format import use_template
    from medusa.inference.checkpoint import OUR_WEIGHTS, TREE_FILE
    from medusa.inference.loading import resolve_device
    from medusa.inference.tree import default_tree, read_tree_file, tree_label
    from medusa.model import MedusaModel
    from medusa.training.trainer import split_examples

    folder = Path(cfg.output)
    kind, trees = resolve_device(None).type, folder / TREE_FILE      # where decoding runs by default
    if trees.is_file() and kind in read_tree_file(trees) and \
            trees.stat().st_mtime >= (folder / OUR_WEIGHTS).stat().st_mtime:
        log(f"{trees} already holds a tree for {kind} calibrated for these heads")
        return None
    gc.collect()                      # the training's copy of the base, before a second one loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = MedusaModel.from_pretrained(folder, dtype=cfg.base_dtype, quantize=cfg.quantize, log=lambda m: None)
    use_template(model.tokenizer, cfg.chat_template, log=lambda m: None)
    held_out, _ = split_examples(cfg, model.tokenizer, warn=lambda m: None)
    if not held_out:
        why = "--val-examples 0" if cfg.val_examples == 0 else "--data has under 10 usable ones"
        log(f"No tree calibrated: no conversation was held out ({why}). Decoding on {kind} uses the "
            f"{default_tree(kind)} preset until `medusa calibrate` fits one.")
        return None
    log(f"Calibrating the tree for {kind} on the {len(held_out)} held-out conversations (two timing rounds; "
        f"--no-calibrate skips this, `medusa calibrate` measures longer) ...")
    result = calibrate(model, held_out, timing_prompt(model.tokenizer), rounds=2, log=log)
    path = save_tree(folder, result, kind)
    best = result["best"]
    log(f"Saved the tree for {kind} in {path}: {tree_label(best['tree'])}, {best['expected_tokens_per_step']} "
        f"tokens/step and {best['expected_tokens_per_s']} tokens/s expected")
    return result


def examples_from_prompts(model, prompts, *, max_new_tokens: int = 128) -> list[Example]:
    """Calibration data from prompts alone: the model's own greedy answers (the text it will produce)."""
    out = []
    for rec in prompts:
        ids = encode_prompt(model.tokenizer, [{"role": "user", "content": rec.turns[0]}])
        full = model.generate(ids, max_new_tokens=max_new_tokens)[0]
        out.append(answer_example(ids, full[ids.shape[1]:]))
    return out


def answer_example(prompt_ids: torch.Tensor, answer: torch.Tensor) -> Example:
    """A prompt ((1, P) or (P,)) and the model's answer to it as one Example, the answer as the assistant's."""
    prompt_ids, answer = prompt_ids.reshape(-1).cpu(), answer.reshape(-1).cpu()
    mask = torch.zeros(prompt_ids.numel() + answer.numel(), dtype=torch.bool)
    mask[prompt_ids.numel():] = True
    return Example(torch.cat([prompt_ids, answer]), mask)
