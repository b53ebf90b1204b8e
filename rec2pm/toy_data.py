"""A tiny generated dataset with a learnable signal, for examples, tests and benchmarks.

Each user has one preferred stride among a few; their history walks the catalogue with
that stride (``next = prev + stride``, wrapping around), replacing a ``noise`` fraction of
events by uniform random items.  A model that reads the history learns both the walk and
which stride the user follows, so the next-item loss falls quickly from ``log N``.
(The lifelong generator with planted long-term interests and drift is a separate tool.)
"""

from __future__ import annotations

import torch


def toy_histories(
    num_users: int,
    length: int,
    num_items: int,
    *,
    strides: tuple[int, ...] = (1, 2, 3),
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed histories ``(items, cu_seqlens)``: ``num_users`` users of ``length`` events."""
    if num_users < 1 or length < 1 or num_items < 2:
        raise ValueError("toy_histories needs num_users >= 1, length >= 1 and num_items >= 2")
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, num_items, (num_users, 1), generator=gen)
    stride = torch.tensor(strides)[torch.randint(0, len(strides), (num_users, 1), generator=gen)]
    walk = (start + stride * torch.arange(length)) % num_items + 1
    random = torch.randint(1, num_items + 1, walk.shape, generator=gen)
    noisy = torch.rand(walk.shape, generator=gen) < noise
    items = torch.where(noisy, random, walk).flatten()
    return items, torch.arange(num_users + 1) * length
