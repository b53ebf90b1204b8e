"""The Triton kernels' tuple arguments: ``ops/triton_args.pack`` groups a launcher's flat values."""

from __future__ import annotations

import pytest

from rec2pm_kernels.ops import torch_math
from rec2pm_kernels.ops.triton_args import MODEL_SIZES, TUPLE_ARGS, pack
from rec2pm_kernels.ops.triton_dropout import dropout_args


def test_groups_flat_values_into_the_kernels_tuples():
    flat = dict(Q="q", stride_qt=48, stride_qh=16, S=4, C=2, total_tokens=9)
    packed = pack(["Q", "sizes", "total_tokens", "BLOCK_M"], flat)
    assert packed == dict(Q=("q", 48, 16), sizes=(4, 2), total_tokens=9)


def test_a_missing_member_is_named():
    with pytest.raises(KeyError, match="'sizes' needs \\['C'\\]"):
        pack(["sizes"], dict(S=4))


def test_a_value_the_kernel_has_no_place_for_is_named():
    with pytest.raises(ValueError, match="no argument \\['stride_kt'\\]"):
        pack(["Q"], dict(Q="q", stride_qt=48, stride_qh=16, stride_kt=48))


def test_tuples_hold_no_batch_sizes():
    """Ints inside tuples are specialised by Triton: only strides and model sizes may sit there."""
    from rec2pm_kernels.ops.triton_launch import CACHED_STEP_RUNTIME_INTS, SEGMENT_RUNTIME_INTS

    members = {member for names in TUPLE_ARGS.values() for member in names}
    assert not members & (set(SEGMENT_RUNTIME_INTS) | set(CACHED_STEP_RUNTIME_INTS))
    assert MODEL_SIZES <= members


def test_dropout_words_are_int32_of_the_same_bits_for_every_seed_and_rate():
    """Triton types a Python int by its value (int32 below 2**31, int64 above): words passed as
    they are compiled a second binary of every kernel for half the seeds, and for rates from
    0.5 on, and the int64 one was the only one the AOT check compiled."""
    for seed in (0, 1, 7, 12345678901, 2**63 - 1):
        for p in (0.1, 0.5, 0.9):
            args = dropout_args(p, seed)
            got = (args["dropout_seed_step"], args["dropout_seed_high"], args["dropout_threshold"])
            words = (*torch_math.dropout_seed_words(seed), torch_math.dropout_threshold(p))
            assert all(-(2**31) <= w < 2**31 for w in got), (seed, p, got)
            assert [w & 0xFFFFFFFF for w in got] == list(words)  # the kernels read the bits as uint32
