"""The one-call C++ decoder step equals Decoder.step block by block, and Decoder.prefill through it
equals a causal pass, for both backbones."""

from __future__ import annotations

import pytest
import torch

from rec2pm.backbones import fused_step
from rec2pm.backbones.decoder import UserCaches, caches_from_kv
from rec2pm.config import named_config
from rec2pm.methods import build_model
from rec2pm_kernels.testing import cu_seqlens_of

from ..conftest import require_extension


@pytest.fixture(autouse=True)
def _needs_extension():
    require_extension()
    assert fused_step.available()


def randomised_decoder(backbone: str, dtype):
    model = build_model("full", named_config(f"{backbone}-small", num_items=50, dropout=0.0)).to(dtype).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():  # every weight in play, LayerNorm and bias terms too
            p.add_(torch.randn_like(p) * 0.3)
    return model.decoder


def prefix_and_new_rows(decoder, dtype, prefix, new):
    """Every layer's K/V of `prefix[b]` random rows per user (and their offsets), and `new[b]`
    random rows per user to step at the stream positions after them."""
    d = decoder.config.d_model
    cu = cu_seqlens_of(prefix)
    x = torch.randn(sum(prefix), d, dtype=dtype)
    with torch.no_grad():
        _, kv = decoder(x, torch.cat([torch.arange(n) for n in prefix]), cu, max(prefix), collect_kv=True)
    x_new = torch.randn(sum(new), d, dtype=dtype)
    positions_new = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix, new, strict=True)])
    return kv, cu, x_new, positions_new


def step_both_ways(decoder, dtype, prefix, new):
    """Prefill [prefix] per user, then one step of `new` rows per user, fused and block by block."""
    kv, cu, x_new, positions_new = prefix_and_new_rows(decoder, dtype, prefix, new)
    results = []
    for fused in (True, False):
        caches, seqlens = caches_from_kv(kv, cu, capacity=max(prefix) + max(new) + 2)
        decoder.use_fused_step = fused
        try:
            with torch.no_grad():
                out = decoder.step(x_new, positions_new, cu_seqlens_of(new), max(new), caches, seqlens)
        finally:
            decoder.use_fused_step = True
        results.append((out, caches))
    return results


# Up to 8 new rows the C++ step runs as loops over the weights, beyond as ATen matrix products.
NEW_ROWS = {"loops": [1, 3, 0, 2], "gemm": [5, 4, 0, 3]}


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", list(NEW_ROWS))
def test_fused_step_equals_the_block_by_block_step(backbone, dtype, path):
    decoder = randomised_decoder(backbone, dtype)
    new = NEW_ROWS[path]
    (fused, fused_caches), (plain, plain_caches) = step_both_ways(decoder, dtype, prefix=[5, 1, 9, 3], new=new)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fused, plain, rtol=tolerance, atol=tolerance)
    for a, b in zip(fused_caches, plain_caches, strict=True):  # the same K/V appended in the same slots
        torch.testing.assert_close(a.k, b.k, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(a.v, b.v, rtol=tolerance, atol=tolerance)


# Whole blocks per user: a few rows in all (the loop path) or many (the GEMM path), with an
# empty block and a one-row block among them.
PREFILL_BLOCKS = {"loops": [3, 0, 1, 2], "gemm": [13, 1, 0, 21]}


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", list(PREFILL_BLOCKS))
def test_prefill_through_the_fused_step_equals_a_causal_pass(backbone, dtype, path):
    """Decoder.prefill's one step over empty caches = forward with collect_kv + caches_from_kv."""
    decoder = randomised_decoder(backbone, dtype)
    lengths = PREFILL_BLOCKS[path]
    cu = cu_seqlens_of(lengths)
    x = torch.randn(sum(lengths), decoder.config.d_model, dtype=dtype)
    positions = torch.cat([torch.arange(n) for n in lengths])
    capacity = max(lengths) + 3
    results = []
    for fused in (True, False):
        decoder.use_fused_step = fused
        try:
            with torch.no_grad():
                results.append(decoder.prefill(x, positions, cu, max(lengths), capacity))
        finally:
            decoder.use_fused_step = True
    (fused_out, fused_caches, fused_seqlens), (plain_out, plain_caches, plain_seqlens) = results
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fused_out, plain_out, rtol=tolerance, atol=tolerance)
    assert fused_seqlens.tolist() == plain_seqlens.tolist() == lengths
    for a, b in zip(fused_caches, plain_caches, strict=True):
        assert a.k.shape == b.k.shape == (len(lengths), capacity, *b.k.shape[2:])
        torch.testing.assert_close(a.k, b.k, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(a.v, b.v, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "stacked"])
