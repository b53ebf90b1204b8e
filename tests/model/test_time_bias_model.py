"""HSTU's timestamp bias in the model layer: the training graph and the scoring paths agree
with times (float64), the times change the outputs, and a model never runs without them
or silently drops them."""

import pytest
import torch

from rec2pm.config import named_config
from rec2pm.layout import ITEM
from rec2pm.methods import Memory, build_model

S, C = 8, 2
N_ITEMS = 40
TIGHT = dict(rtol=1e-10, atol=1e-10)
TIME_BUCKETS = 64  # buckets up to e ** (0.301 * 64) ≈ 2e8 s apart


def histories(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (sum(lengths),), generator=gen)
    gaps = torch.randint(0, 300, (sum(lengths),), generator=gen) ** 2
    times = gaps.cumsum(0) + 1_600_000_000  # increasing per user (one running clock for all)
    return items, torch.tensor([0] + lengths).cumsum(0), times


def model(method, seed=0, **options):
    torch.manual_seed(seed)
    config = named_config("hstu-small", num_items=N_ITEMS, num_time_buckets=TIME_BUCKETS)
    m = build_model(method, config, **options).double()
    with torch.no_grad():  # non-zero tables, so both bias paths matter
        for name, p in m.named_parameters():
            if name.endswith("rel_bias") or name.endswith("ts_bias"):
                p.normal_(std=0.5)
            elif name.endswith(("f1.weight", "f2.weight")):  # block updates that show next to the normed input
                p.normal_(std=0.2)
    return m


def test_stage1_item_outputs_equal_full_model_with_times():
    lengths = [3 * S + 5, 1, S, S + 1]
    items, cu, times = histories(lengths)
    r = model("rec2pm-o")
    full = model("full", seed=1)
    full.load_state_dict({k: v for k, v in r.state_dict().items() if k != "write_tokens"})
    layout, out1 = r.stage1(items, torch.tensor(lengths), times)
    h_full, _ = full.hidden(items, cu, times)
    torch.testing.assert_close(layout.to_history(out1, items.numel()), h_full, **TIGHT)
    h_shifted, _ = full.hidden(items, cu, times * 3)
    assert (h_shifted - h_full).abs().max() > 1e-3  # the times reach the outputs


@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_stage2_item_predictions_equal_score_with_memory_times(mode):
    """Item ``j`` of Stage 2 block ``h`` queries at its target's time; ``score`` over
    ``[M ; items up to j]`` with that time as the request time gives the same logits."""
    lengths = [3 * S + 4]
    items, _, times = histories(lengths)
    r = model(f"rec2pm-{mode[0]}")
    layout1, bank = r.stage1(items, torch.tensor(lengths), times)
    bank_times, _ = layout1.token_times(times)
    layout, out2 = r.stage2(items, torch.tensor(lengths), bank, times, bank_times)
    for h in (1, 3):
        start, end = int(layout.cu_seqlens[h]), int(layout.cu_seqlens[h + 1])
        role = layout.role[start:end]
        mem_rows = layout.memory_index[start:end][role == 2]
        memory = Memory(bank[mem_rows], torch.tensor([mem_rows.numel()]), bank_times[mem_rows])
        first, last = h * S, min((h + 1) * S, lengths[0])
        item_rows = torch.arange(start, end)[role == ITEM]
        for j in (0, last - first - 1):
            request = times[first + j + 1 : first + j + 2] if first + j + 1 < lengths[0] else None
            logits = r.score(
                memory, items[first : first + j + 1], torch.tensor([0, j + 1]), times[first : first + j + 1], request
            )
            torch.testing.assert_close(logits, r.logits(out2[item_rows[j : j + 1]]), **TIGHT)


def test_one_shot_scoring_carries_the_times_through_the_memory():
    lengths = [2 * S + 3, S + 1, 3]
    items, cu, times = histories(lengths)
    r = model("rec2pm-a")
    r.eval()
    with torch.no_grad():
        request = times[cu[1:] - 1] + 10**6
        scored = r.score_history(items, cu, times, request)
        memory, tail, tail_cu = r.encode(items, cu, timestamps=times)
        # Each memory vector has the time of the last item of the segment it was written after.
        assert memory.counts.tolist() == [2 * C, C, 0]
        segment_ends = [S - 1, 2 * S - 1, int(cu[1]) + S - 1]
        assert memory.times.tolist() == [int(times[end]) for end in segment_ends for _ in range(C)]
        tails = tail_cu.diff().tolist()
        tail_times = torch.cat([times[int(end) - n : int(end)] for end, n in zip(cu[1:], tails, strict=True)])
        by_hand = r.score(memory, tail, tail_cu, tail_times, request)
        later = r.score_history(items, cu, times, request + 10**8)
    torch.testing.assert_close(scored, by_hand, **TIGHT)
    assert (later - scored)[:, 1:].abs().max() > 1e-4  # the request time is a query time


