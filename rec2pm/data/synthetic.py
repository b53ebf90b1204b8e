"""Synthetic lifelong histories with planted long-term interests, slow drift and noise events.

The planted signal
------------------
Items ``1..N`` are split into ``C`` clusters of consecutive ids, sizes ``floor(N/C)`` or
``ceil(N/C)`` (``item_clusters`` gives the cluster of each id).  Each user ``u``:

* has ``K = num_interests`` long-term interests: ``K`` distinct clusters ``c_{u,1..K}``, drawn
  uniformly;
* has interest logits ``z_u(t)`` that start at ``N(0, 1)`` and drift as a Gaussian random walk
  taking one step every ``DRIFT_BLOCK = 64`` events, with step std ``drift * sqrt(64 / 1000)``:
  over 1000 events a logit moves by about ``N(0, drift^2)`` (``drift = 0``: fixed weights).  The
  interest weights are ``w_u(t) = softmax(z_u(t))``, constant within a block of 64 events;
* draws each event independently: with probability ``1 - noise`` an interest ``j ~ w_u(t)``
  and then an item uniformly from cluster ``c_{u,j}``; with probability ``noise`` a noise event,
  an item uniform over all ``N`` items (which may land in an interest cluster).

So the next event of user ``u`` at position ``t`` has the distribution

    p_t(i) = (1 - noise) * sum_j w_{u,j}(t) * [i in c_{u,j}] / |c_{u,j}|  +  noise / N.

What a perfect model can score
------------------------------
No model beats the oracle that knows ``p_t``.  Ranking items by ``p_t``, and calling
``p_(1) >= p_(2) >= ...`` its sorted values, the best achievable expected metrics for target
position ``t`` are

    HR@k   = sum_{r <= k} p_(r)                   (next-item accuracy: HR@1 = p_(1))
    NDCG@k = sum_{r <= k} p_(r) / log2(r + 1)

averaged over users.  With equal cluster sizes ``s = N / C`` and ``k <= s``:
``HR@1 = (1 - noise) * E[max_j w_j] / s + noise / N`` and ``HR@k = k * HR@1``; with
``k = s``: ``HR@s = (1 - noise) * E[max_j w_j] + noise * s / N``.  ``LifelongPlan.best_metrics``
evaluates the exact sums for given positions (by default each user's last event, the
leave-one-out test target).  A model that only reads the history must also estimate ``w_u(t)``
and the interest clusters from it, so it scores below the bound, the more so the shorter the
history it reads and the larger ``drift``: a long-range memory pays off when it recovers
interests that the recent window does not show.  Noise events carry no signal and are
unpredictable beyond ``noise / N``; a memory that learns to ignore them (the "denoising
bottleneck") loses nothing.  Items repeat by design, so evaluate these sets without removing
already-seen items from the candidates (the bound assumes all ``N`` items are ranked).

Vectorised with torch over all events of a chunk of users; deterministic for given arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rec2pm_kernels.varlen import expand_lengths

from .interactions import InteractionData

DRIFT_BLOCK = 64  # events per random-walk step of the interest logits
DRIFT_UNIT = 1000.0  # `drift` is the logit std accumulated over this many events
CHUNK_EVENTS = 1 << 22  # events generated at once: bounds the temporaries to ~100 MB


@dataclass
class LifelongPlan:
    """The planted parameters behind ``lifelong_histories`` (for bounds and analyses).

    * ``bounds``: ``(C + 1,)`` int64, cluster ``c`` holds items ``bounds[c] .. bounds[c + 1] - 1``;
    * ``interests``: ``(users, K)`` int64 cluster of each interest;
    * ``logits``: ``(users, blocks, K)`` float32 interest logits of each 64-event block;
    * ``lengths``: ``(users,)`` int64 events per user.
    """

    bounds: torch.Tensor
    interests: torch.Tensor
    logits: torch.Tensor
    lengths: torch.Tensor
    noise: float
    num_items: int

    def weights(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``(users, K)`` interest weights at each user's event ``positions[u]`` (default: the last)."""
        if positions is None:
            positions = self.lengths - 1
        block = torch.as_tensor(positions, dtype=torch.int64) // DRIFT_BLOCK
        rows = self.logits[torch.arange(self.logits.shape[0]), block]
        return torch.softmax(rows.double(), dim=-1)

    def _interest_sizes(self) -> torch.Tensor:
        """``(users, K)`` float64 items in each user's interest clusters."""
        return (self.bounds[1:] - self.bounds[:-1])[self.interests].double()

    def item_probabilities(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``(users, N + 1)`` float64 ``p_t(i)`` of each user's event at ``positions`` (default:
        the last), column 0 (padding) zero: the distribution the next event is drawn from."""
        w = self.weights(positions)
        sizes = self._interest_sizes()
        probs = torch.full((w.shape[0], self.num_items + 1), self.noise / self.num_items, dtype=torch.float64)
        probs[:, 0] = 0.0
        ids = torch.arange(self.num_items + 1)
        for j in range(w.shape[1]):  # the K interest clusters are distinct, so each adds to its own items
            start, end = self.bounds[self.interests[:, j]], self.bounds[self.interests[:, j] + 1]
            inside = (ids >= start[:, None]) & (ids < end[:, None])
            probs += inside * ((1 - self.noise) * w[:, j] / sizes[:, j])[:, None]
        return probs

    def expected_metrics(self, ranked: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"HR@k": (users,), "NDCG@k": (users,)}`` float64: the metrics each user's target
        at ``positions`` earns in expectation over ``p_t`` when a model ranks ``ranked``
        ``(users, k)`` item ids first (distinct ids, best first).  Free of the noise of one
        sampled target, so paired comparisons of models need far fewer users; with the
        oracle's ranking they equal ``best_per_user``."""
        if ranked.dim() != 2 or ranked.shape[0] != self.lengths.numel():
            raise ValueError(
                f"ranked must have shape ({self.lengths.numel()}, k), one row per user, got {tuple(ranked.shape)}"
            )
        k = ranked.shape[1]
        p = self.item_probabilities(positions).gather(1, ranked.long().cpu())
        discount = 1 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
        return {f"HR@{k}": p.sum(1), f"NDCG@{k}": (p * discount).sum(1)}

    def best_metrics(self, k: int, positions: torch.Tensor | None = None) -> dict[str, float]:
        """Best achievable ``{"hr": HR@k, "ndcg": NDCG@k}`` for targets at ``positions`` (default: last events)."""
        hr, ndcg = self.best_per_user(k, positions)
        return {"hr": hr.mean().item(), "ndcg": ndcg.mean().item()}

    def best_per_user(self, k: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(users,)`` float64 best achievable HR@k and NDCG@k of each user's target at
        ``positions`` (default: the last event): the expected metrics of ranking items by
        their true probability under the planted interests and noise."""
        w = self.weights(positions)
        sizes = self._interest_sizes()
        base = self.noise / self.num_items
        per_item = (1 - self.noise) * w / sizes + base  # p of an item of interest j
        per_item, order = per_item.sort(dim=-1, descending=True)
        sizes = sizes.gather(1, order)
        discount = torch.cat(
            [
                torch.zeros(1, dtype=torch.float64),
                torch.cumsum(1 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64)), 0),
            ]
        )
        hr = torch.zeros(w.shape[0], dtype=torch.float64)
        ndcg = torch.zeros_like(hr)
        used = torch.zeros_like(hr)  # ranks filled so far
        for j in range(per_item.shape[1]):  # interest clusters, most probable items first
            take = torch.minimum(sizes[:, j], k - used)
            hr += per_item[:, j] * take
            ndcg += per_item[:, j] * (discount[(used + take).long()] - discount[used.long()])
            used += take
        hr += base * (k - used)  # the remaining ranks: items outside the interests
        ndcg += base * (discount[k] - discount[used.long()])
        return hr, ndcg


def item_clusters(num_items: int, num_clusters: int) -> torch.Tensor:
    """``(num_items + 1,)`` int64: the cluster of each item id (entry 0, the padding id, is -1)."""
    bounds = _bounds(num_items, num_clusters)
    ids = torch.arange(num_items + 1)
    return torch.where(ids > 0, torch.searchsorted(bounds, ids, right=True) - 1, -1)


def lifelong_histories(
    num_users: int,
    length: int,
    num_items: int,
    *,
    num_interests: int = 4,
    num_clusters: int | None = None,
    drift: float = 1.0,
    noise: float = 0.1,
    seed: int = 0,
    min_length: int | None = None,
) -> InteractionData:
    """Generated lifelong histories (see the module docstring for the planted signal).

    ``length``: events per user, or the longest when ``min_length`` is given (lengths then
    log-uniform in ``[min_length, length]``).  ``num_clusters=None``: ``max(num_interests,
    min(64, num_items // 16))``, at most ``num_items``.  Items keep their ids (``item_ids[i - 1] == i``);
    users are ``0 .. num_users - 1``.
    """
    return lifelong_planted(
        num_users,
        length,
        num_items,
        num_interests=num_interests,
        num_clusters=num_clusters,
        drift=drift,
        noise=noise,
        seed=seed,
        min_length=min_length,
    )[0]


def lifelong_planted(
    num_users: int,
    length: int,
    num_items: int,
    *,
    num_interests: int = 4,
    num_clusters: int | None = None,
    drift: float = 1.0,
    noise: float = 0.1,
    seed: int = 0,
    min_length: int | None = None,
) -> tuple[InteractionData, LifelongPlan]:
    """``lifelong_histories`` together with its ``LifelongPlan`` (same arguments, same data)."""
    if num_clusters is None:
        num_clusters = min(num_items, max(num_interests, min(64, num_items // 16)))
    _check(num_users, length, num_items, num_interests, num_clusters, drift, noise, min_length)
    gen = torch.Generator().manual_seed(seed)
    if min_length is None:
        lengths = torch.full((num_users,), length, dtype=torch.int64)
    else:  # log-uniform: lifelong data has many short and a few very long histories
        log_len = math.log(min_length) + torch.rand(num_users, generator=gen, dtype=torch.float64) * (
            math.log(length + 1) - math.log(min_length)
        )
        lengths = log_len.exp().long().clamp(min_length, length)
    bounds = _bounds(num_items, num_clusters)
    interests = torch.rand(num_users, num_clusters, generator=gen).argsort(dim=1)[:, :num_interests].contiguous()
    blocks = -(-length // DRIFT_BLOCK)
    steps = torch.randn(num_users, blocks, num_interests, generator=gen) * (drift * math.sqrt(DRIFT_BLOCK / DRIFT_UNIT))
    steps[:, 0] = torch.randn(num_users, num_interests, generator=gen)  # the starting logits, N(0, 1)
    logits = steps.cumsum(dim=1)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1).view(-1, num_interests)

    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    items = torch.empty(int(cu[-1]), dtype=torch.int64)
    per_chunk = max(1, CHUNK_EVENTS // length)
    for first in range(0, num_users, per_chunk):
        users = torch.arange(first, min(first + per_chunk, num_users))
        lo, hi = int(cu[users[0]]), int(cu[users[-1] + 1])
        items[lo:hi] = _sample(users, lengths[users], blocks, cdf, interests, bounds, noise, num_items, gen)
    data = InteractionData(
        items=items,
        cu_seqlens=cu,
        num_items=num_items,
        item_ids=list(range(1, num_items + 1)),
        user_ids=list(range(num_users)),
        skipped={},
        source=(
            f"lifelong_histories(num_users={num_users}, length={length}, num_items={num_items}, "
            f"num_interests={num_interests}, num_clusters={num_clusters}, drift={drift}, noise={noise}, "
            f"seed={seed}, min_length={min_length})"
        ),
    )
    plan = LifelongPlan(
        bounds=bounds, interests=interests, logits=logits, lengths=lengths, noise=noise, num_items=num_items
    )
    return data, plan


def _sample(users, lengths, blocks, cdf, interests, bounds, noise, num_items, gen) -> torch.Tensor:
    """Packed events of ``users``: interest by inverse CDF, item uniform in its cluster, then noise."""
    total = int(lengths.sum())
    index, position = expand_lengths(lengths, total)
    owner = users[index]
    row = owner * blocks + position // DRIFT_BLOCK  # row of cdf: (user, block)
    u_interest = torch.rand(total, generator=gen)
    u_item = torch.rand(total, generator=gen, dtype=torch.float64)
    is_noise = torch.rand(total, generator=gen) < noise
    noise_items = torch.randint(1, num_items + 1, (total,), generator=gen)
    num_interests = interests.shape[1]
    interest = torch.zeros(total, dtype=torch.int64)
    for j in range(num_interests - 1):  # K is small: K - 1 gathers beat a (total, K) one
        interest += u_interest > cdf[row, j]
    cluster = interests.view(-1)[owner * num_interests + interest]
    start, size = bounds[cluster], bounds[cluster + 1] - bounds[cluster]
    item = start + torch.minimum((u_item * size).long(), size - 1)
    return torch.where(is_noise, noise_items, item)


def _bounds(num_items: int, num_clusters: int) -> torch.Tensor:
    return 1 + torch.arange(num_clusters + 1, dtype=torch.int64) * num_items // num_clusters


def _check(num_users, length, num_items, num_interests, num_clusters, drift, noise, min_length):
    if num_users < 1 or length < 1:
        raise ValueError(f"lifelong_histories needs num_users >= 1 and length >= 1, got {num_users}, {length}")
    if not 1 <= num_clusters <= num_items:
        raise ValueError(f"num_clusters must lie in 1..num_items = {num_items}, got {num_clusters}")
    if not 1 <= num_interests <= num_clusters:
        raise ValueError(f"num_interests must lie in 1..num_clusters = {num_clusters}, got {num_interests}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must lie in [0, 1], got {noise}")
    if drift < 0:
        raise ValueError(f"drift must be >= 0, got {drift}")
    if min_length is not None and not 1 <= min_length <= length:
        raise ValueError(f"min_length must lie in 1..length = {length}, got {min_length}")