@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
@pytest.mark.parametrize("path", list(PREFILL_BLOCKS))
def test_a_prefill_into_caches_held_per_user_equals_the_batched_prefill(backbone, path, fused):
    """Capacities per user give each user its own caches (an exact fit, or room to spare),
    holding the batched prefill's slots and zeros after them: bit for bit through the C++
    step; without it the batched prefill is a causal pass and this a cached step over empty
    caches, two kernels that round apart."""
    decoder = randomised_decoder(backbone, torch.float32)
    lengths = PREFILL_BLOCKS[path]
    cu = cu_seqlens_of(lengths)
    x = torch.randn(sum(lengths), decoder.config.d_model)
    positions = torch.cat([torch.arange(n) for n in lengths])
    capacities = [n + (b % 2) * 5 + (n == 0) for b, n in enumerate(lengths)]
    decoder.use_fused_step = fused
    try:
        with torch.no_grad():
            expected, batched, _ = decoder.prefill(x, positions, cu, max(lengths), max(capacities))
            out, users, seqlens = decoder.prefill(x, positions, cu, max(lengths), capacities)
    finally:
        decoder.use_fused_step = True
    tolerance = 0 if fused else 2e-6
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    assert isinstance(users, UserCaches) and users.capacities() == capacities and seqlens.tolist() == lengths
    for b, (n, user) in enumerate(zip(lengths, users.layers, strict=True)):
        for (k, v), cache in zip(user, batched, strict=True):
            torch.testing.assert_close(k[:n], cache.k[b, :n], rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(v[:n], cache.v[b, :n], rtol=tolerance, atol=tolerance)
            assert not k[n:].any() and not v[n:].any()


def test_a_prefill_into_caches_held_per_user_checks_the_capacities():
    decoder = randomised_decoder("hstu", torch.float32)
    x = torch.randn(6, decoder.config.d_model)
    args = (x, torch.tensor([0, 1, 0, 1, 2, 3]), cu_seqlens_of([2, 4]), 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="capacity 3 of sequence 1 is smaller than its length \\(4\\)"):
            decoder.prefill(*args, capacity=[2, 3])
        with pytest.raises(ValueError, match="one int per sequence \\(2\\), got 1"):
            decoder.prefill(*args, capacity=[8])


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
@pytest.mark.parametrize("path", list(PREFILL_BLOCKS))
def test_a_step_over_empty_caches_ignores_what_they_held(backbone, path):
    """Decoder.prefill hands the C++ step uninitialised caches: whatever they hold (NaN here),
    the step writes each user's rows, zeroes the slots after them and reads nothing else."""
    decoder = randomised_decoder(backbone, torch.float32)
    lengths = PREFILL_BLOCKS[path]
    cu = cu_seqlens_of(lengths)
    x = torch.randn(sum(lengths), decoder.config.d_model)
    positions = torch.cat([torch.arange(n) for n in lengths])
    capacity = max(lengths) + 3
    with torch.no_grad():
        expected, expected_caches, _ = decoder.prefill(x, positions, cu, max(lengths), capacity)
        nan = float("nan")
        stale = [type(c)(torch.full_like(c.k, nan), torch.full_like(c.v, nan)) for c in expected_caches]
        seqlens = torch.zeros(len(lengths), dtype=torch.int32)
        out = decoder.step(x, positions, cu, max(lengths), stale, seqlens)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for a, b in zip(stale, expected_caches, strict=True):
        torch.testing.assert_close(a.k, b.k, rtol=0, atol=0)
        torch.testing.assert_close(a.v, b.v, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
def test_the_matrix_path_reads_weights_of_any_layout(backbone):
    """Past 8 rows the step reads norms and biases through raw pointers: a weight stored
    transposed (a non-contiguous view) is copied for the call, never misread."""
    decoder = randomised_decoder(backbone, torch.float32)
    first = decoder.blocks[0]
    linear = first.f1 if backbone == "hstu" else first.query
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous().t())
        first._modules[next(iter(first._modules))].bias = torch.nn.Parameter(
            torch.randn(2 * decoder.config.d_model)[::2]  # the first LayerNorm's bias, strided
        )
    assert not linear.weight.is_contiguous()
    (fused, fused_caches), (plain, plain_caches) = step_both_ways(
        decoder, torch.float32, prefix=[5, 1, 9, 3], new=NEW_ROWS["gemm"]
    )
    torch.testing.assert_close(fused, plain, rtol=2e-5, atol=2e-5)
    for a, b in zip(fused_caches, plain_caches, strict=True):
        torch.testing.assert_close(a.k, b.k, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("lengths", [[13, 1, 0, 21], [3, 0, 1, 2], [1], [0, 0]], ids=str)
def test_the_fused_causal_forward_equals_the_block_by_block_pass(backbone, dtype, lengths):
    """Decoder.forward with the causal pattern in inference runs in one C++ call (no caches)."""
    decoder = randomised_decoder(backbone, dtype)
    cu = cu_seqlens_of(lengths)
    x = torch.randn(sum(lengths), decoder.config.d_model, dtype=dtype)
    positions = torch.cat([torch.arange(n) for n in lengths])
    outputs = []
    for fused in (True, False):
        decoder.use_fused_step = fused
        try:
            with torch.no_grad():
                outputs.append(decoder(x, positions, cu, max(lengths)))
        finally:
            decoder.use_fused_step = True
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(outputs[0], outputs[1], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "block-by-block"])
def test_the_last_rows_of_a_forward_are_its_last_rows(backbone, dtype, fused):
    """``last_rows_only`` returns each sequence's last row of the whole pass: the fused pass
    computes the last layer after attention, and its attention, for the 16-row block holding
    each last row only (lengths on, before and past block edges; one row; 100 rows)."""
    decoder = randomised_decoder(backbone, dtype)
    lengths = [1, 15, 16, 17, 33, 100, 2]
    cu = cu_seqlens_of(lengths)
    x = torch.randn(sum(lengths), decoder.config.d_model, dtype=dtype)
    positions = torch.cat([torch.arange(n) for n in lengths])
    decoder.use_fused_step = fused
    try:
        with torch.no_grad():
            whole = decoder(x, positions, cu, max(lengths))
            last = decoder(x, positions, cu, max(lengths), last_rows_only=True)
    finally:
        decoder.use_fused_step = True
    assert last.shape == (len(lengths), decoder.config.d_model)
    # The same math on the same rows; the products of a few gathered rows may round apart.
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(last, whole[cu[1:] - 1], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "block-by-block"])
@pytest.mark.parametrize("per_user", [False, True], ids=["batch-caches", "caches-per-user"])
def test_a_prefill_of_the_last_rows_only_keeps_every_rows_caches(backbone, fused, per_user):
    decoder = randomised_decoder(backbone, torch.float64)
    lengths = [17, 1, 40]
    cu = cu_seqlens_of(lengths)
    x = torch.randn(sum(lengths), decoder.config.d_model, dtype=torch.float64)
    positions = torch.cat([torch.arange(n) for n in lengths])
    capacity = [n + 3 for n in lengths] if per_user else 43
    decoder.use_fused_step = fused
    try:
        with torch.no_grad():
            whole, caches, seqlens = decoder.prefill(x, positions, cu, 40, capacity)
            last, last_caches, last_seqlens = decoder.prefill(x, positions, cu, 40, capacity, last_rows_only=True)
    finally:
        decoder.use_fused_step = True
    torch.testing.assert_close(last, whole[cu[1:] - 1], rtol=1e-12, atol=1e-12)
    assert torch.equal(last_seqlens, seqlens)
    layers = caches.layers if per_user else [[(c.k, c.v) for c in caches]]
    last_layers = last_caches.layers if per_user else [[(c.k, c.v) for c in last_caches]]
    for user, last_user in zip(layers, last_layers, strict=True):
        for (k, v), (last_k, last_v) in zip(user, last_user, strict=True):
            assert torch.equal(last_k, k) and torch.equal(last_v, v)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "block-by-block"])
