"""The packed-batch helpers against Python loops, with empty sequences and empty batches."""

from __future__ import annotations

import pytest
import torch

from rec2pm_kernels.varlen import (
    expand_lengths,
    prepare_lens,
    prepare_offsets,
    prepare_position_ids,
    prepare_sequence_and_position_ids,
    prepare_sequence_ids,
    range_rows,
)


@pytest.mark.parametrize("lengths", [[3, 0, 1, 5], [0, 0], [1], [], [7, 2, 0]])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_expansions_match_python_loops(lengths, dtype):
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=dtype)
    sequence = [b for b, n in enumerate(lengths) for _ in range(n)]
    position = [t for n in lengths for t in range(n)]
    assert prepare_lens(cu).tolist() == lengths
    assert prepare_offsets(torch.tensor(lengths, dtype=dtype)).tolist() == cu.tolist()
    assert prepare_sequence_ids(cu).tolist() == sequence
    assert prepare_position_ids(cu).tolist() == position
    both = prepare_sequence_and_position_ids(cu, total=sum(lengths))
    assert [x.tolist() for x in both] == [sequence, position]
    assert all(x.dtype == torch.int64 for x in both)
    assert [x.tolist() for x in expand_lengths(torch.tensor(lengths, dtype=dtype))] == [sequence, position]


def test_range_rows_concatenates_ranges_in_order():
    starts, counts = torch.tensor([5, 0, 9, 2]), torch.tensor([2, 3, 0, 1])
    assert range_rows(starts, counts).tolist() == [5, 6, 0, 1, 2, 2]
    assert range_rows(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)).tolist() == []
