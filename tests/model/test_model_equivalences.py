"""Model layer: the training graph and the inference paths compute the same things (float64)."""

import pytest
import torch

from rec2pm.config import named_config
from rec2pm.layout import ITEM, WRITE, stage1_layout
from rec2pm.methods import METHODS, Memory, build_model

BACKBONES = ["sasrec-small", "hstu-small"]  # S = 8, C = 2, dropout 0
S, C = 8, 2
MEMORY_SIZES = [1, 2, 3]  # the ablation's C = 1, the configs' C = 2, and an odd one
N_ITEMS = 40
TIGHT = dict(rtol=1e-10, atol=1e-10)


def histories(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (sum(lengths),), generator=gen)
    cu = torch.tensor([0] + lengths).cumsum(0)
    return items, cu


def model(method, backbone, seed=0, memory_tokens=C, **options):
    torch.manual_seed(seed)
    config = named_config(backbone, num_items=N_ITEMS, num_memory_tokens=memory_tokens)
    m = build_model(method, config, **options).double()
    with torch.no_grad():  # non-zero biases so that the HSTU bias path is exercised
        for name, p in m.named_parameters():
            if name.endswith("rel_bias"):
                p.normal_(std=0.3)
    return m


def same_weights(src, dst):
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert set(missing) | set(unexpected) <= {"write_tokens"}, (missing, unexpected)
    return dst


@pytest.mark.parametrize("backbone", BACKBONES)
def test_stage1_item_outputs_equal_full_model(backbone):
    lengths = [3 * S + 5, 1, S, S + 1, 2 * S]
    items, cu = histories(lengths)
    r = model("rec2pm-o", backbone)
    full = same_weights(r, model("full", backbone, seed=1))
    layout, out1 = r.stage1(items, torch.tensor(lengths))
    h_full, _ = full.hidden(items, cu)
    torch.testing.assert_close(layout.to_history(out1, items.numel()), h_full, **TIGHT)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["overwrite", "append"])
@pytest.mark.parametrize("memory_norm", ["none", "layernorm"])
@pytest.mark.parametrize("memory_tokens", MEMORY_SIZES)
def test_stage2_block_equals_update_and_score(backbone, mode, memory_norm, memory_tokens):
    lengths = [3 * S + 4]
    items, cu = histories(lengths)
    r = model(f"rec2pm-{mode[0]}", backbone, memory_norm=memory_norm, memory_tokens=memory_tokens)
    _, bank = r.stage1(items, torch.tensor(lengths))
    layout, out2 = r.stage2(items, torch.tensor(lengths), bank)
    for h in (1, 2, 3):
        start, end = int(layout.cu_seqlens[h]), int(layout.cu_seqlens[h + 1])
        role = layout.role[start:end]
        mem_rows = layout.memory_index[start:end][role == 2]
        memory = Memory(bank[mem_rows], torch.tensor([mem_rows.numel()]))
        segment = items[h * S : min((h + 1) * S, lengths[0])]
        item_rows = torch.arange(start, end)[role == ITEM]
        if h < 3:  # archived segment: the update writes the block's memory
            new = r.update(memory, segment, torch.tensor([0, segment.numel()]))
            written = out2[torch.arange(start, end)[role == WRITE]]
            expected = written if mode == "overwrite" else torch.cat([memory.vectors, written])
            torch.testing.assert_close(new.vectors, expected, **TIGHT)
        for j in (0, segment.numel() - 1):  # item predictions = score on [M ; items up to j]
            logits = r.score(memory, segment[: j + 1], torch.tensor([0, j + 1]))
            torch.testing.assert_close(logits, r.logits(out2[item_rows[j : j + 1]]), **TIGHT)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_first_updated_memory_equals_reference(backbone):
    lengths = [2 * S + 3, S + 1]
    items, _ = histories(lengths)
    r = model("rec2pm-o", backbone)
    layout1, out1 = r.stage1(items, torch.tensor(lengths))
    layout2, out2 = r.stage2(items, torch.tensor(lengths), out1)
    rows = torch.nonzero((layout2.role == WRITE) & (layout2.segment == 0)).flatten()
    torch.testing.assert_close(out2[rows], out1[layout2.reference_index[rows]], rtol=0, atol=1e-12)


