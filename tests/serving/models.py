"""Small serving models with weights large enough that every path shows in the scores."""

from __future__ import annotations

import copy

import torch

from rec2pm.config import named_config
from rec2pm.methods import build_model

N_ITEMS = 40
S, C = 5, 2
SERVED = ["rec2pm-o", "rec2pm-a", "tok-serial-o", "kv-mask-o"]


def small_model(method: str, backbone: str = "sasrec-small", seed: int = 0, segment_len: int = S):
    torch.manual_seed(seed)
    config = named_config(
        backbone, num_items=N_ITEMS, segment_len=segment_len, num_memory_tokens=C, dropout=0.0, init_std=0.2
    )
    model = build_model(method, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("rel_bias"):
                p.normal_(std=0.3)
    return model


def reference_scores(model, items: torch.Tensor, cu: torch.Tensor):
    """``(float64 reference, same-dtype baseline)`` of the model's own serving path
    (iterative memory updates for the token-memory methods)."""
    double = copy.deepcopy(model).double()
    kwargs = {} if model.method == "kv-mask" else {"iterative": True}
    with torch.no_grad():
        return double.score_history(items, cu, **kwargs), model.score_history(items, cu, **kwargs)


def history(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, N_ITEMS + 1, (length,), generator=torch.Generator().manual_seed(seed))
