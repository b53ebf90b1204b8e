"""The Triton kernels' tuple arguments: which named values each tuple holds, in order.

Launchers build their arguments as flat ``{name: value}`` dicts (``Q``, ``stride_qt``, ``S``,
``NUM_BUCKETS``, ...) and ``pack`` groups them into the tuples a kernel's signature names, so
a kernel takes ``Q = (pointer, token stride, head stride)`` and ``sizes = (S, C)`` instead of
five loose parameters, and no launcher depends on the order of a signature.  The compile
check (``rec2pm_kernels.aot``) types the same flat names and packs them with the same table.

Triton specialises the integers inside a tuple (a value of 1 becomes a constant, multiples of
16 get a divisibility hint) and ``do_not_specialize`` cannot reach them.  So tuples hold only
pointers, strides, floats and the sizes a model fixes (pattern sizes, bucket counts, HSTU's
mask sizes, the dropout threshold): at most a few binaries per model, never one per batch.
What changes from batch to batch (total and longest length, dropout seeds) stays a loose
parameter in ``triton_launch.SEGMENT_RUNTIME_INTS``.
"""

from __future__ import annotations

# A (T, H, D) tensor: its pointer and its token and head strides.
_ROWS = {
    name: (name, f"stride_{short}t", f"stride_{short}h")
    for name, short in dict(Q="q", K="k", V="v", OUT="o", DO="do", DQ="dq", DK="dk", DV="dv").items()
}

TUPLE_ARGS: dict[str, tuple[str, ...]] = dict(
    _ROWS,
    # The cached step's (batch, slots, H, D) caches: pointer, batch, slot and head strides.
    K_CACHE=("K_CACHE", "stride_kb", "stride_ks", "stride_kh"),
    V_CACHE=("V_CACHE", "stride_vb", "stride_vs", "stride_vh"),
    sizes=("S", "C"),
    rel_bias=("BIAS", "NUM_BUCKETS"),
    time_bias=("TIME_BIAS", "TIMESTAMPS", "QUERY_TIMESTAMPS", "NUM_TIME_BUCKETS"),
    hstu=("NUM_TARGETS", "SILU_NORMS", "contextual_seq_len", "max_attn_len", "min_full_attn_seq_len", "causal"),
    dropout=("dropout_threshold", "dropout_scale"),
)

# The integers the tuples hold besides strides: sizes a model fixes, never a batch.
MODEL_SIZES = frozenset(
    {"S", "C", "NUM_BUCKETS", "NUM_TIME_BUCKETS", "contextual_seq_len", "max_attn_len", "min_full_attn_seq_len"}
    | {"causal", "dropout_threshold"}
)


def pack(arg_names: list[str], flat: dict) -> dict:
    """The kernel arguments ``arg_names`` names, from ``flat``: a tuple parameter gets the
    tuple of its named values, any other parameter its own value.

    Raises ``KeyError`` naming a value the kernel needs and ``flat`` lacks, and ``ValueError``
    naming values of ``flat`` the kernel has no place for (nothing is dropped silently).
    """
    packed, used = {}, set()
    for name in arg_names:
        members = TUPLE_ARGS.get(name)
        if members is None:
            if name in flat:
                packed[name] = flat[name]
                used.add(name)
            continue
        missing = [member for member in members if member not in flat]
        if missing:
            raise KeyError(f"kernel argument {name!r} needs {missing}")
        packed[name] = tuple(flat[member] for member in members)
        used.update(members)
    unused = sorted(set(flat) - used)
    if unused:
        raise ValueError(f"the kernel takes no argument {unused}")
    return packed
