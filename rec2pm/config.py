"""Model configurations, with the named reference settings of the Rec2PM paper."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rec2pm_kernels.backends import BACKENDS

from .fields import check_instance_types

BACKBONES = ("sasrec", "hstu")


@dataclass(frozen=True)
class KernelOptions:
    """How the decoder's attention kernels run; nothing here changes the model itself.

    The decoder passes these to every ``segment_attention`` and ``cached_step_attention``
    call (``rec2pm_kernels.interface`` documents each).  They are not part of a model's
    fingerprint: a memory written with one backend is read by any other.

    Attributes:
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpp"``.  ``"auto"`` also lets
            serving steps use the fused one-call decoder step (C++, on the CPU); any other
            value runs every layer through that backend.
        allow_tf32: fp32 products in TF32 on the ``triton`` backend (~1e-3 relative error).
        deterministic: bit-identical gradients from run to run; ``None`` follows
            ``torch.are_deterministic_algorithms_enabled()``.
    """

    backend: str = "auto"
    allow_tf32: bool = False
    deterministic: bool | None = None

    def __post_init__(self):
        check_instance_types(self, prefix="kernels.")
        if self.backend not in BACKENDS:
            raise ValueError(f"kernels.backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def of(cls, value) -> KernelOptions:
        """``value`` as a ``KernelOptions``: one already, or a table of its fields (TOML)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"kernels must be a KernelOptions or a table of its fields, got {type(value).__name__}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown key kernels.{unknown[0]}; expected one of {sorted(cls.__dataclass_fields__)}")
        return cls(**value)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes a model; methods (Rec2PM, baselines) read the parts they use.

    Attributes:
        backbone: ``"sasrec"`` (softmax attention, learned absolute positions) or ``"hstu"``
            (pointwise SiLU attention with a relative-position bias, gated by U).
        num_items: catalogue size N; item ids are 1..N, 0 is padding.
        num_layers, num_heads, d_model: decoder shape; head dim = d_model / num_heads.
        dropout: dropout rate in every block (0 for exact equivalence tests).
        max_positions: SASRec position table size: every stream position λ must be below it.
            Rec2PM's positions follow the items (the ``global`` pattern's λ: at most
            max(L - 1, K*S + C - 1) for L items in K archived segments), KV-Mask's count
            every token (L + K*C).
        num_buckets: HSTU relative-bias buckets (distances past the last share it).
        num_time_buckets: HSTU's timestamp bias (``rec2pm_kernels.time_bias``): a learned
            weight per log-spaced bucket ``0..num_time_buckets`` of the time between a row's
            query time and each key's timestamp, shared by the heads of a layer.  0 (the
            default) leaves it out; with it, the model's inputs need timestamps
            (``docs/timestamps.md``).  HSTU's own setting is 128.
        silu_norm: HSTU's fixed attention normaliser; defaults to ``max_positions``.
        segment_len, num_memory_tokens: S and C of Rec2PM.
        input_norm: a LayerNorm over every stream token's input (item or write-token
            embedding plus position, or a re-injected memory vector) before the first block,
            as BERT, S3-Rec and DuoRec have it.  The blocks are pre-norm: without it the
            residual stream starts as embeddings of norm ~sqrt(d)·init_std, the blocks'
            updates soon outgrow it, and the input item's identity reaches the output only
            faintly; SASRec then needed several times the epochs to reach the same accuracy
            on the Amazon sets (``docs/accuracy.md``).  Off builds the models of before it
            existed (checkpoints without its weights load that way).
        init_std: std of the normal initialisation of every embedding (items, positions,
            write tokens) and every linear weight (biases start at 0).  One small scale for
            all of them keeps the item signal visible at init: a larger position table
            drowns the items, and larger item embeddings make the residual path (the output
            embeddings are the input ones) predict the input item itself at init
            (``docs/accuracy.md`` has the measurements).
        kernels: the attention kernels' options (backend, TF32, determinism); a
            ``KernelOptions`` or a table of its fields (``[model.kernels]`` in a run config).
    """

    backbone: str = "sasrec"
    num_items: int = 1000
    num_layers: int = 2
    num_heads: int = 2
    d_model: int = 32
    dropout: float = 0.0
    max_positions: int = 4096
    num_buckets: int = 128
    num_time_buckets: int = 0
    silu_norm: float | None = None
    segment_len: int = 200
    num_memory_tokens: int = 4
    init_std: float = 0.02
    input_norm: bool = True
    kernels: KernelOptions = field(default_factory=KernelOptions)

    def __post_init__(self):
        object.__setattr__(self, "kernels", KernelOptions.of(self.kernels))
        check_instance_types(self)
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        for name in (
            "num_items",
            "num_layers",
            "num_heads",
            "d_model",
            "max_positions",
            "num_buckets",
            "segment_len",
            "num_memory_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        buckets = self.num_time_buckets
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 0:
            raise ValueError(f"num_time_buckets must be an int >= 0, got {self.num_time_buckets!r}")
        if self.num_time_buckets and self.backbone != "hstu":
            raise ValueError(
                f"num_time_buckets={self.num_time_buckets} is HSTU's timestamp bias; backbone "
                f"{self.backbone!r} has no bias terms (use backbone='hstu' or num_time_buckets=0)"
            )
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def attention_norm(self) -> float:
        return float(self.silu_norm if self.silu_norm is not None else self.max_positions)

    def with_(self, **changes) -> ModelConfig:
        return replace(self, **changes)


# The paper's reference settings (docs/method.md): SASRec 4 layers x 4 heads, HSTU 16 layers x 8 heads,
# d = 64, S = 200, C = 4.
REFERENCE_CONFIGS = {
    "sasrec": ModelConfig(backbone="sasrec", num_layers=4, num_heads=4, d_model=64, dropout=0.2, max_positions=20_000),
    "hstu": ModelConfig(backbone="hstu", num_layers=16, num_heads=8, d_model=64, dropout=0.2, max_positions=20_000),
    # Small and fast, for tests and examples.
    "sasrec-small": ModelConfig(
        backbone="sasrec", num_layers=2, num_heads=2, d_model=16, segment_len=8, num_memory_tokens=2, max_positions=512
    ),
    "hstu-small": ModelConfig(
        backbone="hstu",
        num_layers=2,
        num_heads=2,
        d_model=16,
        segment_len=8,
        num_memory_tokens=2,
        max_positions=512,
        num_buckets=32,
    ),
}


def named_config(name: str, **overrides) -> ModelConfig:
    """A reference configuration by name, with overrides (e.g. ``num_items``)."""
    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"config name must be one of {tuple(REFERENCE_CONFIGS)}, got {name!r}")
    return REFERENCE_CONFIGS[name].with_(**overrides)