def serial_bank(t, items, lengths):
    """The Tok-Serial loop's memories, placed at the Stage 1 rows of the write tokens."""
    C = t.config.num_memory_tokens
    s1 = stage1_layout(lengths, S, C)
    bank = torch.zeros(s1.num_tokens, t.config.d_model, dtype=torch.float64)
    starts = s1.cu_seqlens[:-1].long()
    outputs = []
    for layout, out in t.serial_pass(items, lengths):
        outputs.append((layout, out))
        rows = layout.rows(WRITE)
        segment_of_step = len(outputs) - 1
        target = starts[layout.user[rows]] + segment_of_step * (S + C) + S + layout.slot[rows]
        bank[target] = out[rows]
    return bank, outputs


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["overwrite", "append"])
@pytest.mark.parametrize("memory_tokens", MEMORY_SIZES)
def test_parallel_pass_with_serial_memories_equals_tok_serial(backbone, mode, memory_tokens):
    C = memory_tokens
    lengths = torch.tensor([3 * S + 2, S + 3, 2 * S, 1])
    items, cu = histories(lengths.tolist())
    t = model(f"tok-serial-{mode[0]}", backbone, memory_tokens=C)
    r = same_weights(t, model(f"rec2pm-{mode[0]}", backbone, seed=2, memory_tokens=C))
    bank, steps = serial_bank(t, items, lengths)
    layout2, out2 = r.stage2(items, lengths, bank)
    serial_items = torch.zeros(items.numel(), t.config.d_model, dtype=torch.float64)
    for layout, out in steps:
        serial_items += layout.to_history(out, items.numel())
    torch.testing.assert_close(layout2.to_history(out2, items.numel()), serial_items, **TIGHT)
    ar, _ = r.ar_loss(layout2, out2, items)
    torch.testing.assert_close(ar, t(items, cu).ar, **TIGHT)
    # Iterative encoding is the same serial computation: its memory is the loop's last one
    # (overwrite) or all of them (append).
    memory, _, _ = r.encode(items, cu, iterative=True)
    s1 = stage1_layout(lengths, S, C)
    archived = (lengths - 1) // S
    last_segment = archived[s1.user] - 1
    keep = (s1.role == WRITE) & ((s1.segment == last_segment) if mode == "overwrite" else True)
    torch.testing.assert_close(memory.vectors, bank[keep], **TIGHT)
    assert memory.counts.tolist() == ([C, C, C, 0] if mode == "overwrite" else [3 * C, C, C, 0])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_one_segment_histories_agree_across_methods(backbone):
    lengths = [S, 1, 5, S - 1]
    items, cu = histories(lengths)
    r = model("rec2pm-o", backbone)
    t = same_weights(r, model("tok-serial-o", backbone, seed=3))
    f = same_weights(r, model("full", backbone, seed=4))
    losses = [m(items, cu) for m in (r, t, f)]
    for out in losses[1:]:
        torch.testing.assert_close(out.loss, losses[0].loss, **TIGHT)
    assert losses[0].con.item() == 0.0
    scores = [m.score_history(items, cu) for m in (r, t, f)]
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0], **TIGHT)


def grads(m, items, cu):
    m.zero_grad(set_to_none=True)
    m(items, cu).loss.backward()
    return {name: p.grad for name, p in m.named_parameters()}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradients_under_each_stop_gradient_option(backbone):
    """Which parameters learn, per option (documented in TrainingOptions)."""
    lengths = [3 * S + 2, 2 * S + 1]
    items, cu = histories(lengths)
    base = model("rec2pm-o", backbone)
    cases = {
        "default": dict(),
        "detach prefix": dict(detach_prefix=True),
        "detach prefix, no L_con": dict(detach_prefix=True, con_weight=0.0),
        "live target": dict(detach_target=False),
        "stage1 AR": dict(stage1_ar=True, detach_prefix=True, con_weight=0.0),
    }
    results = {}
    for name, options in cases.items():
        m = same_weights(base, model("rec2pm-o", backbone, seed=5, **options))
        results[name] = grads(m, items, cu)
    for name, g in results.items():
        for param, grad in g.items():
            if param.startswith("decoder.position"):
                continue  # rows of unused positions stay zero; checked below
            zero = grad is None or torch.count_nonzero(grad) == 0
            if name in ("detach prefix, no L_con", "stage1 AR") and param == "write_tokens":
                # Stage 1 item rows never see write tokens, so without the live prefix and
                # without L_con nothing downstream of a write token reaches the loss.
                assert zero, f"{name}: write tokens should have no path to the loss"
            else:
                assert not zero, f"{name}: {param} gets no gradient"
        if "decoder.position.weight" in g:
            assert torch.count_nonzero(g["decoder.position.weight"]) > 0
    # The live target pulls the reference too: Stage 1 parameters see a different gradient.
    assert not torch.allclose(results["live target"]["write_tokens"], results["default"]["write_tokens"])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_method_trains_every_parameter(method, backbone):
    items, cu = histories([3 * S + 2, 2 * S + 1, 4])
    g = grads(model(method, backbone), items, cu)
    for param, grad in g.items():
        assert grad is not None and torch.count_nonzero(grad) > 0, f"{method}: {param} gets no gradient"


