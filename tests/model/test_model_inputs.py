"""Model layer: bad input gives errors naming the argument; the kernel-level module."""

import pytest
import torch

from rec2pm.backbones.decoder import LayerCache
from rec2pm.config import ModelConfig, named_config
from rec2pm.methods import Memory, ServingState, TrainingOptions, build_model
from rec2pm_kernels import SegmentAttention, segment_attention

CFG = named_config("sasrec-small", num_items=30, max_positions=64)


@pytest.fixture
def rec2pm_o():
    return build_model("rec2pm-o", CFG)


@pytest.mark.parametrize(
    "items,cu,text",
    [
        (torch.tensor([1, 31, 2]), torch.tensor([0, 3]), "item id 31, outside the catalogue 1..30"),
        (torch.tensor([1, 0, 2]), torch.tensor([0, 3]), "item id 0, outside the catalogue"),
        (torch.tensor([1, 2, 3]), torch.tensor([0, 3, 3]), "history 1 is empty"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0, 2]), "items must be a 1-D int32/int64 tensor"),
        (torch.tensor([1, 2]), torch.tensor([0, 3]), "must start at 0, be non-decreasing and end at 2"),
        (torch.ones(70, dtype=torch.long), torch.tensor([0, 70]), "max_positions=64"),
        (torch.tensor([1, 2, 3]), torch.tensor([0.0, 1.5, 3.0]), "cu_seqlens for items must be int32 or int64 offsets"),
        (torch.tensor([1, 2, 3]), [0, 3], "cu_seqlens for items must be a 1-D tensor"),
    ],
)
def test_bad_histories(rec2pm_o, items, cu, text):
    with pytest.raises((ValueError, TypeError)) as info:
        rec2pm_o(items, cu)
    assert text in str(info.value)


@pytest.mark.parametrize(
    "memory,counts,text",
    [
        (torch.zeros(3, CFG.d_model), [3], "multiples of num_memory_tokens=2"),
        (torch.zeros(2, CFG.d_model + 1), [2], "memory must have shape (memory_tokens, d_model=16)"),
        (torch.zeros(2, CFG.d_model, dtype=torch.float64), [2], "memory must be torch.float32"),
        (torch.zeros(4, CFG.d_model), [4], "overwrite mode keeps at most C=2"),
        (torch.zeros(4, CFG.d_model), [2], "memory_counts sums to 2 but memory has 4 rows"),
    ],
)
def test_bad_memory(rec2pm_o, memory, counts, text):
    with pytest.raises((ValueError, TypeError)) as info:
        rec2pm_o.score(Memory(memory, torch.tensor(counts)), torch.tensor([1, 2]), torch.tensor([0, 2]))
    assert text in str(info.value)


@pytest.mark.parametrize(
    "changes,text",
    [
        (dict(backbone="gru"), "backbone must be one of"),
        (dict(d_model=30, num_heads=4), "must be divisible by num_heads"),
        (dict(num_items=0), "num_items must be an int >= 1"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(dropout="0.5"), "dropout must be a finite number, got '0.5' (str)"),
        (dict(num_layers=True), "num_layers must be an int, got True (bool)"),
        (dict(silu_norm="max"), "silu_norm must be a finite number or None"),
    ],
)
def test_bad_config(changes, text):
    with pytest.raises((ValueError, TypeError), match=text.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")):
        ModelConfig(**changes)


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="method must be one of"):
        build_model("rnn", CFG)
    with pytest.raises(ValueError, match="memory_norm must be one of"):
        build_model("rec2pm-o", CFG, memory_norm="l2")
    with pytest.raises(TypeError, match="config must be a rec2pm.config.ModelConfig .* got dict"):
        build_model("rec2pm-o", {"backbone": "sasrec", "num_items": 30})
    with pytest.raises(TypeError, match="con_weight must be a finite number, got '1' \\(str\\)"):
        build_model("rec2pm-o", CFG, con_weight="1")
    with pytest.raises(ValueError, match="num_negatives must be >= 1, got -1"):
        build_model("rec2pm-o", CFG, num_negatives=-1)


@pytest.fixture
def served(rec2pm_o):
    """A serving state for two users: memory from a 20-event history each, then 3 recent events."""
    rec2pm_o.eval()
    items = torch.randint(1, 31, (40,))
    memory, tail, tail_cu = rec2pm_o.encode(items, torch.tensor([0, 20, 40]))
    _, state = rec2pm_o.prefill(memory, tail, tail_cu, capacity=16)
    return rec2pm_o, state


