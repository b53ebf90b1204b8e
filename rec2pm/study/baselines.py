"""Count baselines of the study: the floor every trained model must clear.

* ``popularity``: every user gets the items ranked by how often they occur in the training
  histories (the same list for everyone).
* ``history-count``: each user's items ranked by how often they occur in the history the
  models read, ties (and unseen items) broken by popularity.  On generated histories this
  estimates the user's interest weights directly, so it is strong there; on real sets,
  which exclude seen items from the candidates, it reduces to popularity and is not run.

A model below its count baseline on data with a planted signal has a bug, however exact its
kernels (``docs/results.md`` flags it).
"""

from __future__ import annotations

import torch

from rec2pm_kernels.varlen import expand_lengths

COUNT_BASELINES = ("popularity", "history-count")
# Popularity only orders what the user's own counts leave tied: below one count.
TIE_BREAK = 1e-6


def popularity(train_items: torch.Tensor, num_items: int) -> torch.Tensor:
    """``(N + 1,)`` float64 counts of each item in the training histories, padding at -inf."""
    counts = torch.bincount(train_items.long(), minlength=num_items + 1).double()
    counts[0] = float("-inf")
    return counts


def count_scorer(kind: str, train_items: torch.Tensor, num_items: int):
    """``score_fn(items, cu_seqlens) -> (B, N + 1)`` of the count baseline ``kind``."""
    if kind not in COUNT_BASELINES:
        raise ValueError(f"kind must be one of {COUNT_BASELINES}, got {kind!r}")
    prior = popularity(train_items, num_items)
    scale = TIE_BREAK / max(float(prior[1:].max()), 1.0)

    def score(items: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        users = cu_seqlens.numel() - 1
        if kind == "popularity":
            return prior.expand(users, -1).clone()
        owner, _ = expand_lengths((cu_seqlens[1:] - cu_seqlens[:-1]).long(), items.numel())
        counts = torch.zeros(users, num_items + 1, dtype=torch.float64)
        counts.index_put_((owner, items.long()), torch.ones(items.numel(), dtype=torch.float64), accumulate=True)
        return counts + prior * scale

    return score