@pytest.mark.parametrize("backbone,mode", [("sasrec-small", "o"), ("hstu-small", "o"), ("sasrec-small", "a")])
def test_kv_mask_inference_equals_training_forward(backbone, mode):
    lengths = torch.tensor([3 * S + 3, S + 1, 2, 2 * S + S])
    items, cu = histories(lengths.tolist())
    m = model(f"kv-mask-{mode}", backbone)
    layout, out = m.stream(items, lengths)
    memory, tail, tail_cu, positions = m.encode(items, cu)
    served = m.tail_hidden(memory, tail, tail_cu, positions)
    archived = (lengths - 1) // S
    tail_rows = torch.nonzero((layout.role == ITEM) & (layout.segment == archived[layout.user])).flatten()
    torch.testing.assert_close(served, out[tail_rows], **TIGHT)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["o", "a"])
def test_cached_steps_equal_score_on_whole_block(backbone, mode):
    lengths = [3 * S + 5, S + 2, 2 * S + 1]
    items, cu = histories(lengths)
    r = model(f"rec2pm-{mode}", backbone)
    memory, tail, tail_cu = r.encode(items, cu)
    counts = (tail_cu[1:] - tail_cu[:-1]).tolist()
    first = torch.stack([tail[int(tail_cu[b])] for b in range(3)])
    with torch.no_grad():
        _, state = r.prefill(memory, first, torch.arange(4), capacity=int(memory.counts.max()) + S)
        for step in range(1, max(counts)):
            users = [b for b in range(3) if step < counts[b]]
            new = torch.stack([tail[int(tail_cu[b]) + step] for b in users])
            new_cu = torch.tensor([0] + [1 if b in users else 0 for b in range(3)]).cumsum(0)
            logits = r.step(state, new, new_cu)
            for b in users:
                whole = r.score(
                    Memory(
                        memory.vectors[int(memory.counts[:b].sum()) : int(memory.counts[: b + 1].sum())],
                        memory.counts[b : b + 1],
                    ),
                    tail[int(tail_cu[b]) : int(tail_cu[b]) + step + 1],
                    torch.tensor([0, step + 1]),
                )
                torch.testing.assert_close(logits[b : b + 1], whole, **TIGHT)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["o", "a"])
def test_unvalidated_score_and_prefill_equal_the_checked_ones(backbone, mode):
    """``validate=False`` (the serving engine's inputs) skips the checks, not any of the math:
    ragged recent blocks over memories of different sizes (append mode) give the same bits."""
    items, cu = histories([3 * S + 5, S + 2, 2 * S + 1, 5])
    r = model(f"rec2pm-{mode}", backbone)
    memory, tail, tail_cu = r.encode(items, cu)
    with torch.no_grad():
        checked = r.score(memory, tail, tail_cu)
        assert torch.equal(r.score(memory, tail, tail_cu, validate=False), checked)
        capacity = int((memory.counts + tail_cu.diff()).max()) + 2
        logits, state = r.prefill(memory, tail, tail_cu, capacity)
        fast_logits, fast_state = r.prefill(memory, tail, tail_cu, capacity, validate=False)
    assert torch.equal(fast_logits, logits) and torch.equal(logits, checked)
    assert torch.equal(fast_state.seqlens, state.seqlens)
    for fast, cache in zip(fast_state.caches, state.caches, strict=True):
        assert torch.equal(fast.k, cache.k) and torch.equal(fast.v, cache.v)


def test_tok_serial_truncation_changes_gradients_not_the_loss():
    items, cu = histories([4 * S + 1, 3 * S])
    whole = model("tok-serial-o", "sasrec-small")
    cut = same_weights(whole, model("tok-serial-o", "sasrec-small", seed=6, serial_truncation=2))
    out_whole, out_cut = whole(items, cu), cut(items, cu)
    torch.testing.assert_close(out_cut.loss, out_whole.loss, **TIGHT)
    g_whole, g_cut = grads(whole, items, cu), grads(cut, items, cu)
    assert torch.count_nonzero(g_cut["write_tokens"]) > 0
    assert not torch.allclose(g_cut["write_tokens"], g_whole["write_tokens"])