def test_last_rows_only_refuses_an_empty_sequence(fused):
    decoder = randomised_decoder("hstu", torch.float32)
    lengths = [3, 0, 2]
    x = torch.randn(5, decoder.config.d_model)
    positions = torch.cat([torch.arange(n) for n in lengths])
    decoder.use_fused_step = fused
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="last_rows_only needs every sequence non-empty"):
            decoder(x, positions, cu_seqlens_of(lengths), 3, last_rows_only=True)
    finally:
        decoder.use_fused_step = True
    with pytest.raises(ValueError, match="collect_kv needs every row"):
        decoder(x, positions, cu_seqlens_of([3, 2]), 3, collect_kv=True, last_rows_only=True)


def test_the_fused_forward_gives_the_same_bits_for_any_thread_count():
    """Past some thousand rows the row-wise loops split over threads; each row is computed alone."""
    decoder = randomised_decoder("hstu", torch.float32)
    lengths = [500, 500, 300, 5, 0]  # 1,305 rows of width 16: more than one thread's share
    x = torch.randn(sum(lengths), decoder.config.d_model)
    positions = torch.cat([torch.arange(n) for n in lengths])
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.no_grad():
                outputs.append(decoder(x, positions, cu_seqlens_of(lengths), max(lengths)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])


def test_only_the_causal_pattern_in_inference_takes_the_fused_forward(monkeypatch):
    decoder = randomised_decoder("hstu", torch.float32)
    calls = []
    monkeypatch.setattr(fused_step, "fused_forward", lambda *args, **options: calls.append(args) or args[1])
    x, positions, cu = torch.randn(4, decoder.config.d_model), torch.arange(4), cu_seqlens_of([4])
    with torch.no_grad():
        decoder(x, positions, cu, 4)
        assert len(calls) == 1
        decoder(x, positions, cu, 4, collect_kv=True)  # the caller wants every layer's K/V
        decoder(x, positions, cu, 4, pattern="global", segment_len=2, num_memory_tokens=1)
    decoder(x, positions, cu, 4)  # gradients are recorded
    assert len(calls) == 1


