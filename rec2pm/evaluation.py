"""Full-ranking next-item evaluation: ranks, HR@K / NDCG@K / MRR, and the batched loop.

The protocol is the one published full-ranking numbers use (leave-one-out by time): each
user's target is ranked against every item of the catalogue 1..N, with the items already
in the user's history removed from the candidates (the target itself always stays).
Ties count against the target, so a model that gives every item the same score ranks
last instead of first.

Shapes: U users with packed histories ``items`` (total,) and ``cu_seqlens`` (U + 1,),
``targets`` (U,), scores (B, N + 1) with column 0 the padding item.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from rec2pm_kernels.varlen import expand_lengths

METRICS = ("HR@1", "HR@10", "HR@50", "NDCG@10", "NDCG@50", "MRR")

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_ids(name: str, ids: torch.Tensor, num_items: int) -> None:
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 1 or high > num_items:
            bad = low if low < 1 else high
            raise ValueError(
                f"{name} holds item id {bad}, outside the catalogue 1..{num_items} "
                "(0 is padding and never a target or history item)"
            )


def _check_int_tensor(name: str, value, dim: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != dim or value.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            f"{name} must be a {dim}-D integer tensor, got "
            f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))}"
        )


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of ints >= 1, got {ks!r}")
    return tuple(sorted(set(ks)))


def _check_cu_seqlens(cu_seqlens, total: int) -> torch.Tensor:
    """Validates packed offsets; returns them as CPU int64 (slicing reads them on the host)."""
    if (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.numel() < 2
        or cu_seqlens.dtype not in _INTEGER_DTYPES
    ):
        raise ValueError(
            "cu_seqlens must be a 1-D integer tensor (users + 1,) with at least one user, got "
            f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
            f"{tuple(getattr(cu_seqlens, 'shape', ()))}"
        )
    cu = cu_seqlens.detach().cpu().long()
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu.diff() < 0).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at {total} (the number of "
            f"items), got {cu.tolist()[:8]}"
        )
    return cu


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each target among the candidates, ties counted against the target.

    Args:
        scores: (B, N + 1) float logits over items 0..N; column 0 (padding) is never a candidate.
        targets: (B,) integer item ids in 1..N.
        exclude: optional (B, N + 1) bool, True for items removed from the candidates
            (already seen); the target stays a candidate even where it is True.

    Returns:
        (B,) int64: ``1 + #(candidates other than the target with score >= target score)``.
    """
    if (
        not isinstance(scores, torch.Tensor)
        or scores.dim() != 2
        or scores.shape[1] < 2
        or not scores.is_floating_point()
    ):
        raise ValueError(
            "scores must be a 2-D float tensor (batch, num_items + 1), got "
            f"{getattr(scores, 'dtype', type(scores).__name__)} {tuple(getattr(scores, 'shape', ()))}"
        )
    batch, width = scores.shape
    _check_int_tensor("targets", targets, 1)
    if targets.shape[0] != batch:
        raise ValueError(f"targets must have shape ({batch},) like scores' rows, got {tuple(targets.shape)}")
    _check_ids("targets", targets, width - 1)
    # A NaN compares False with everything, which would silently rank the target first.
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contains NaN; ranks would be meaningless")
    targets = targets.to(scores.device, torch.int64).unsqueeze(1)
    beats = scores >= scores.gather(1, targets)  # (B, N + 1), >= makes ties pessimistic
    beats[:, 0] = False  # padding is never a candidate
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor) or exclude.dtype != torch.bool or exclude.shape != scores.shape:
            raise ValueError(
                f"exclude must be a bool tensor of shape {tuple(scores.shape)} like scores, got "
                f"{getattr(exclude, 'dtype', type(exclude).__name__)} "
                f"{tuple(getattr(exclude, 'shape', ()))}"
            )
        beats &= ~exclude.to(scores.device)
    beats.scatter_(1, targets, False)  # the target is not its own competitor
    return beats.sum(1) + 1


