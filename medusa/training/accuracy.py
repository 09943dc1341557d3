"""Per-head accuracy on conversations: at every assistant position, where each head ranks the token it should
guess (t+2+i for head i), guessing as at decode time. Training reports it on held-out conversations; the
evaluation and calibration of any heads build on the same table."""
from __future__ import annotations

import torch

from medusa.inference.draft_head import draft_projection
from medusa.inference.heads import ranked_guesses, true_inputs
from medusa.inference.quantized import device_of
from medusa.training.data import Example, collate
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
    device = device_of(embedding)
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