@pytest.mark.parametrize(
    "new_items, new_cu, text",
    [
        (torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2, 3]), "must have batch + 1 = 3 entries"),
        (torch.tensor([1, 2]), torch.tensor([0, 2]), "must have batch + 1 = 3 entries"),
        (torch.tensor([1, 2]), torch.tensor([0, 2, 1]), "must start at 0, be non-decreasing and end at 2"),
        (torch.tensor([1, 40]), torch.tensor([0, 1, 2]), "item id 40, outside the catalogue 1..30"),
        (torch.tensor([1, 2]), torch.tensor([0.0, 1.0, 2.0]), "must be int32 or int64 offsets"),
        (torch.arange(1, 21), torch.tensor([0, 12, 20]), "the serving state is full: user 0"),
    ],
)
def test_step_rejects_events_that_do_not_match_the_state(served, new_items, new_cu, text):
    model, state = served
    before = state.seqlens.clone()
    with pytest.raises((ValueError, TypeError)) as info:
        model.step(state, new_items, new_cu)
    assert text in str(info.value)
    assert torch.equal(state.seqlens, before)  # a refused step leaves the state as it was


def test_unvalidated_step_still_refuses_a_step_past_capacity(served):
    """The serving engine's route skips the per-layer cache checks, not the room check: the
    C++ step would otherwise write past the caches."""
    model, state = served
    before = [cache.k.clone() for cache in state.caches], state.seqlens.clone()
    with pytest.raises(ValueError, match="the serving state is full: user 0 holds"):
        model._step_checked(
            state, torch.arange(1, 21), torch.tensor([0, 12, 20]), [12, 8], state.seqlens.tolist(), validate=False
        )
    assert all(torch.equal(cache.k, k) for cache, k in zip(state.caches, before[0], strict=True))
    assert torch.equal(state.seqlens, before[1])


def test_unvalidated_step_equals_the_public_step(served):
    model, state = served
    twin = ServingState([LayerCache(c.k.clone(), c.v.clone()) for c in state.caches], state.seqlens.clone())
    items, cu = torch.tensor([5, 6, 7]), torch.tensor([0, 1, 3])
    public = model.step(state, items, cu)
    engine = model._step_checked(twin, items, cu, [1, 2], twin.seqlens.tolist(), validate=False)
    assert torch.equal(public, engine)
    assert torch.equal(state.seqlens, twin.seqlens)
    assert all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) for a, b in zip(state.caches, twin.caches, strict=True))


@pytest.mark.parametrize("capacity", [8.0, "64", True, 0, [8.0], [0]])
def test_prefill_capacity_must_be_a_positive_int(rec2pm_o, capacity):
    memory = Memory(torch.zeros(0, CFG.d_model), torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="capacity must be an int >= 1"):
        rec2pm_o.prefill(memory, torch.tensor([1, 2]), torch.tensor([0, 2]), capacity=capacity)


def test_prefill_capacities_per_user_match_the_users(rec2pm_o):
    memory = Memory(torch.zeros(0, CFG.d_model), torch.zeros(1, dtype=torch.long))
    with torch.no_grad(), pytest.raises(ValueError, match="one int per sequence \\(1\\), got 2"):
        rec2pm_o.prefill(memory, torch.tensor([1, 2]), torch.tensor([0, 2]), capacity=[8, 8])


def test_segment_attention_module_matches_function():
    attn = SegmentAttention(
        2, pattern="global", segment_len=3, num_memory_tokens=1, score="silu", silu_norm=9.0, num_buckets=6
    )
    with torch.no_grad():
        attn.rel_bias.normal_()
    q, k, v = (torch.randn(9, 2 * 4) for _ in range(3))
    cu = torch.tensor([0, 9])
    out = attn(q, k, v, cu, 9)
    want = segment_attention(
        q.view(9, 2, 4),
        k.view(9, 2, 4),
        v.view(9, 2, 4),
        cu,
        9,
        pattern="global",
        segment_len=3,
        num_memory_tokens=1,
        score="silu",
        silu_norm=9.0,
        rel_bias=attn.rel_bias,
    )
    assert torch.equal(out, want.flatten(1))
    out.sum().backward()
    assert attn.rel_bias.grad is not None and torch.count_nonzero(attn.rel_bias.grad) > 0


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(num_heads=0), "num_heads must be >= 1"),
        (dict(num_heads=2, pattern="sliding"), "pattern must be one of"),
        (dict(num_heads=2, pattern="global"), "needs segment_len (S) and num_memory_tokens (C)"),
        (dict(num_heads=2, score="silu", silu_norm=-1.0), "silu_norm must be a finite number > 0"),
        (dict(num_heads=2, max_attn_len=-1), "max_attn_len must be in"),
        (dict(num_heads=2, dropout=1.5), "dropout_p must be a number in [0, 1)"),
        (dict(num_heads=2, pattern="global", segment_len=3, num_memory_tokens=1, contextual_seq_len=2), "refine"),
        (dict(num_heads=2, num_buckets=0), "num_buckets must be >= 1"),
        (dict(num_heads=2, backend="metal"), "backend must be one of"),
    ],
)
def test_segment_attention_module_checks_its_options_when_built(kwargs, text):
    pattern = text.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises((ValueError, TypeError), match=pattern):
        SegmentAttention(**kwargs)