def metrics_from_ranks(ranks: torch.Tensor, ks: Iterable[int] = (1, 10, 50)) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR over users.

    Args:
        ranks: (U,) integer 1-based ranks of the targets.
        ks: cut-offs; HR@K for each, NDCG@K for each K > 1 (NDCG@1 equals HR@1), then MRR.

    Returns:
        ``{"HR@k": ..., "NDCG@k": ..., "MRR": ...}``; with the default ks the keys are ``METRICS``.
    """
    ks = _check_ks(ks)
    _check_int_tensor("ranks", ranks, 1)
    if ranks.numel() == 0:
        raise ValueError("ranks is empty; there is nothing to average")
    # float64 so that means over millions of users do not drift.
    ranks = ranks.detach().cpu().double()
    if bool((ranks < 1).any()):
        raise ValueError(f"ranks must be >= 1 (1-based), got a minimum of {int(ranks.min())}")
    gain = 1.0 / torch.log2(ranks + 1.0)
    out = {f"HR@{k}": float((ranks <= k).double().mean()) for k in ks}
    out.update({f"NDCG@{k}": float(torch.where(ranks <= k, gain, 0.0).mean()) for k in ks if k > 1})
    out["MRR"] = float((1.0 / ranks).mean())
    return out


def history_mask(
    items: torch.Tensor, cu_seqlens: torch.Tensor, rows: slice | torch.Tensor, num_items: int
) -> torch.Tensor:
    """Which items each selected user's history holds.

    Args:
        items: (total,) integer ids 1..N, the users' histories packed.
        cu_seqlens: (U + 1,) offsets of each user's history in ``items``.
        rows: the users to build rows for, a slice or an integer index tensor into 0..U-1.
        num_items: N.

    Returns:
        (len(rows), N + 1) bool on ``items``' device; column 0 is always False.
    """
    _check_int_tensor("items", items, 1)
    cu = _check_cu_seqlens(cu_seqlens, items.numel())
    _check_ids("items", items, num_items)
    if isinstance(rows, torch.Tensor):
        rows = rows.cpu()  # offsets live on the host (see _check_cu_seqlens)
    return _history_mask(items, cu, torch.arange(cu.numel() - 1)[rows], num_items)


def _history_mask(items: torch.Tensor, cu: torch.Tensor, users: torch.Tensor, num_items: int) -> torch.Tensor:
    """``history_mask`` without the checks; ``cu`` CPU int64 (U + 1,), ``users`` CPU int64 (R,)."""
    starts, lengths = cu[users], cu[users + 1] - cu[users]
    # Position of every history item of the selected users in `items`, and its output row.
    row, offset = expand_lengths(lengths)
    picked = items[(starts[row] + offset).to(items.device)].long()
    mask = torch.zeros(users.numel(), num_items + 1, dtype=torch.bool, device=items.device)
    mask[row.to(items.device), picked] = True
    return mask


def evaluate(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    targets: torch.Tensor,
    num_items: int,
    *,
    ks: Iterable[int] = (1, 10, 50),
    **options,
) -> dict[str, float]:
    """Full-ranking metrics over all users: ``metrics_from_ranks(target_ranks(...), ks)``
    plus ``"users"``: U.  The arguments and ``options`` (exclusion, batching, progress,
    timestamps) are those of ``target_ranks``; ``ks`` are the cut-offs of HR@K and NDCG@K."""
    ks = _check_ks(ks)
    ranks = target_ranks(score_fn, items, cu_seqlens, targets, num_items, **options)
    metrics: dict[str, float] = metrics_from_ranks(ranks, ks)
    metrics["users"] = ranks.numel()
    return metrics


def target_ranks(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    items: torch.Tensor,
    cu_seqlens: torch.Tensor,
    targets: torch.Tensor,
    num_items: int,
    *,
    exclude_history: bool = True,
    batch_size: int = 256,
    progress: bool = True,
    description: str = "evaluate",
    exclude_items: torch.Tensor | None = None,
    exclude_cu_seqlens: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    request_times: torch.Tensor | None = None,
) -> torch.Tensor:
    """The 1-based rank of every user's held-out item under full ranking, in batches of users
    (per-user results, for paired comparisons of two models on the same users).

    Args:
        score_fn: ``score_fn(items_batch, cu_batch) -> (b, N + 1)`` logits for b users given
            their packed histories (``model.score_history`` of ``rec2pm.methods`` models; put
            the model in eval mode first).
        items: (total,) integer ids 1..N, the histories (inputs only, never the targets).
        cu_seqlens: (U + 1,) offsets of each user's history; ``cu_batch`` keeps its dtype and device.
        targets: (U,) integer ids 1..N, each user's held-out next item.
        num_items: N.
        exclude_history: remove the items of each user's history from their candidates
            (the standard protocol); a target that repeats a history item stays a candidate.
        batch_size: users per ``score_fn`` call.
        progress: show a tqdm bar when tqdm is installed.
        description: the bar's label.
        exclude_items, exclude_cu_seqlens: the histories to exclude, when they differ from
            the model's input (a model that reads only the last ``max_length`` events must
            still not be credited with items from older events); default ``items``.
        timestamps, request_times: for models with HSTU's timestamp bias: ``(total,)`` the
            time of every history event and ``(U,)`` the time of each held-out event (when
            the next item is asked for); ``score_fn`` then gets their rows of the batch as
            ``timestamps=`` and ``request_times=``.

    Returns:
        (U,) int64 CPU ranks, ``ranks_from_scores`` of each user (``metrics_from_ranks`` averages them).
    """
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    _check_int_tensor("items", items, 1)
    cu = _check_cu_seqlens(cu_seqlens, items.numel())
    users = cu.numel() - 1
    _check_int_tensor("targets", targets, 1)
    if targets.shape != (users,):
        raise ValueError(f"targets must have shape ({users},), one per user of cu_seqlens, got {tuple(targets.shape)}")
    _check_ids("items", items, num_items)
    _check_ids("targets", targets, num_items)
    if (exclude_items is None) != (exclude_cu_seqlens is None):
        raise ValueError("exclude_items and exclude_cu_seqlens go together: pass both or neither")
    if exclude_items is None:
        exclude_items, exclude_cu = items, cu
    else:
        _check_int_tensor("exclude_items", exclude_items, 1)
        exclude_cu = _check_cu_seqlens(exclude_cu_seqlens, exclude_items.numel())
        if exclude_cu.numel() != cu.numel():
            raise ValueError(f"exclude_cu_seqlens must describe the same {users} users as cu_seqlens")
        _check_ids("exclude_items", exclude_items, num_items)
    if timestamps is not None and timestamps.shape != items.shape:
        raise ValueError(f"timestamps must have the shape of items {tuple(items.shape)}, got {tuple(timestamps.shape)}")
    if request_times is not None and request_times.shape != (users,):
        raise ValueError(f"request_times must have shape ({users},), one per user, got {tuple(request_times.shape)}")
    model = getattr(score_fn, "__self__", None)
    if isinstance(model, torch.nn.Module) and model.training:
        # Dropout would make the metrics noisy and lower than the model's real quality.
        warnings.warn("evaluate: score_fn belongs to a module in training mode; call model.eval() first", stacklevel=2)

    bar = None
    if progress:
        try:  # tqdm is optional; without it, evaluate runs silently.
            from tqdm import tqdm

            bar = tqdm(total=users, desc=description, unit="user")
        except ImportError:
            pass
    ranks = []
    try:
        with torch.no_grad():
            for start in range(0, users, batch_size):
                end = min(start + batch_size, users)
                lo, hi = int(cu[start]), int(cu[end])
                # Offsets rebased to 0 for the batch, in the caller's dtype and device.
                times = {}
                if timestamps is not None:
                    times["timestamps"] = timestamps[lo:hi]
                if request_times is not None:
                    times["request_times"] = request_times[start:end]
                scores = score_fn(items[lo:hi], cu_seqlens[start : end + 1] - cu_seqlens[start], **times)
                if not isinstance(scores, torch.Tensor) or scores.shape != (end - start, num_items + 1):
                    raise ValueError(
                        f"score_fn must return a tensor of shape ({end - start}, {num_items + 1}) "
                        f"(batch, num_items + 1) for users {start}..{end - 1}, got "
                        f"{tuple(getattr(scores, 'shape', ())) or type(scores).__name__}"
                    )
                # Inputs were checked once above, so the per-batch mask skips the checks.
                exclude = (
                    _history_mask(exclude_items, exclude_cu, torch.arange(start, end), num_items)
                    if exclude_history
                    else None
                )
                ranks.append(ranks_from_scores(scores, targets[start:end], exclude).cpu())
                if bar is not None:
                    bar.update(end - start)
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(ranks)


def recording_top_items(score_fn: Callable, k: int) -> tuple[Callable, list[torch.Tensor]]:
    """``score_fn`` wrapped to record each batch's ``(b, k)`` top-scored item ids, and the
    list they are appended to (in call order: ``torch.cat`` gives one row per user)."""
    tops: list[torch.Tensor] = []

    def score(*args, **kwargs):
        scores = score_fn(*args, **kwargs)
        tops.append(scores.topk(k, dim=1).indices.cpu())
        return scores

    return score, tops


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-column table, names left-aligned and values right-aligned (4 decimals; counts as ints)."""
    if not metrics:
        return ""
    texts = {name: str(value) if isinstance(value, int) else f"{value:.4f}" for name, value in metrics.items()}
    name_width = max(len("metric"), *(len(name) for name in texts))
    value_width = max(len("value"), *(len(text) for text in texts.values()))
    lines = [f"{'metric':<{name_width}}  {'value':>{value_width}}"]
    lines += [f"{name:<{name_width}}  {text:>{value_width}}" for name, text in texts.items()]
    return "\n".join(lines)