def test_prefill_refuses_a_capacity_below_the_longest_block():
    decoder = randomised_decoder("hstu", torch.float64)
    x = torch.randn(6, decoder.config.d_model, dtype=torch.float64)
    for fused in (True, False):
        decoder.use_fused_step = fused
        try:
            too_small = "capacity 3 is smaller than the longest sequence \\(4\\)"
            with torch.no_grad(), pytest.raises(ValueError, match=too_small):
                decoder.prefill(x, torch.tensor([0, 1, 0, 1, 2, 3]), cu_seqlens_of([2, 4]), 4, capacity=3)
        finally:
            decoder.use_fused_step = True


def test_the_fused_step_refuses_to_write_past_the_capacity():
    decoder = randomised_decoder("hstu", torch.float64)
    d = decoder.config.d_model
    with torch.no_grad():
        _, kv = decoder(torch.randn(4, d, dtype=torch.float64), torch.arange(4), cu_seqlens_of([4]), 4, collect_kv=True)
        caches, seqlens = caches_from_kv(kv, cu_seqlens_of([4]), capacity=5)
        with pytest.raises(ValueError, match="k_cache capacity 5 is too small: user 0"):
            decoder.step(
                torch.randn(2, d, dtype=torch.float64), torch.tensor([4, 5]), cu_seqlens_of([2]), 2, caches, seqlens
            )


