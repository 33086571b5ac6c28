"""alignkit.losses.reward: Llama 2 margins, pairwise and K-way ranking losses."""

import math

import pytest
import torch

from alignkit.losses.reward import margin_for_ratings, pairwise_loss, ranked_loss

RATINGS = ["significantly better", "better", "slightly better", "negligibly better", None]


def test_margin_tables():
    torch.testing.assert_close(
        margin_for_ratings(RATINGS, "small"), torch.tensor([1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    )
    torch.testing.assert_close(
        margin_for_ratings(RATINGS, "large"), torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0])
    )
    torch.testing.assert_close(margin_for_ratings(RATINGS, "none"), torch.zeros(5))
    with pytest.raises(ValueError, match="much better"):
        margin_for_ratings(["much better"])
    with pytest.raises(ValueError, match="huge"):
        margin_for_ratings(["better"], table="huge")


def test_pairwise_loss_small_table_by_hand():
    # r_c - r_r = 1 for every pair
    rc = torch.tensor([2.0, 2.0, 2.0, 2.0])
    rr = torch.tensor([1.0, 1.0, 1.0, 1.0])
    m = margin_for_ratings(RATINGS[:4], "small")  # [1, 2/3, 1/3, 0]
    loss, metrics = pairwise_loss(rc, rr, margin=m)
    expected = [
        math.log(2),  # -log σ(1 - 1)   = log 2
        math.log1p(math.exp(-1 / 3)),  # -log σ(1 - 2/3) = log(1 + e^{-1/3}) = 0.5403
        math.log1p(math.exp(-2 / 3)),  # -log σ(1 - 1/3) = log(1 + e^{-2/3}) = 0.4144
        math.log1p(math.exp(-1)),  # -log σ(1)       = log(1 + e^{-1})   = 0.3133
    ]
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert metrics["accuracy"].item() == 1.0
    assert metrics["margin"].item() == pytest.approx(1.0)
    assert metrics["rewards/chosen"].item() == pytest.approx(2.0)
    assert metrics["rewards/rejected"].item() == pytest.approx(1.0)


def test_pairwise_loss_large_table_by_hand():
    rc = torch.tensor([2.0, 2.0, 2.0])
    rr = torch.tensor([1.0, 1.0, 1.0])
    m = margin_for_ratings(["significantly better", "better", "slightly better"], "large")
    loss, _ = pairwise_loss(rc, rr, margin=m)
    # -log σ(1 - 3) = log(1 + e^2); -log σ(1 - 2) = log(1 + e); -log σ(1 - 1) = log 2
    expected = [math.log1p(math.exp(2)), math.log1p(math.e), math.log(2)]
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_pairwise_loss_no_margin_center_and_accuracy():
    rc = torch.tensor([2.0, 0.0], requires_grad=True)
    rr = torch.tensor([1.0, 1.0])
    loss, metrics = pairwise_loss(rc, rr, center_coef=0.5)
    # pair 0: log(1 + e^{-1}) + 0.5 * (2 + 1)^2 = 0.31326 + 4.5
    # pair 1: log(1 + e^{1})  + 0.5 * (0 + 1)^2 = 1.31326 + 0.5
    torch.testing.assert_close(
        loss, torch.tensor([math.log1p(math.exp(-1)) + 4.5, math.log1p(math.e) + 0.5])
    )
    assert metrics["accuracy"].item() == 0.5
    assert metrics["margin"].item() == pytest.approx(0.0)  # (1 + -1) / 2
    assert not metrics["margin"].requires_grad
    loss.sum().backward()
    assert rc.grad is not None
    # stable at extreme differences
    big, _ = pairwise_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert big.item() == pytest.approx(2000.0)


def test_ranked_loss_with_tie_by_hand():
    rewards = torch.tensor(
        [
            [1.0, 0.0, 2.0],  # scores 3, 3, 1: pair (0,1) is a tie -> dropped
            [0.0, 1.0, 5.0],  # third response missing
            [1.0, 2.0, 3.0],  # all scores equal -> no pair
        ]
    )
    scores = torch.tensor([[3.0, 3.0, 1.0], [1.0, 2.0, 0.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    loss, metrics = ranked_loss(rewards, scores, mask)
    # prompt 0: (0,2) better 0: r0 - r2 = -1 -> log(1 + e)   = 1.31326
    #           (1,2) better 1: r1 - r2 = -2 -> log(1 + e^2) = 2.12693
    #           mean = 1.72010
    # prompt 1: (0,1) better 1: r1 - r0 = 1 -> log(1 + e^{-1}) = 0.31326
    # prompt 2: no pairs -> 0
    p0 = (math.log1p(math.e) + math.log1p(math.exp(2))) / 2
    torch.testing.assert_close(loss, torch.tensor([p0, math.log1p(math.exp(-1)), 0.0]))
    assert metrics["num_pairs"].item() == 3
    assert metrics["prompts_without_pairs"].item() == 1
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)  # only prompt 1's pair is right


def test_ranked_loss_two_responses_equals_pairwise():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(4, generator=g), torch.randn(4, generator=g)
    ranked, _ = ranked_loss(
        torch.stack([rr, rc], 1), torch.tensor([[0.0, 1.0]] * 4), torch.ones(4, 2)
    )
    pair, _ = pairwise_loss(rc, rr)
    torch.testing.assert_close(ranked, pair)
