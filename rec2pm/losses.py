"""Next-item losses over the catalogue, tied to the item embeddings.

Item 0 is padding: it is never a candidate and never a target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("full", "sampled", "bce")


def full_softmax_loss(hidden: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (n, d)`` against every item ``1..N`` of ``item_weight (N+1, d)``."""
    if targets.numel() == 0:
        return hidden.sum() * 0
    logits = hidden @ item_weight[1:].T
    return F.cross_entropy(logits, targets - 1)


def sampled_softmax_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_weight: torch.Tensor,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
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


def random_other_items(
    targets: torch.Tensor, num_items: int, per_row: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(n, per_row)`` items drawn uniformly from ``1..N`` without the row's own target.

    Drawing from ``N - 1`` values and stepping over the target keeps the draw exactly
    uniform over the other items, with no rejection loop.
    """
    draw = torch.randint(1, num_items, (targets.numel(), per_row), generator=generator, device=targets.device)
    return draw + (draw >= targets[:, None]).long()


def binary_cross_entropy_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_weight: torch.Tensor,
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SASRec's and S3-Rec's loss: ``-log sigmoid(s_pos) - sum log(1 - sigmoid(s_neg))`` per row.

    Each row draws ``num_negatives`` items uniformly from the catalogue other than its own
    target (S3-Rec draws one per position, from the items outside the user's history; with
    histories of about ten items in catalogues of ten thousand the two differ in well under
    one draw per thousand).  The mean is over rows.
    """
    if targets.numel() == 0:
        return hidden.sum() * 0
    num_items = item_weight.shape[0] - 1
    if num_items < 2:
        raise ValueError(f"the bce loss needs at least 2 items to draw a negative, got {num_items}")
    negatives = random_other_items(targets, num_items, num_negatives, generator)
    positive = (hidden * item_weight[targets]).sum(-1)
    negative = torch.einsum("nd,nkd->nk", hidden, item_weight[negatives])
    return (F.softplus(-positive) + F.softplus(negative).sum(-1)).mean()


def next_item_loss(
    kind: str, hidden: torch.Tensor, targets: torch.Tensor, item_weight: torch.Tensor, num_negatives: int = 256
) -> torch.Tensor:
    if kind == "full":
        return full_softmax_loss(hidden, targets, item_weight)
    if kind == "sampled":
        return sampled_softmax_loss(hidden, targets, item_weight, num_negatives)
    if kind == "bce":
        return binary_cross_entropy_loss(hidden, targets, item_weight, num_negatives)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