def test_training_step_gives_the_time_table_a_gradient():
    items, cu, times = histories([2 * S + 3, 5])
    for method in ("full", "recent", "rec2pm-o"):
        m = model(method)
        m(items, cu, times).loss.backward()
        tables = [p for name, p in m.named_parameters() if name.endswith("ts_bias")]
        assert len(tables) == m.config.num_layers
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tables), method


def test_times_are_required_checked_and_never_dropped():
    items, cu, times = histories([5, 3])
    m = model("full")
    with pytest.raises(ValueError, match="pass timestamps"):
        m(items, cu)
    with pytest.raises(ValueError, match="one time per item"):
        m(items, cu, times[:-1])
    with pytest.raises(TypeError, match="int64"):
        m(items, cu, times.double())
    with pytest.raises(ValueError, match=r"request_times must have shape \(2,\)"):
        m.score_history(items, cu, times, times[:3])
    plain = build_model("full", named_config("hstu-small", num_items=N_ITEMS))
    with pytest.raises(ValueError, match="no timestamp bias"):
        plain(items, cu, times)
    with pytest.raises(ValueError, match="method 'kv-mask' has no timestamp bias"):
        model("kv-mask-o")
    with pytest.raises(ValueError, match="method 'tok-serial' has no timestamp bias"):
        model("tok-serial-o")
    with pytest.raises(ValueError, match="backbone 'sasrec' has no bias terms"):
        named_config("sasrec-small", num_time_buckets=8)
    r = model("rec2pm-o")
    with pytest.raises(ValueError, match="iterative encode"):
        r.encode(items, cu, iterative=True, timestamps=times)
    memory, tail, tail_cu = r.encode(items, cu, timestamps=times)
    with pytest.raises(ValueError, match="prefill"):
        r.prefill(memory, tail, tail_cu, capacity=16)


def test_memory_times_are_checked_like_every_other_time():
    lengths = [2 * S + 3, S + 1]
    items, cu, times = histories(lengths)
    r = model("rec2pm-o").eval()
    memory, tail, tail_cu = r.encode(items, cu, timestamps=times)
    tails = tail_cu.diff().tolist()
    tail_times = torch.cat([times[int(end) - n : int(end)] for end, n in zip(cu[1:], tails, strict=True)])
    with torch.no_grad():
        r.score(memory, tail, tail_cu, tail_times)  # as encode gave them
        for times_of_memory, error, text in [
            (None, ValueError, "pass memory.times"),
            (memory.times.double(), TypeError, "memory.times must be an int32 or int64 tensor"),
            (torch.cat([memory.times, memory.times[:1]]), ValueError, "memory.times must have the items' shape"),
            (memory.times[:-1], ValueError, "memory.times must have the items' shape"),
        ]:
            with pytest.raises(error, match=text):
                r.score(Memory(memory.vectors, memory.counts, times_of_memory), tail, tail_cu, tail_times)
        # No memory yet: the empty memory carries its (empty) times.
        r.score(r.empty_memory(1), items[:5], torch.tensor([0, 5]), times[:5])
    # A model without the bias refuses memory times rather than ignoring them.
    plain = build_model("rec2pm-o", named_config("hstu-small", num_items=N_ITEMS)).double().eval()
    vectors = torch.zeros(C, plain.config.d_model, dtype=torch.float64)
    timed = Memory(vectors, torch.tensor([C]), torch.zeros(C, dtype=torch.long))
    with torch.no_grad(), pytest.raises(ValueError, match="memory.times given, but this model has no timestamp bias"):
        plain.score(timed, items[:3], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="memory.times given"):
        plain.update(timed, items[:S], torch.tensor([0, S]))
    with pytest.raises(TypeError, match=r"memory_counts must be an int32/int64 tensor \(1,\), got list"):
        plain.update(Memory(vectors, [C]), items[:S], torch.tensor([0, S]))
