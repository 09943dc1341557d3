"""Evaluating heads: per-head top-k accuracy on held-out conversations, and mean tokens per step (greedy)
on a prompt file. Both work on any heads a user has."""
from __future__ import annotations

import time

import torch

from medusa.training.data import Example, collate
from medusa.training.losses import targets


@torch.inference_mode()
def head_accuracy(base, heads, examples: list[Example], *, ks=(1, 5, 10), batch_size: int = 8) -> dict:
    """Fraction of assistant tokens t+2+i that head i ranks in its top k, for each k in `ks`."""
    if not examples:
        return {}
    device = base.get_input_embeddings().weight.device
    lm_head = base.get_output_embeddings()
    hits = torch.zeros(heads.num_heads, len(ks))
    counts = torch.zeros(heads.num_heads)
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[s:s + batch_size]).items()}
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True).hidden_states[-1]
        head_dtype = next(heads.parameters()).dtype
        for i, head in enumerate(heads.heads):
            keep, target = targets(i, batch["input_ids"], batch["loss_mask"])
            if target.numel() == 0:
                continue
            feats = head.features(hidden[:, : keep.shape[1]][keep].to(head_dtype))
            logits = lm_head(feats.to(lm_head.weight.dtype)) if head.proj is None else head.proj(feats)
            top = logits.topk(max(ks), dim=-1).indices
            for j, k in enumerate(ks):
                hits[i, j] += (top[:, :k] == target[:, None]).any(-1).sum().item()
            counts[i] += target.numel()
    acc = hits / counts.clamp(min=1)[:, None]
    return {f"top{k}": [round(x, 4) for x in acc[:, j].tolist()] for j, k in enumerate(ks)} | {
        "tokens": int(counts[0].item())}


def tokens_per_step(model, prompts, *, max_new_tokens: int = 256, tree=None, log=None) -> dict:
    """Greedy decoding of each prompt's first turn with the model's chat template."""
    from medusa.interfaces.chat import encode_prompt

    tokens = steps = 0
    t0 = time.perf_counter()
    for n, rec in enumerate(prompts, 1):
        ids = encode_prompt(model.tokenizer, [{"role": "user", "content": rec.turns[0]}])
        for step in model.stream(ids, max_new_tokens=max_new_tokens, tree=tree):
            tokens += step.accepted
            steps += 1
        if log:
            log(f"{n}/{len(prompts)}: {tokens / max(steps, 1):.3f} tokens/step so far")
    return {"prompts": len(prompts), "new_tokens": tokens, "steps": steps,
            "tokens_per_step": round(tokens / max(steps, 1), 4), "seconds": round(time.perf_counter() - t0, 1)}
