"""The Medusa heads loss. The shift is the whole trick: the base's own head at position t predicts token
t+1, so Medusa head i (from 0) at position t predicts token t+2+i. Only assistant tokens are targets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class HeadStats:
    loss: torch.Tensor      # (K,) per-head mean loss
    top1: torch.Tensor      # (K,) accuracy of the head's best guess
    top5: torch.Tensor      # (K,) true token among its 5 best
    count: torch.Tensor     # (K,) number of target tokens
    base_kl: torch.Tensor | None = None   # Medusa-2: how far the adapted base moved from the original


def targets(i: int, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """Where head i is trained: positions t with an assistant token at t+2+i. Returns (keep (B, T-2-i), target)."""
    s = 2 + i
    keep = loss_mask[:, s:]
    return keep, input_ids[:, s:][keep]


def medusa_loss(features: torch.Tensor, project: Callable[[int, torch.Tensor], torch.Tensor],
                input_ids: torch.Tensor, loss_mask: torch.Tensor, *, decay: float = 0.8,
                teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
                vocab_map: torch.Tensor | None = None) -> tuple[torch.Tensor, HeadStats]:
    """features (K, B, T, H): each head's output before its projection; project(i, x (n, H)) -> logits (n, V),
    applied only at trained positions (a full (K, B, T, V) tensor would not fit for large vocabularies).
    `vocab_map` (V,): when `project` scores only some tokens (a draft vocabulary), token id -> its output
    index, -1 for the others; targets outside are skipped and the teacher's mass is renormalised over the rest.

    Loss = sum_i decay**i * loss_i; loss_i is CE to the true token t+2+i, or with `teacher` = (top-k
    logprobs (B, T, k), their ids (B, T, k)) of the base model, KL from the base's own distribution for
    that token (which sits at position t+1+i) to the head's."""
    K = features.shape[0]
    losses, top1, top5, counts = [], [], [], []
    for i in range(K):
        keep, target = targets(i, input_ids, loss_mask)
        if vocab_map is not None:
            mapped = vocab_map[target]
            keep = keep.masked_scatter(keep, mapped >= 0)
            target = mapped[mapped >= 0]
        n = target.numel()
        if n == 0:
            zero = features[i].sum() * 0.0
            losses.append(zero), top1.append(zero.detach()), top5.append(zero.detach()), counts.append(0)
            continue
        logits = project(i, features[i][:, : keep.shape[1]][keep])                 # (n, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        if teacher is None:
            loss = F.nll_loss(logp, target)
        else:
            t_logp, t_idx = (x[:, 1 + i:-1][keep] for x in teacher)
            t_idx = t_idx.long() if vocab_map is None else vocab_map[t_idx.long()]
            valid = t_idx >= 0
            t_logp = t_logp.float().masked_fill(~valid, float("-inf"))                 # renormalise top-k
            t_logp = (t_logp - torch.logsumexp(t_logp, dim=-1, keepdim=True).clamp(min=-1e4)).masked_fill(~valid, 0)
            loss = (t_logp.exp() * valid * (t_logp - logp.gather(-1, t_idx.clamp(min=0)))).sum(-1).mean()
        with torch.no_grad():
            best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            top1.append((best[:, 0] == target).float().mean())
            top5.append((best == target[:, None]).any(-1).float().mean())
        losses.append(loss)
        counts.append(n)
    per_head = torch.stack(losses)
    weights = torch.tensor([decay ** i for i in range(K)], device=per_head.device)
    stats = HeadStats(per_head.detach(), torch.stack(top1), torch.stack(top5), torch.tensor(counts))
    return (weights * per_head).sum(), stats
