"""The packed streams of rec2pm.layout, and their agreement with the kernel patterns."""

import pytest
import torch

from rec2pm.layout import (
    ITEM,
    MEMORY,
    MODES,
    WRITE,
    block_layout,
    history_shape,
    serving_layout,
    stage1_layout,
    stage2_layout,
    update_layout,
)
from rec2pm_kernels import segment_attention
from rec2pm_kernels.patterns import bias_positions, is_write_token

S, C = 4, 2
LENGTHS = [1, S, S + 1, 2 * S, 2 * S + 1, 3 * S + 3]


def history_offsets(lengths):
    return [sum(lengths[:u]) for u in range(len(lengths))]


def test_history_shape():
    archived, tail = history_shape(LENGTHS, S)
    assert archived.tolist() == [0, 0, 1, 1, 2, 3]
    assert tail.tolist() == [1, S, 1, S, 1, 3]


def test_stage1_stream_matches_global_pattern_roles_and_positions():
    lay = stage1_layout(LENGTHS, S, C)
    archived, _ = history_shape(LENGTHS, S)
    assert lay.cu_seqlens.diff().tolist() == [n + k * C for n, k in zip(LENGTHS, archived.tolist(), strict=True)]
    for u, (start, end) in enumerate(zip(lay.cu_seqlens[:-1].tolist(), lay.cu_seqlens[1:].tolist(), strict=True)):
        p = torch.arange(end - start)
        assert torch.equal(lay.role[start:end] == WRITE, is_write_token(p, S, C))
        assert torch.equal(lay.position[start:end], bias_positions("global", p, S, C))
        assert (lay.user[start:end] == u).all()
    # Every history item appears once, in order; each predicts the next one of its history.
    items = lay.rows(ITEM)
    assert lay.item_index[items].tolist() == list(range(sum(LENGTHS)))
    last_items = {o + n - 1 for o, n in zip(history_offsets(LENGTHS), LENGTHS, strict=True)}
    for row in items.tolist():
        idx = int(lay.item_index[row])
        assert int(lay.target_index[row]) == (-1 if idx in last_items else idx + 1)
    writes = lay.rows(WRITE)
    assert lay.slot[writes].tolist() == [c for k in archived.tolist() for _ in range(k) for c in range(C)]


@pytest.mark.parametrize("mode", MODES)
def test_stage2_blocks(mode):
    s1 = stage1_layout(LENGTHS, S, C)
    lay = stage2_layout(LENGTHS, S, C, mode)
    archived, _ = history_shape(LENGTHS, S)
    assert lay.num_sequences == int((archived + 1).sum())
    blocks = list(zip(lay.cu_seqlens[:-1].tolist(), lay.cu_seqlens[1:].tolist(), strict=True))
    b = 0
    for u, (n, k) in enumerate(zip(LENGTHS, archived.tolist(), strict=True)):
        for h in range(k + 1):
            start, end = blocks[b]
            b += 1
            role = lay.role[start:end]
            mem = (C if h else 0) if mode == "overwrite" else h * C
            n_items = S if h < k else n - k * S
            assert role.tolist() == [MEMORY] * mem + [ITEM] * n_items + [WRITE] * (C if h < k else 0)
            assert lay.position[start:end].tolist() == list(range(end - start))
            # Memory tokens read the Stage 1 write tokens of the segments they summarise.
            for row in range(start, start + mem):
                src = int(lay.memory_index[row])
                assert s1.role[src] == WRITE and s1.user[src] == u
                assert int(s1.segment[src]) == int(lay.segment[row])
                assert int(s1.slot[src]) == int(lay.slot[row])
                expected_segment = h - 1 if mode == "overwrite" else (row - start) // C
                assert int(lay.segment[row]) == expected_segment
            # Write tokens name the Stage 1 write token holding their reference memory.
            for row in range(start + mem + n_items, end):
                ref = int(lay.reference_index[row])
                assert s1.role[ref] == WRITE and int(s1.segment[ref]) == h and int(s1.slot[ref]) == int(lay.slot[row])
            # The last item of block h predicts the first item of segment h + 1.
            last_item = start + mem + n_items - 1
            expected = history_offsets(LENGTHS)[u] + h * S + n_items if h < k else -1
            assert int(lay.target_index[last_item]) == expected
    assert lay.item_index[lay.rows(ITEM)].tolist() == list(range(sum(LENGTHS)))


