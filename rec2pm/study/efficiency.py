"""What each method of the study stores per user and what one request costs, beside its accuracy.

* State bytes per user (fp32): the memory vectors of token-memory methods (C·d, or every
  segment's C·d when appending), the write tokens' per-layer K/V of KV-Mask
  (2·layers·C·d), the per-layer K/V cache of the whole history for Full (what a server
  keeps to answer with the cached step), and nothing for Recent-only.  Every method also
  keeps the at most S recent item ids, not counted here.
* Request latency: one user (B = 1), on the model layer, cold: token-memory methods score
  ``[M ; recent]`` with ``M`` already stored; KV-Mask runs the recent items over its stored
  K/V; Full and Recent-only score the history they read from scratch.  The median over
  users spread across the history lengths, each the best of a few repeats.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..methods import KVMask, TokenMemoryModel
from ..methods.full import FullAttention

FP32_BYTES = 4
REQUEST_USERS = 16
REQUEST_REPEATS = 3


def _user(items: torch.Tensor, cu_seqlens: torch.Tensor, u: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = int(cu_seqlens[u]), int(cu_seqlens[u + 1])
    return items[lo:hi], torch.tensor([0, hi - lo], dtype=cu_seqlens.dtype)


@torch.inference_mode()
def state_bytes(model: torch.nn.Module, items: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(U,)`` int64 fp32 bytes of serving state per user (see the module docstring)."""
    config = model.config
    if isinstance(model, TokenMemoryModel):
        memory = model.encode(items, cu_seqlens, iterative=True)[0]
        return memory.counts.long() * config.d_model * FP32_BYTES
    if isinstance(model, KVMask):
        memory = model.encode(items, cu_seqlens)[0]
        per_token = sum(k.shape[1] * k.shape[2] + v.shape[1] * v.shape[2] for k, v in memory.layers)
        return memory.counts.long() * per_token * FP32_BYTES
    if isinstance(model, FullAttention):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        return lengths * 2 * config.num_layers * config.d_model * FP32_BYTES
    return torch.zeros(cu_seqlens.numel() - 1, dtype=torch.int64)


def request_users(lengths: torch.Tensor, count: int = REQUEST_USERS) -> list[int]:
    """``count`` users at evenly spaced quantiles of history length (shortest to longest)."""
    order = torch.argsort(lengths, stable=True)
    picks = torch.linspace(0, order.numel() - 1, min(count, order.numel())).round().long()
    return sorted({int(order[p]) for p in picks})


@torch.inference_mode()
def request_ms(model: torch.nn.Module, items: torch.Tensor, cu_seqlens: torch.Tensor, users: list[int]) -> float:
    """Median over ``users`` of the best-of-``REQUEST_REPEATS`` time of one cold request, in ms."""
    times = []
    for u in users:
        user_items, user_cu = _user(items, cu_seqlens, u)
        if isinstance(model, TokenMemoryModel):
            memory, tail, tail_cu = model.encode(user_items, user_cu, iterative=True)

            def request(memory=memory, tail=tail, tail_cu=tail_cu):
                return model.score(memory, tail, tail_cu)

        elif isinstance(model, KVMask):
            memory, tail, tail_cu, positions = model.encode(user_items, user_cu)

            def request(memory=memory, tail=tail, tail_cu=tail_cu, positions=positions):
                hidden = model.tail_hidden(memory, tail, tail_cu, positions)
                return model.logits(hidden[-1:])

        else:

            def request(user_items=user_items, user_cu=user_cu):
                return model.score_history(user_items, user_cu)

        request()  # warm-up: layouts and kernels built once
        best = float("inf")
        for _ in range(REQUEST_REPEATS):
            start = time.perf_counter()
            request()
            best = min(best, time.perf_counter() - start)
        times.append(best * 1e3)
    return statistics.median(times)
