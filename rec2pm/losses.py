"""Next-item losses over the catalogue, tied to the item embeddings.

Item 0 is padding: it is never a candidate and never a target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("full", "sampled")


def full_softmax_loss(hidden: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (n, d)`` against every item ``1..N`` of ``item_weight (N+1, d)``."""
    if targets.numel() == 0:
        return hidden.sum() * 0
    logits = hidden @ item_weight[1:].T
    return F.cross_entropy(logits, targets - 1)


def sampled_softmax_loss(hidden: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor,
                         num_negatives: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Softmax over the target, the other rows' targets (in-batch) and uniform random negatives.

    Candidates equal to the row's own target (accidental hits) are masked out.
    """
    if targets.numel() == 0:
        return hidden.sum() * 0
    num_items = item_weight.shape[0] - 1
    random = torch.randint(1, num_items + 1, (num_negatives,), generator=generator, device=targets.device)
    candidates = torch.cat([targets, random])  # column i < n is row i's positive
    logits = hidden @ item_weight[candidates].T
    hit = candidates[None, :] == targets[:, None]
    own = torch.arange(targets.numel(), device=targets.device)
    hit[own, own] = False
    logits = logits.masked_fill(hit, float("-inf"))
    return F.cross_entropy(logits, own)


def next_item_loss(kind: str, hidden: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor,
                   num_negatives: int = 256) -> torch.Tensor:
    if kind == "full":
        return full_softmax_loss(hidden, targets, item_weight)
    if kind == "sampled":
        return sampled_softmax_loss(hidden, targets, item_weight, num_negatives)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
