"""What every method shares: item embeddings tied with scoring, the decoder, input checks.

Histories come packed: ``items`` ``(total,)`` int64 ids in 1..N, user ``b`` owning
``items[cu_seqlens[b]:cu_seqlens[b + 1]]`` in time order, oldest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import Decoder
from ..config import ModelConfig
from ..fields import check_instance_types
from ..layout import PackedLayout
from ..losses import LOSSES, next_item_loss

MODES = ("overwrite", "append")
MEMORY_NORMS = ("none", "layernorm")


@dataclass(frozen=True)
class TrainingOptions:
    """Options of the training step.

    How the defaults were settled: the accuracy study's ablations (``docs/results.md``, run 3:
    Rec2PM-O on 128 generated users with 1k-2k events, noise 0.2, S = 200, three seeds)
    measured no L_con, C = 1, 2, 8 and 16, and every cell of the stop-gradient x Stage 1
    ``L_AR`` grid against these defaults.  None moved expected HR@10 by more than its minimum
    detectable effect (0.4-0.5 points, about 2% of the best achievable) except C = 2, one of
    whose seeds never started learning (a reason to keep C = 4), and Recent-only
    recovered as much of the best there as the memories did, so those data cannot rank memory
    designs.  With no evidence for a change, each default stays the paper's choice or the
    reason given below; overwriting stays the mode because appending was never ahead (level
    within the intervals on every set) and its state grows with the history.

    Attributes:
        mode: ``"overwrite"`` (memory = last C tokens) or ``"append"`` (all memories).
        con_weight: λ of ``L = L_AR + λ L_con`` (paper: 1).
        stage1_ar: also put ``L_AR`` on Stage 1 item positions (default off: the paper
            leaves it open; off keeps Stage 1 a pure teacher).
        detach_target: stop gradients through ``m_ref`` where it is the ``L_con`` target
            (default on: the reference is a target, not something to pull towards ``m_upd``).
        detach_prefix: stop gradients through ``m_ref`` where it is the Stage 2 prefix
            (default off: the Stage 1 write path then learns from the items that read it,
            which is how the write tokens get a next-item signal at all).
        memory_norm: ``"layernorm"`` re-normalises memory vectors before they are re-injected.
        loss: ``"full"`` softmax over the catalogue, ``"sampled"`` softmax (in-batch +
            random negatives) or ``"bce"``: binary cross-entropy of the target against
            random negatives, the loss of SASRec and S3-Rec (``rec2pm.losses``).
        num_negatives: random negatives of the sampled softmax, or per target of ``"bce"``
            (S3-Rec: 1).
        serial_truncation: Tok-Serial only: back-propagate through at most this many
            segment steps (``None``: through the whole loop).

    Where the write tokens learn: through the Stage 2 prefix (``detach_prefix=False``) and
    through ``L_con`` on ``m_upd`` (``con_weight > 0``).  With the prefix detached and
    ``con_weight=0`` they get no gradient at all, since Stage 1 item rows never see a
    write token (``tests/model/test_model_equivalences.py`` checks each case).
    """

    mode: str = "overwrite"
    con_weight: float = 1.0
    stage1_ar: bool = False
    detach_target: bool = True
    detach_prefix: bool = False
    memory_norm: str = "none"
    loss: str = "full"
    num_negatives: int = 256
    serial_truncation: int | None = None

    def __post_init__(self):
        check_instance_types(self)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.memory_norm not in MEMORY_NORMS:
            raise ValueError(f"memory_norm must be one of {MEMORY_NORMS}, got {self.memory_norm!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.con_weight < 0:
            raise ValueError(f"con_weight must be >= 0, got {self.con_weight}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.serial_truncation is not None and self.serial_truncation < 1:
            raise ValueError(f"serial_truncation must be >= 1 or None, got {self.serial_truncation}")


@dataclass
class LossOutput:
    """``loss = ar + con_weight * con``; ``num_predictions`` counts the item positions in ``ar``."""

    loss: torch.Tensor
    ar: torch.Tensor
    con: torch.Tensor
    num_predictions: int


class RecModel(nn.Module):
    """Base of every method: ``forward(items, cu_seqlens) -> LossOutput`` trains it and
    ``score_history(items, cu_seqlens) -> (B, N + 1)`` logits serves it."""

    method = "base"
    uses_write_tokens = False  # methods with a memory own the C learned write-token embeddings
    # Whether the method's training and scoring paths carry token times (HSTU's timestamp bias).
    supports_time_bias = False

    def __init__(self, config: ModelConfig, options: TrainingOptions | None = None):
        super().__init__()
        if config.num_time_buckets and not self.supports_time_bias:
            raise ValueError(
                f"method {self.method!r} has no timestamp bias yet; use num_time_buckets=0, or "
                "the full, recent or rec2pm methods (docs/timestamps.md)"
            )
        self.config = config
        self.options = options or TrainingOptions()
        self.item_embedding = nn.Embedding(config.num_items + 1, config.d_model, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=config.init_std)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.decoder = Decoder(config)
        if self.uses_write_tokens:
            # The same scale as the item embeddings they sit among in every stream.
            self.write_tokens = nn.Parameter(torch.randn(config.num_memory_tokens, config.d_model) * config.init_std)

    # -- inputs ------------------------------------------------------------------------------
    def check_history(self, items: torch.Tensor, cu_seqlens: torch.Tensor, name: str = "items") -> torch.Tensor:
        """Validates packed histories (every one non-empty); returns the lengths (CPU int64).

        Reads a device at most once (``check_packed_items``); layouts are built from these lengths."""
        lengths = self.check_packed_items(items, cu_seqlens, name)
        if lengths.numel() == 0:
            raise ValueError(f"cu_seqlens for {name} must be a 1-D tensor (batch + 1,) with batch >= 1")
        if bool((lengths < 1).any()):
            user = int(torch.nonzero(lengths < 1)[0, 0])
            raise ValueError(f"{name}: history {user} is empty; every user needs at least one item")
        return lengths

    def check_packed_items(
        self, items: torch.Tensor, cu_seqlens: torch.Tensor, name: str, batch: int | None = None
    ) -> torch.Tensor:
        """Packed item ids and their offsets (sequences may be empty); returns the lengths (CPU int64).

        ``batch``: the number of sequences the offsets must describe, when the caller knows it.
        Device tensors come to the host in one read when items and offsets share a device (one
        device-to-host sync on CUDA, not three).
        """
        if not isinstance(items, torch.Tensor) or items.dim() != 1 or items.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"{name} must be a 1-D int32/int64 tensor of item ids, got "
                f"{getattr(items, 'dtype', type(items).__name__)} {tuple(getattr(items, 'shape', ()))}"
            )
        offsets = f"cu_seqlens for {name}"
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(
                f"{offsets} must be a 1-D tensor (batch + 1,), got "
                f"{type(cu_seqlens).__name__} {tuple(getattr(cu_seqlens, 'shape', ()))}"
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"{offsets} must be int32 or int64 offsets, got {cu_seqlens.dtype} "
                "(floating offsets would be truncated)"
            )
        if batch is not None and cu_seqlens.numel() != batch + 1:
            raise ValueError(
                f"{offsets} must have batch + 1 = {batch + 1} entries (one user per row of the "
                f"serving state), got {cu_seqlens.numel()}"
            )
        cu = cu_seqlens.detach().long()
        extremes = None  # the smallest and largest id, read on the host; CPU tensors are read in place
        if items.numel() and items.device.type != "cpu":
            extremes = torch.stack([items.min(), items.max()]).long()
            if extremes.device == cu.device:
                host = torch.cat([cu, extremes]).cpu()
                cu, extremes = host[:-2], host[-2:]
            extremes = extremes.cpu()
        cu = cu.cpu()
        lengths = cu.diff()
        if int(cu[0]) != 0 or int(cu[-1]) != items.numel() or bool((lengths < 0).any()):
            raise ValueError(
                f"{offsets} must start at 0, be non-decreasing and end at {items.numel()}, got {cu.tolist()[:8]}"
            )
        if items.numel():
            low, high = (int(items.min()), int(items.max())) if extremes is None else extremes.tolist()
            if low < 1 or high > self.config.num_items:
                bad = low if low < 1 else high
                raise ValueError(
                    f"{name} holds item id {bad}, outside the catalogue 1..{self.config.num_items} "
                    "(0 is padding and never an input)"
                )
        return lengths

    def check_times(self, timestamps, items: torch.Tensor, name: str = "timestamps") -> torch.Tensor | None:
        """``timestamps`` of packed items (``(total,)`` ints, one per item): required with
        HSTU's timestamp bias and refused without it, so no time is silently ignored."""
        buckets = self.config.num_time_buckets
        if not buckets:
            if timestamps is not None:
                raise ValueError(f"{name} given, but this model has no timestamp bias (num_time_buckets=0)")
            return None
        if timestamps is None:
            raise ValueError(
                f"this model has HSTU's timestamp bias (num_time_buckets={buckets}): pass {name}, one time per item"
            )
        if not isinstance(timestamps, torch.Tensor) or timestamps.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"{name} must be an int32 or int64 tensor, got {getattr(timestamps, 'dtype', type(timestamps))}"
            )
        if timestamps.shape != items.shape:
            raise ValueError(
                f"{name} must have the items' shape {tuple(items.shape)}, one time per item, "
                f"got {tuple(timestamps.shape)}"
            )
        return timestamps

    def check_request_times(self, request_times, batch: int) -> torch.Tensor | None:
        """Optional ``(batch,)`` int times at which each user's next item is asked for."""
        if request_times is None:
            return None
        if not self.config.num_time_buckets:
            raise ValueError("request_times given, but this model has no timestamp bias (num_time_buckets=0)")
        if not isinstance(request_times, torch.Tensor) or request_times.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"request_times must be an int32 or int64 tensor, got {getattr(request_times, 'dtype', None)}"
            )
        if request_times.shape != (batch,):
            raise ValueError(
                f"request_times must have shape ({batch},), one per user, got {tuple(request_times.shape)}"
            )
        return request_times

    def require_no_time_bias(self, what: str) -> None:
        if self.config.num_time_buckets:
            raise ValueError(
                f"{what} has no timestamp bias yet; a model with num_time_buckets > 0 scores with "
                "score_history (one-shot), which carries the times (docs/timestamps.md)"
            )

    def check_memory(self, memory: torch.Tensor, counts: torch.Tensor, batch: int) -> None:
        d = self.config.d_model
        ref = self.item_embedding.weight
        if not isinstance(memory, torch.Tensor) or memory.dim() != 2 or memory.shape[1] != d:
            raise ValueError(
                f"memory must have shape (memory_tokens, d_model={d}), got {tuple(getattr(memory, 'shape', ()))}"
            )
        if memory.dtype != ref.dtype or memory.device != ref.device:
            raise TypeError(
                f"memory must be {ref.dtype} on {ref.device} like the model, got {memory.dtype} on {memory.device}"
            )
        if not isinstance(counts, torch.Tensor) or counts.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"memory_counts must be an int32/int64 tensor ({batch},), got "
                f"{getattr(counts, 'dtype', type(counts).__name__)}"
            )
        if counts.shape != (batch,):
            raise ValueError(f"memory_counts must have shape ({batch},), got {tuple(counts.shape)}")
        if int(counts.sum()) != memory.shape[0]:
            raise ValueError(f"memory_counts sums to {int(counts.sum())} but memory has {memory.shape[0]} rows")
        C = self.config.num_memory_tokens
        if bool((counts % C != 0).any()):
            raise ValueError(f"memory_counts must be multiples of num_memory_tokens={C}, got {counts.tolist()}")
        if self.options.mode == "overwrite" and bool((counts > C).any()):
            raise ValueError(f"overwrite mode keeps at most C={C} memory tokens per user, got {counts.tolist()}")

    # -- decoding and scoring -----------------------------------------------------------------
    def run(
        self, layout: PackedLayout, x: torch.Tensor, *, times=None, last_rows_only: bool = False, **pattern
    ) -> torch.Tensor:
        """The decoder over ``layout``; ``times``: ``layout.token_times(...)`` with a timestamp
        bias; ``last_rows_only``: each sequence's last row alone (``Decoder.forward``)."""
        on_device = layout.to(x.device)
        return self.decoder(
            x,
            on_device.position,
            on_device.cu_seqlens,
            on_device.max_seqlen,
            times=times,
            max_position=on_device.max_position,
            last_rows_only=last_rows_only,
            **pattern,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` -> ``(n, N + 1)`` scores, tied to the item embeddings; column 0 is -inf."""
        out = hidden @ self.item_embedding.weight.T
        out[:, 0] = float("-inf")
        return out

    def ar_loss(self, layout: PackedLayout, hidden: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Next-item loss over the item rows of ``layout`` that have a target."""
        on_device = layout.to(hidden.device)
        rows = on_device.target_rows
        targets = items[on_device.target_index[rows]].long()  # int32 ids are accepted; the losses index with int64
        loss = next_item_loss(
            self.options.loss, hidden[rows], targets, self.item_embedding.weight, self.options.num_negatives
        )
        return loss, rows.numel()

    def memory_input(self, memory: torch.Tensor) -> torch.Tensor:
        """Memory vectors as they are re-injected into the decoder."""
        if self.options.memory_norm == "layernorm":
            return torch.nn.functional.layer_norm(memory, memory.shape[-1:])
        return memory

    def loss_output(self, ar: torch.Tensor, con: torch.Tensor | None, n: int) -> LossOutput:
        con = ar.new_zeros(()) if con is None else con
        return LossOutput(loss=ar + self.options.con_weight * con, ar=ar, con=con, num_predictions=n)

    def score_history(self, items: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