@pytest.mark.parametrize("mode", MODES)
def test_stage2_block_equals_update_block(mode):
    """Same tokens, same positions: a Stage 2 block and the update that reproduces it agree
    through the kernel, memory outputs and item outputs alike."""
    n = 3 * S + 2
    items = torch.randn(n, 2, 8, dtype=torch.float64)
    write = torch.randn(C, 2, 8, dtype=torch.float64)
    s1 = stage1_layout([n], S, C)
    bank = torch.randn(s1.num_tokens, 2, 8, dtype=torch.float64)  # stands for Stage 1 outputs
    s2 = stage2_layout([n], S, C, mode)

    def attend(layout, memory):
        x = layout.embed(items.flatten(1), write.flatten(1), memory.flatten(1)).view(-1, 2, 8)
        x = x + 0.1 * layout.position[:, None, None]  # positions enter like an embedding would
        return segment_attention(x, x, x, layout.cu_seqlens, layout.max_seqlen)

    out2 = attend(s2, bank)
    h = 2
    start, end = s2.cu_seqlens[h].item(), s2.cu_seqlens[h + 1].item()
    mem_rows = s2.memory_index[start:end][s2.role[start:end] == MEMORY]
    upd = update_layout([mem_rows.numel()], [S], C)
    segment_items = items[h * S : (h + 1) * S]

    def attend_update(memory):
        x = upd.embed(segment_items.flatten(1), write.flatten(1), memory.flatten(1)).view(-1, 2, 8)
        x = x + 0.1 * upd.position[:, None, None]
        return segment_attention(x, x, x, upd.cu_seqlens, upd.max_seqlen)

    out_u = attend_update(bank[mem_rows])
    assert torch.equal(upd.role, s2.role[start:end])
    assert torch.equal(upd.position, s2.position[start:end])
    torch.testing.assert_close(out_u, out2[start:end], rtol=0, atol=0)


def test_update_and_serving_blocks():
    upd = update_layout([0, C, 3 * C], [S, S, S], C)
    assert upd.role.tolist()[: S + C] == [ITEM] * S + [WRITE] * C
    mem = upd.rows(MEMORY)
    assert upd.memory_index[mem].tolist() == list(range(4 * C))
    serve = serving_layout([C, 0], [1, 3], C)
    assert serve.role.tolist() == [MEMORY] * C + [ITEM] + [ITEM] * 3
    assert serve.last_rows.tolist() == [C, C + 3]
    assert serve.item_index[serve.rows(ITEM)].tolist() == [0, 1, 2, 3]
    assert serve.target_index[serve.rows(ITEM)].tolist() == [-1, 2, 3, -1]


def test_single_block_needs_no_memory_bank():
    lay = stage2_layout([2], S, C)
    assert lay.embed(torch.randn(2, 3), torch.randn(C, 3)).shape == (2, 3)


def test_to_history_inverts_embed():
    lay = stage1_layout(LENGTHS, S, C)
    items = torch.randn(sum(LENGTHS), 3)
    x = lay.embed(items, torch.randn(C, 3))
    assert torch.equal(lay.to_history(x, sum(LENGTHS)), items)


def test_stage1_streams_are_valid_global_inputs():
    lay = stage1_layout(LENGTHS, S, C)
    x = torch.randn(lay.num_tokens, 1, 4)
    out = segment_attention(
        x, x, x, lay.cu_seqlens, lay.max_seqlen, pattern="global", segment_len=S, num_memory_tokens=C
    )
    assert out.shape == x.shape