def test_training_mode_and_gradients_take_the_block_by_block_path():
    decoder = randomised_decoder("sasrec", torch.float32)
    x = torch.randn(2, decoder.config.d_model)
    assert not fused_step.applies(decoder, x, [])  # gradients are recorded here
    with torch.no_grad():
        assert fused_step.applies(decoder, x, [])
        assert not fused_step.applies(decoder, x.half(), [])
        decoder.train()
        assert not fused_step.applies(decoder, x, [])


@pytest.mark.parametrize(
    "validate,error,text",
    [
        (True, ValueError, "layer 1's k_cache must have layer 0's shape .* dtype torch.float32"),
        (False, RuntimeError, "layer 1: the K cache must be a .* CPU tensor of x's dtype"),
    ],
)
def test_a_step_over_caches_of_mixed_dtypes_is_refused_before_anything_is_written(validate, error, text):
    """The fused step is chosen by the first layer's caches; a later layer's of another dtype
    is refused by the step's checks or, without them (the serving engine), by the C++ step's,
    with every cache as it was."""
    decoder = randomised_decoder("hstu", torch.float32)
    d = decoder.config.d_model
    with torch.no_grad():
        _, kv = decoder(torch.randn(3, d), torch.arange(3), cu_seqlens_of([3]), 3, collect_kv=True)
        caches, seqlens = caches_from_kv(kv, cu_seqlens_of([3]), capacity=6)
        caches[1] = type(caches[1])(caches[1].k.double(), caches[1].v.double())
        before = [(c.k.clone(), c.v.clone()) for c in caches]
        with pytest.raises(error, match=text):
            decoder.step(
                torch.randn(1, d), torch.tensor([3]), cu_seqlens_of([1]), 1, caches, seqlens, validate=validate
            )
    assert all(torch.equal(c.k, k) and torch.equal(c.v, v) for c, (k, v) in zip(caches, before, strict=True))
    assert seqlens.tolist() == [3]


