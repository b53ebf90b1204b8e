"""What layouts keep: the shared cache of built layouts, device copies and row sets made once,
and the host-side maxima that spare the decoder a read from the device."""

import pytest
import torch

import rec2pm.layout
from rec2pm.config import named_config
from rec2pm.layout import (
    ITEM,
    MEMORY,
    PER_TOKEN_FIELDS,
    WRITE,
    LayoutCache,
    block_layout,
    serving_layout,
    stage1_layout,
    stage2_layout,
    update_layout,
)
from rec2pm.methods import Memory, build_model

S, C = 4, 2
LENGTHS = [1, S, S + 1, 2 * S + 1, 3 * S + 3]

BUILDS = [
    (stage1_layout, (LENGTHS, S, C), {}),
    (stage2_layout, (LENGTHS, S, C, "overwrite"), {}),
    (stage2_layout, (LENGTHS, S, C, "append"), {}),
    (update_layout, ([0, C, C], [S, 1, 3], C), {}),
    (serving_layout, ([C, 0], [2, 5], C), {}),
    (
        block_layout,
        ([0, C, 0], [2, 3, 1], C),
        dict(with_write=[True, False, False], users=[0, 0, 1], item_first=[0, 2, 0], history_lengths=[5, 1]),
    ),
]


def assert_same_layout(got, want):
    assert got.max_seqlen == want.max_seqlen
    assert torch.equal(got.cu_seqlens, want.cu_seqlens)
    for name in PER_TOKEN_FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def counting(builder):
    calls = []

    def build(*args, **kwargs):
        calls.append(args)
        return builder(*args, **kwargs)

    return build, calls


@pytest.mark.parametrize("builder,args,kwargs", BUILDS, ids=lambda x: getattr(x, "__name__", None))
def test_a_cached_layout_equals_a_fresh_one_and_a_hit_builds_nothing(builder, args, kwargs):
    cache = LayoutCache()
    build, calls = counting(builder)

    def as_tensors(values):  # new tensors on every call, as the methods pass their host lengths
        return [torch.tensor(v) if isinstance(v, list) else v for v in values]

    first = cache.get(build, *as_tensors(args), **dict(zip(kwargs, as_tensors(kwargs.values()), strict=True)))
    again = cache.get(build, *as_tensors(args), **dict(zip(kwargs, as_tensors(kwargs.values()), strict=True)))
    assert again is first and len(calls) == 1 and cache.builds == 1
    assert_same_layout(first, builder(*args, **kwargs))


def test_other_arguments_build_other_layouts():
    cache = LayoutCache()
    build, calls = counting(stage2_layout)
    lengths = torch.tensor(LENGTHS)
    layouts = [
        cache.get(build, lengths, S, C, "overwrite"),
        cache.get(build, lengths + 1, S, C, "overwrite"),
        cache.get(build, lengths, S + 1, C, "overwrite"),
        cache.get(build, lengths, S, C, "append"),
    ]
    assert len(calls) == 4 and len(cache) == 4
    assert_same_layout(layouts[3], stage2_layout(LENGTHS, S, C, "append"))


def test_a_float_tensor_never_finds_the_layout_of_an_int_one():
    cache = LayoutCache()
    cache.get(stage1_layout, torch.tensor(LENGTHS), S, C)
    with pytest.raises(TypeError, match="lengths must hold ints"):
        cache.get(stage1_layout, torch.tensor(LENGTHS, dtype=torch.float32), S, C)


def test_the_cache_keeps_at_most_max_entries_least_recently_used_out_first():
    cache = LayoutCache(max_entries=3)
    build, calls = counting(stage1_layout)
    for n in range(1, 6):
        cache.get(build, [n], S, C)
        cache.get(build, [1], S, C)  # used after every other: never the least recent
    assert len(cache) == 3 and len(calls) == 5
    cache.get(build, [1], S, C)
    cache.get(build, [5], S, C)
    assert len(calls) == 5  # both kept
    cache.get(build, [2], S, C)
    assert len(calls) == 6  # dropped long ago: built again


def test_the_cache_keeps_at_most_max_tokens_and_skips_a_layout_larger_than_that():
    cache = LayoutCache(max_tokens=20)
    for n in (8, 8, 9, 10):
        cache.get(stage1_layout, [n], 100, C)  # one segment: n tokens each
    assert cache.tokens == 19 and len(cache) == 2
    big = cache.get(stage1_layout, [21], 100, C)
    assert big.num_tokens == 21 and cache.tokens == 19 and len(cache) == 2
    cache.clear()
    assert cache.tokens == 0 and len(cache) == 0