@pytest.mark.parametrize(
    "call,exc,text",
    [
        (lambda: stage1_layout([3, 0], S, C), ValueError, "lengths[1] must be >= 1"),
        (lambda: stage1_layout([3.5], S, C), TypeError, "lengths must hold ints"),
        (lambda: stage1_layout([[3]], S, C), ValueError, "lengths must be a 1-D"),
        (lambda: stage1_layout([3], 0, C), ValueError, "segment_len must be an int >= 1"),
        (lambda: stage2_layout([3], S, C, mode="both"), ValueError, "mode must be one of"),
        (lambda: update_layout([C], [S, S], C), ValueError, "memory_counts and item_counts"),
        (lambda: serving_layout([-1], [2], C), ValueError, "memory_counts[0] must be >= 0"),
        (lambda: serving_layout([C], [0], C), ValueError, "recent_lengths[0] must be >= 1"),
        (lambda: history_shape([3], 0), ValueError, "segment_len must be an int >= 1, got 0"),
        (lambda: history_shape([3], True), ValueError, "segment_len must be an int >= 1, got True"),
        (
            lambda: block_layout([0, 0], [2, 2], C, with_write=[True]),
            ValueError,
            "with_write must be one bool, or one per block (2), got shape (1,)",
        ),
        (
            lambda: block_layout([0, 0], [2, 2], C, with_write=[True, False, True]),
            ValueError,
            "with_write must be one bool, or one per block (2), got shape (3,)",
        ),
        (
            lambda: stage2_layout([S + 1], S, C).embed(torch.randn(S + 1, 3), torch.randn(C, 3)),
            ValueError,
            "memory is required",
        ),
    ],
)
def test_bad_input(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


# Event times of one history of five items (S = 2, C = 1): [i0 i1 | i2 i3 | i4].
TIMES = torch.tensor([10, 20, 30, 40, 50])


def test_token_times_of_the_stage1_stream():
    layout = stage1_layout([5], 2, 1)  # i0 i1 w i2 i3 w i4
    key, query = layout.token_times(TIMES)
    assert key.tolist() == [10, 20, 20, 30, 40, 40, 50]  # a write token: its segment's last item
    assert query.tolist() == [20, 30, 20, 40, 50, 40, 50]  # items: their target's time
    _, query = layout.token_times(TIMES, request_times=torch.tensor([99]))
    assert query.tolist() == [20, 30, 20, 40, 50, 40, 99]  # the last item: the request's time


@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_token_times_of_stage2_blocks_read_the_stage1_write_tokens(mode):
    bank_times, _ = stage1_layout([5], 2, 1).token_times(TIMES)
    layout = stage2_layout([5], 2, 1, mode)
    key, query = layout.token_times(TIMES, memory_times=bank_times)
    if mode == "overwrite":  # [i0 i1 w] [m0 i2 i3 w] [m1 i4]
        assert key.tolist() == [10, 20, 20, 20, 30, 40, 40, 40, 50]
        assert query.tolist() == [20, 30, 20, 20, 40, 50, 40, 40, 50]
    else:  # [i0 i1 w] [m0 i2 i3 w] [m0 m1 i4]
        assert key.tolist() == [10, 20, 20, 20, 30, 40, 40, 20, 40, 50]
        assert query.tolist() == [20, 30, 20, 20, 40, 50, 40, 20, 40, 50]


def test_token_times_of_serving_blocks_and_a_missing_memory_time():
    layout = serving_layout([1, 0], [2, 1], 1)  # [m i i] [i]
    key, query = layout.token_times(torch.tensor([7, 8, 9]), memory_times=torch.tensor([5]))
    assert key.tolist() == [5, 7, 8, 9] and query.tolist() == [5, 8, 8, 9]
    with pytest.raises(ValueError, match="memory_times is required"):
        layout.token_times(torch.tensor([7, 8, 9]))