def test_the_fused_step_checks_the_cache_shapes_like_every_cached_step():
    """The C++ step writes in place: a cache of another batch or layout is refused, never written past."""
    decoder = randomised_decoder("hstu", torch.float64)
    d, heads = decoder.config.d_model, decoder.config.num_heads
    with torch.no_grad():
        _, kv = decoder(torch.randn(3, d, dtype=torch.float64), torch.arange(3), cu_seqlens_of([3]), 3, collect_kv=True)
        caches, _ = caches_from_kv(kv, cu_seqlens_of([3]), capacity=8)  # one user's caches
        seqlens = torch.tensor([3, 3], dtype=torch.int32)
        with pytest.raises(ValueError, match="k_cache must have shape \\(batch=2"):
            decoder.step(
                torch.randn(2, d, dtype=torch.float64), torch.tensor([3, 3]), cu_seqlens_of([1, 1]), 1, caches, seqlens
            )
        swapped = [type(c)(c.k.transpose(2, 3), c.v) for c in caches]  # heads and head dim exchanged
        if heads != d // heads:
            with pytest.raises(ValueError, match="k_cache must have shape"):
                decoder.step(
                    torch.randn(1, d, dtype=torch.float64),
                    torch.tensor([3]),
                    cu_seqlens_of([1]),
                    1,
                    swapped,
                    seqlens[:1],
                )
        # Every layer is checked, not only the first: another capacity, or K and V in one buffer.
        step = (torch.randn(1, d, dtype=torch.float64), torch.tensor([3]), cu_seqlens_of([1]), 1)
        shorter = list(caches)
        shorter[1] = type(caches[1])(caches[1].k[:, :4], caches[1].v[:, :4])
        with pytest.raises(ValueError, match="layer 1's k_cache must have layer 0's shape"):
            decoder.step(*step, shorter, seqlens[:1])
        shared = list(caches)
        shared[1] = type(caches[1])(caches[1].k, caches[1].k)
        with pytest.raises(ValueError, match="layer 1's k_cache and v_cache must not share memory"):
            decoder.step(*step, shared, seqlens[:1])
    ext = require_extension()
    with pytest.raises(RuntimeError, match="must be \\(batch, capacity, heads, head_dim\\)"):
        q = torch.randn(2, heads, d // heads, dtype=torch.float64)
        ext.cached_step_forward(
            q, q, q, torch.tensor([0, 1, 2]), caches[0].k, caches[0].v, torch.tensor([3, 3]), True, 0, 1.0, None, 1.0
        )


def _user_caches(caches, filled, capacities):
    """Each user's own copy of its ``filled[b]`` rows of a batch of caches, in ``capacities[b]``
    slots (NaN after them: a step must never read them)."""
    users = []
    for b, (rows, capacity) in enumerate(zip(filled, capacities, strict=True)):
        layers = []
        for cache in caches:
            own = []
            for batch in (cache.k, cache.v):
                t = torch.full((capacity, *batch.shape[2:]), float("nan"), dtype=batch.dtype)
                t[:rows] = batch[b, :rows]
                own.append(t)
            layers.append(tuple(own))
        users.append(layers)
    return UserCaches(users)


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", list(NEW_ROWS))
def test_a_step_over_caches_held_per_user_equals_the_batched_step(backbone, dtype, path):
    """UserCaches (a session's entries) take the C++ step in place with each user's own
    caches, of any capacities: the same bits as the step over one batch of them."""
    decoder = randomised_decoder(backbone, dtype)
    prefix, new = [5, 1, 9, 3], NEW_ROWS[path]
    kv, cu, x_new, positions_new = prefix_and_new_rows(decoder, dtype, prefix, new)
    batch, seqlens = caches_from_kv(kv, cu, capacity=max(prefix) + max(new) + 2)
    users = _user_caches(batch, prefix, [p + n + extra for p, n, extra in zip(prefix, new, [0, 3, 1, 7], strict=True)])
    with torch.no_grad():
        expected = decoder.step(x_new, positions_new, cu_seqlens_of(new), max(new), batch, seqlens)
        out = decoder.step(x_new, positions_new, cu_seqlens_of(new), max(new), users, seqlens)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for b, (p, n) in enumerate(zip(prefix, new, strict=True)):
        for (k, v), cache in zip(users.layers[b], batch, strict=True):
            torch.testing.assert_close(k[: p + n], cache.k[b, : p + n], rtol=0, atol=0)
            torch.testing.assert_close(v[: p + n], cache.v[b, : p + n], rtol=0, atol=0)
            assert k[p + n :].isnan().all() and v[p + n :].isnan().all()  # nothing written past the new rows


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
@pytest.mark.parametrize("capacities", [[10, 10, 10], [10, 5, 7]], ids=["equal", "unequal"])
def test_caches_held_per_user_without_the_fused_step_are_stacked_and_written_back(backbone, capacities):
    """Padded to the largest capacity, so users of any capacities step together on every path."""
    decoder = randomised_decoder(backbone, torch.float32)
    prefix, new = [4, 2, 6], [1, 3, 0]
    kv, cu, x_new, positions_new = prefix_and_new_rows(decoder, torch.float32, prefix, new)
    batch, seqlens = caches_from_kv(kv, cu, capacity=10)
    users = _user_caches(batch, prefix, capacities)
    with torch.no_grad():
        expected = decoder.step(x_new, positions_new, cu_seqlens_of(new), 3, batch, seqlens)
        decoder.use_fused_step = False
        try:
            out = decoder.step(x_new, positions_new, cu_seqlens_of(new), 3, users, seqlens)
        finally:
            decoder.use_fused_step = True
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    for b, (p, n) in enumerate(zip(prefix, new, strict=True)):
        for (k, _), cache in zip(users.layers[b], batch, strict=True):
            torch.testing.assert_close(k[: p + n], cache.k[b, : p + n], rtol=2e-5, atol=2e-5)


def test_stacked_caches_held_per_user_refuse_a_step_past_a_users_own_capacity():
    """The padded batch has the largest capacity; each user's own is checked before the step."""
    decoder = randomised_decoder("hstu", torch.float32)
    prefix, new = [4, 2, 6], [1, 3, 0]
    kv, cu, x_new, positions_new = prefix_and_new_rows(decoder, torch.float32, prefix, new)
    batch, seqlens = caches_from_kv(kv, cu, capacity=10)
    users = _user_caches(batch, prefix, [10, 4, 7])
    decoder.use_fused_step = False
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="user 1 holds 2 of 4 cache slots and got 3 new events"):
            decoder.step(x_new, positions_new, cu_seqlens_of(new), 3, users, seqlens)
    finally:
        decoder.use_fused_step = True


