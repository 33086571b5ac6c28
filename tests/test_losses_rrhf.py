"""alignkit.losses.rrhf: ranking hinge on length-normalised log-probs plus SFT on the best."""

import pytest
import torch

from alignkit.losses.rrhf import rrhf_loss


def test_rank_loss_zero_when_order_agrees():
    seq = torch.tensor([[-4.0, -4.0, -5.0]])
    lens = torch.tensor([[2, 4, 5]])
    rew = torch.tensor([[1.0, 2.0, 3.0]])
    loss, m = rrhf_loss(seq, lens, rew, torch.ones(1, 3), alpha=1.0)
    # p = [-4/2, -4/4, -5/5] = [-2, -1, -1]: non-decreasing with reward -> every hinge is 0
    # L_ft = -seq_logp of the best (reward 3) = 5
    assert m["loss/rank"].item() == 0.0
    assert m["loss/ft"].item() == 5.0
    assert loss.item() == 5.0
    # strict accuracy: (0,1) -2 < -1 yes, (0,2) yes, (1,2) -1 < -1 no -> 2/3
    assert m["rank_accuracy"].item() == pytest.approx(2 / 3)


def test_rank_loss_positive_when_order_disagrees():
    seq = torch.tensor([[-4.0, -4.0, -5.0]])
    lens = torch.tensor([[2, 4, 5]])
    rew = torch.tensor([[1.0, 2.0, 3.0]])
    loss, m = rrhf_loss(seq, lens, rew, torch.ones(1, 3), alpha=0.0, weight=0.5)
    # α = 0: p = seq = [-4, -4, -5]
    # r0<r1: max(0, -4 + 4) = 0; r0<r2: max(0, -4 + 5) = 1; r1<r2: max(0, -4 + 5) = 1 -> 2
    # L = 0.5 * 2 + 5 = 6
    assert m["loss/rank"].item() == 2.0
    assert loss.item() == 6.0
    assert m["rank_accuracy"].item() == 0.0


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.0, 1.0),  # p = [-2, -3]            -> max(0, -2 + 3) = 1
        (0.5, 2.0),  # p = [-2/√4, -3/√1] = [-1, -3] -> 2
        (1.0, 2.5),  # p = [-2/4, -3/1] = [-0.5, -3] -> 2.5
    ],
)
def test_length_normalisation_alpha(alpha, expected):
    seq = torch.tensor([[-2.0, -3.0]])
    lens = torch.tensor([[4, 1]])
    rew = torch.tensor([[0.0, 1.0]])
    loss, m = rrhf_loss(seq, lens, rew, torch.ones(1, 2), alpha=alpha)
    assert m["loss/rank"].item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(expected + 3.0)  # L_ft = 3


def test_mask_and_gradients():
    seq = torch.tensor([[-2.0, -3.0, -1.0]], requires_grad=True)
    lens = torch.tensor([[1, 1, 1]])
    rew = torch.tensor([[0.0, 1.0, 99.0]])  # the third is padding despite its reward
    loss, m = rrhf_loss(seq, lens, rew, torch.tensor([[1, 1, 0]]))
    # valid pair r0 < r1: max(0, -2 + 3) = 1; L_ft = 3 (response 1) -> 4
    assert loss.item() == 4.0
    assert m["num_pairs"].item() == 1
    loss.sum().backward()
    # d/dseq0 = +1 (hinge); d/dseq1 = -1 (hinge) - 1 (ft); padding gets nothing
    torch.testing.assert_close(seq.grad, torch.tensor([[1.0, -2.0, 0.0]]))
    # a prompt with no valid response contributes 0
    empty, _ = rrhf_loss(seq.detach(), lens, rew, torch.zeros(1, 3))
    assert empty.item() == 0.0
