"""Next-item losses: full softmax, sampled softmax with in-batch and random negatives, and the
binary cross-entropy against random negatives of SASRec and S3-Rec."""

import math

import torch
import torch.nn.functional as F

from rec2pm.losses import (
    binary_cross_entropy_loss,
    full_softmax_loss,
    next_item_loss,
    random_other_items,
    sampled_softmax_loss,
)


def test_full_softmax_excludes_padding():
    weight = torch.randn(6, 4)
    hidden = torch.randn(3, 4)
    targets = torch.tensor([1, 5, 2])
    logits = hidden @ weight[1:].T  # items 1..5, never the padding row 0
    torch.testing.assert_close(full_softmax_loss(hidden, targets, weight), F.cross_entropy(logits, targets - 1))


def test_sampled_softmax_in_batch_and_accidental_hits_by_hand():
    """In-batch candidates only, scores chosen by hand: rows 0 and 2 share item 4, so each
    one's copy of it in the other row is an accidental hit and is masked out."""
    weight = torch.zeros(11, 3)
    weight[4], weight[7] = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    hidden = torch.tensor(
        [
            [2.0, 1.0, 0.0],  # s(4) = 2 (target), s(7) = 1
            [0.0, 3.0, 0.0],  # s(7) = 3 (target), s(4) = 0, twice (rows 0 and 2)
            [1.0, 1.0, 0.0],
        ]
    )  # s(4) = 1 (target), s(7) = 1
    targets = torch.tensor([4, 7, 4])
    loss = sampled_softmax_loss(hidden, targets, weight, num_negatives=0)
    e = math.e
    by_hand = [math.log(e**2 + e) - 2, math.log(e**3 + 2) - 3, math.log(e + e) - 1]
    assert math.isclose(loss.item(), sum(by_hand) / 3, rel_tol=1e-6)


def test_random_negatives_are_uniform_items_and_never_padding():
    # Padding scores 50 and every item 0: a single sampled 0 would raise the loss past 40.
    weight = torch.zeros(6, 2)
    weight[0] = torch.tensor([50.0, 0.0])
    hidden = torch.tensor([[1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    losses = [
        sampled_softmax_loss(hidden, torch.tensor([3]), weight, num_negatives=40, generator=gen).item()
        for _ in range(25)
    ]
    # All scores 0 but the target's own accidental hits masked: log(1 + #negatives that are not item 3).
    assert max(losses) < math.log(41) + 1e-6 and min(losses) > math.log(1 + 20)


def test_sampled_loss_at_uniform_scores_is_log_candidates():
    weight = torch.zeros(101, 8)
    hidden = torch.zeros(4, 8)
    targets = torch.tensor([1, 2, 3, 4])
    loss = sampled_softmax_loss(hidden, targets, weight, num_negatives=0)
    assert math.isclose(loss.item(), math.log(4), rel_tol=1e-6)


def test_empty_targets_give_zero_with_a_graph():
    hidden = torch.randn(0, 4, requires_grad=True)
    for loss in (
        full_softmax_loss(hidden, torch.zeros(0, dtype=torch.long), torch.randn(5, 4)),
        sampled_softmax_loss(hidden, torch.zeros(0, dtype=torch.long), torch.randn(5, 4), 3),
        binary_cross_entropy_loss(hidden, torch.zeros(0, dtype=torch.long), torch.randn(5, 4), 1),
    ):
        assert loss.item() == 0.0 and loss.requires_grad


def test_bce_negatives_are_uniform_over_the_other_items():
    targets = torch.tensor([1, 4, 7, 7])
    draws = random_other_items(targets, num_items=7, per_row=30_000, generator=torch.Generator().manual_seed(0))
    assert draws.min() >= 1 and draws.max() <= 7
    for row, target in enumerate(targets.tolist()):
        counts = torch.bincount(draws[row], minlength=8)
        assert counts[0] == 0 and counts[target] == 0  # never padding, never the row's own target
        others = counts[[i for i in range(1, 8) if i != target]].double()
        assert (others / others.sum() - 1 / 6).abs().max() < 0.01  # uniform over the six others


def test_bce_by_hand_with_float64_reference():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=gen)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([1, 8, 3, 3, 5])
    loss = binary_cross_entropy_loss(
        hidden, targets, weight, num_negatives=2, generator=torch.Generator().manual_seed(11)
    )
    negatives = random_other_items(targets, 8, 2, torch.Generator().manual_seed(11))
    by_hand = 0.0
    for n in range(5):
        pos = float(hidden[n].detach() @ weight[targets[n]].detach())
        by_hand -= math.log(1 / (1 + math.exp(-pos)))
        for j in range(2):
            neg = float(hidden[n].detach() @ weight[negatives[n, j]].detach())
            by_hand -= math.log(1 - 1 / (1 + math.exp(-neg)))
    assert math.isclose(loss.item(), by_hand / 5, rel_tol=1e-12)
    loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_bce_stays_finite_at_extreme_scores():
    weight = torch.zeros(4, 1)
    weight[1:, 0] = torch.tensor([1.0, 2.0, 3.0])
    hidden = torch.tensor([[-1e4]])  # s(target) = -1e4: log(sigmoid) underflows in the naive form
    loss = binary_cross_entropy_loss(hidden, torch.tensor([1]), weight, 1, torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and loss.item() > 9_999


def test_bce_through_the_dispatcher_and_too_small_catalogue():
    weight = torch.randn(6, 4)
    hidden, targets = torch.randn(3, 4), torch.tensor([1, 2, 5])
    torch.manual_seed(0)
    first = next_item_loss("bce", hidden, targets, weight, num_negatives=1)
    torch.manual_seed(0)
    assert first.item() == next_item_loss("bce", hidden, targets, weight, num_negatives=1).item()
    try:
        binary_cross_entropy_loss(hidden[:1], torch.tensor([1]), torch.randn(2, 4), 1)
    except ValueError as exc:
        assert "at least 2 items" in str(exc)
    else:
        raise AssertionError("a one-item catalogue has no negative to draw")