@pytest.mark.parametrize(
    "break_caches, text",
    [
        (lambda users: users[1].__setitem__(0, (users[1][0][0][:3], users[1][0][1][:3])), "must fit its caches"),
        (lambda users: users[2].__setitem__(1, (users[2][1][0].double(), users[2][1][1])), "of x's dtype"),
        (
            lambda users: users[1].__setitem__(0, (users[1][0][0].transpose(1, 2), users[1][0][1])),
            "the K cache must be",
        ),
        (lambda users: users[0].__setitem__(0, (users[0][0][0], users[0][0][0])), "share memory"),
        (lambda users: users[2].__setitem__(1, users[0][1]), "share memory"),
        (
            lambda users: users[1].__setitem__(1, (users[1][1][0], users[1][1][1][:6])),
            "K and V caches must have one capacity",
        ),
        (lambda users: users[2].pop(), "for each of the 3 users"),
    ],
    ids=["too-small", "dtype", "strides", "k-is-v", "two-users-one-cache", "k-v-capacities", "missing-layer"],
)
def test_the_step_over_caches_held_per_user_checks_every_cache(break_caches, text):
    """The C++ call writes each user's caches through raw pointers: every one is checked first."""
    decoder = randomised_decoder("hstu", torch.float32)
    prefix, new = [3, 2, 4], [2, 2, 1]
    kv, cu, x_new, positions_new = prefix_and_new_rows(decoder, torch.float32, prefix, new)
    batch, seqlens = caches_from_kv(kv, cu, capacity=8)
    users = _user_caches(batch, prefix, [8, 8, 8])
    break_caches(users.layers)
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError), match=text):
        decoder.step(x_new, positions_new, cu_seqlens_of(new), 2, users, seqlens)


def test_the_step_over_caches_held_per_user_checks_the_offsets():
    decoder = randomised_decoder("sasrec", torch.float32)
    layers = [[(torch.zeros(6, 2, 8), torch.zeros(6, 2, 8)) for _ in decoder.blocks] for _ in range(2)]
    x_new = torch.randn(3, decoder.config.d_model)
    seqlens = torch.tensor([1, 2], dtype=torch.int32)
    for cu in ([0, 1, 4], [1, 2, 3]):  # past the rows; not from 0
        with torch.no_grad(), pytest.raises(RuntimeError, match="cu_seqlens_new must start at 0 and end at the 3"):
            decoder.step(x_new, torch.tensor([1, 2, 3]), torch.tensor(cu), 2, UserCaches(layers), seqlens)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cu_seqlens_new must not decrease, got 4 then 3"):
        decoder.step(x_new, torch.tensor([1, 2, 3]), torch.tensor([0, 4, 3]), 4, UserCaches(layers), seqlens)