@pytest.mark.parametrize("kwargs", [dict(max_entries=0), dict(max_tokens=0), dict(max_entries=True)])
def test_cache_bounds_must_be_positive_ints(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        LayoutCache(**kwargs)


def test_a_training_step_with_the_lengths_of_an_earlier_one_builds_no_layout(monkeypatch):
    cache = LayoutCache()
    monkeypatch.setattr(rec2pm.layout, "layout_cache", cache)
    torch.manual_seed(0)
    model = build_model("rec2pm-o", named_config("sasrec-small", num_items=30, segment_len=S, num_memory_tokens=C))
    items = torch.randint(1, 31, (sum(LENGTHS),))
    cu = torch.tensor([0, *LENGTHS]).cumsum(0)
    first = model(items, cu).loss
    assert cache.builds == 2  # Stage 1 and Stage 2
    assert torch.equal(model(items, cu).loss, first) and cache.builds == 2
    shorter = cu.clone()
    shorter[-1] -= 1
    model(items[:-1], shorter)  # the last history one item shorter: other lengths, other layouts
    assert cache.builds == 4


def test_layouts_first_built_in_inference_mode_still_train(monkeypatch):
    # Serving (inference mode) and training share the cache; a layout kept from a request must
    # not hold inference tensors, which autograd cannot save for backward.
    monkeypatch.setattr(rec2pm.layout, "layout_cache", LayoutCache())
    torch.manual_seed(0)
    model = build_model("rec2pm-o", named_config("sasrec-small", num_items=30, segment_len=S, num_memory_tokens=C))
    items = torch.randint(1, 31, (sum(LENGTHS),))
    cu = torch.tensor([0, *LENGTHS]).cumsum(0)
    with torch.inference_mode():
        model(items, cu)
        model.score_history(items, cu)
    model(items, cu).loss.backward()
    model.score_history(items, cu).sum().backward()


def test_a_device_copy_is_made_once_and_remembers_its_host_layout():
    layout = stage2_layout(LENGTHS, S, C)
    assert layout.to("cpu") is layout and layout.host is layout
    moved = layout.to("meta")
    assert moved is layout.to("meta") and moved.host is layout and moved.to("cpu") is layout
    assert moved.max_seqlen == layout.max_seqlen
    for name in ("cu_seqlens", *PER_TOKEN_FIELDS):
        here, there = getattr(layout, name), getattr(moved, name)
        assert there.device.type == "meta" and (there.shape, there.dtype) == (here.shape, here.dtype), name


def test_row_sets_are_found_once_on_the_host_and_moved_with_the_layout():
    layout = stage2_layout(LENGTHS, S, C)
    for role in (ITEM, WRITE, MEMORY):
        assert layout.rows(role) is layout.rows(role)
        assert torch.equal(layout.rows(role), torch.nonzero(layout.role == role).flatten())
    wanted = torch.nonzero((layout.role == ITEM) & (layout.target_index >= 0)).flatten()
    assert torch.equal(layout.target_rows, wanted) and layout.target_rows is layout.target_rows
    assert layout.max_position == int(layout.position.max())
    moved = layout.to("meta")  # meta tensors hold no values: these can only come from the host
    assert moved.rows(WRITE).device.type == "meta" and moved.rows(WRITE).shape == layout.rows(WRITE).shape
    assert moved.target_rows.shape == wanted.shape and moved.max_position == layout.max_position


def test_token_times_are_computed_on_the_device_of_the_item_times():
    layout = stage1_layout(LENGTHS, S, C)
    key, query = layout.token_times(torch.zeros(sum(LENGTHS), dtype=torch.long, device="meta"))
    assert key.device.type == query.device.type == "meta" and key.shape == (layout.num_tokens,)


def test_the_decoder_checks_the_largest_position_it_is_given():
    model = build_model("full", named_config("sasrec-small", num_items=30, max_positions=16))
    x, positions, cu = torch.zeros(3, model.config.d_model), torch.arange(3), torch.tensor([0, 3])
    model.decoder(x, positions, cu, 3, max_position=2)
    with pytest.raises(ValueError, match="a stream position reaches 16, .* max_positions=16"):
        model.decoder(x, positions, cu, 3, max_position=16)


def test_the_serving_step_checks_the_positions_of_the_new_events_only():
    torch.manual_seed(0)
    config = named_config("sasrec-small", num_items=30, max_positions=16, segment_len=5, num_memory_tokens=2)
    model = build_model("rec2pm-o", config).eval()
    memory = Memory(torch.zeros(0, config.d_model), torch.zeros(2, dtype=torch.long))
    recent = torch.randint(1, 31, (16 + 3,))
    _, state = model.prefill(memory, recent, torch.tensor([0, 16, 19]), capacity=40)
    model.step(state, torch.tensor([7]), torch.tensor([0, 0, 1]))  # user 0 holds positions 0..15 and adds none
    with pytest.raises(ValueError, match="a stream position reaches 16, "):
        model.step(state, torch.randint(1, 31, (13,)), torch.tensor([0, 0, 13]))  # user 1: positions 4..16