def test_segment_attention_module_names_a_flat_input_that_does_not_split_into_heads():
    attn = SegmentAttention(2)
    with pytest.raises(ValueError, match=r"v must be \(total_tokens, heads \* dim\) .* got \(9, 7\)"):
        attn(torch.randn(9, 8), torch.randn(9, 8), torch.randn(9, 7), torch.tensor([0, 9]), 9)


@pytest.mark.parametrize("method", ["rec2pm-o", "tok-serial-o", "kv-mask-o", "full", "recent"])
@pytest.mark.parametrize("loss", ["full", "sampled", "bce"])
def test_int32_item_ids_train_as_int64_ones_do(method, loss):
    """check_packed_items takes int32 ids; the losses index with them as int64."""
    torch.manual_seed(0)
    model = build_model(method, CFG, loss=loss).eval()
    items, cu = torch.randint(1, 31, (40,)), torch.tensor([0, 25, 40])
    torch.manual_seed(1)
    wide = model(items, cu).loss
    torch.manual_seed(1)  # the same sampled negatives
    narrow = model(items.int(), cu.int()).loss
    assert torch.equal(narrow, wide)


def test_a_step_gives_users_without_new_events_nan_rows_not_another_users_scores(served):
    model, state = served
    logits = model.step(state, torch.tensor([5, 6]), torch.tensor([0, 2, 2]))  # user 1 has no new event
    assert not logits[0].isnan().any()
    assert logits[1].isnan().all()
    nothing = model.step(state, torch.tensor([], dtype=torch.long), torch.tensor([0, 0, 0]))
    assert nothing.shape == (2, CFG.num_items + 1) and nothing.isnan().all()


@pytest.mark.parametrize(
    "method, options, overrides, text",
    [
        ("rec2pm-o", None, {"mode": "append"}, "mode='append' contradicts method 'rec2pm-o'.*use method 'rec2pm-a'"),
        ("kv-mask-a", None, {"mode": "overwrite"}, "contradicts method 'kv-mask-a'.*use method 'kv-mask-o'"),
        ("tok-serial-o", TrainingOptions(mode="append"), {}, "options.mode='append' contradicts method 'tok-serial-o'"),
        ("full", None, {"mode": "append"}, "method 'full' keeps no memory, so it has no mode"),
    ],
)
def test_a_mode_that_contradicts_the_method_name_is_refused_not_replaced(method, options, overrides, text):
    with pytest.raises(ValueError, match=text):
        build_model(method, CFG, options, **overrides)


def test_the_method_name_sets_the_mode():
    assert build_model("rec2pm-a", CFG).options.mode == "append"
    assert build_model("rec2pm-a", CFG, TrainingOptions(con_weight=0.5)).options.mode == "append"
    assert build_model("rec2pm-o", CFG, mode="overwrite").options.mode == "overwrite"


def test_update_takes_whole_segments_only(rec2pm_o):
    """A memory is written from S items, as training wrote every one; a shorter segment
    would give a memory no model was trained to read."""
    S = CFG.segment_len
    memory = rec2pm_o.empty_memory(2)
    text = f"every segment must hold segment_len={S} items, got \\[{S}, 3\\]"
    with torch.no_grad(), pytest.raises(ValueError, match=text):
        rec2pm_o.update(memory, torch.ones(S + 3, dtype=torch.long), torch.tensor([0, S, S + 3]))
    with torch.no_grad():
        new = rec2pm_o.update(memory, torch.ones(2 * S, dtype=torch.long), torch.tensor([0, S, 2 * S]))
    assert new.counts.tolist() == [CFG.num_memory_tokens] * 2
