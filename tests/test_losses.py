"""Next-item losses: full softmax, sampled softmax with in-batch and random negatives."""

import math

import torch
import torch.nn.functional as F

from rec2pm.losses import full_softmax_loss, sampled_softmax_loss


def test_full_softmax_excludes_padding():
    weight = torch.randn(6, 4)
    hidden = torch.randn(3, 4)
    targets = torch.tensor([1, 5, 2])
    logits = hidden @ weight[1:].T  # items 1..5, never the padding row 0
    torch.testing.assert_close(full_softmax_loss(hidden, targets, weight), F.cross_entropy(logits, targets - 1))


def test_sampled_softmax_in_batch_and_accidental_hits():
    weight = torch.randn(11, 4)
    hidden = torch.randn(3, 4)
    targets = torch.tensor([4, 7, 4])  # rows 0 and 2 share a target: each other's hit is masked
    gen = torch.Generator().manual_seed(0)
    loss = sampled_softmax_loss(hidden, targets, weight, num_negatives=5, generator=gen)
    negatives = torch.randint(1, 11, (5,), generator=torch.Generator().manual_seed(0))
    candidates = torch.cat([targets, negatives])
    logits = hidden @ weight[candidates].T
    expected = []
    for i in range(3):
        keep = (candidates != targets[i])
        keep[i] = True
        row = logits[i][keep]
        positive = logits[i, i]
        expected.append(torch.logsumexp(row, 0) - positive)
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_sampled_loss_at_uniform_scores_is_log_candidates():
    weight = torch.zeros(101, 8)
    hidden = torch.zeros(4, 8)
    targets = torch.tensor([1, 2, 3, 4])
    loss = sampled_softmax_loss(hidden, targets, weight, num_negatives=0)
    assert math.isclose(loss.item(), math.log(4), rel_tol=1e-6)


def test_empty_targets_give_zero_with_a_graph():
    hidden = torch.randn(0, 4, requires_grad=True)
    for loss in (full_softmax_loss(hidden, torch.zeros(0, dtype=torch.long), torch.randn(5, 4)),
                 sampled_softmax_loss(hidden, torch.zeros(0, dtype=torch.long), torch.randn(5, 4), 3)):
        assert loss.item() == 0.0 and loss.requires_grad
