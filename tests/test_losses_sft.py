"""losses.sft: the NLL of target tokens, by hand, weighted, masked by zero weights, and the same
over micro-batches as over the whole batch."""

import math

import pytest
import torch

from alignkit.losses.sft import sft_loss
from alignkit.ops import gather_logprobs


def two_token_logps(requires_grad: bool = False) -> torch.Tensor:
    # Vocabulary of 3. Token 1: logits [0, 0, 0], target 2 -> p = 1/3, log p = -ln 3.
    # Token 2: logits [0, ln 2, 0], target 1 -> p = 2 / (1 + 2 + 1) = 1/2, log p = -ln 2.
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]], requires_grad=requires_grad)
    return gather_logprobs(logits, torch.tensor([2, 1])), logits


def test_hand_derived_nll_of_two_tokens():
    logps, _ = two_token_logps()
    loss, metrics = sft_loss(logps)
    # per token: -log p = [ln 3, ln 2]; summed: ln 3 + ln 2 = ln 6 = 1.791759...
    torch.testing.assert_close(loss, torch.tensor([math.log(3.0), math.log(2.0)]), rtol=0, atol=1e-6)
    assert metrics["nll_sum"].item() == pytest.approx(math.log(6.0), abs=1e-6)


def test_weights_scale_each_token_and_the_metric_stays_unweighted():
    logps, _ = two_token_logps()
    loss, metrics = sft_loss(logps, torch.tensor([2.0, 0.5]))
    # [2 ln 3, 0.5 ln 2] = [2.197225, 0.346574]; nll_sum is the plain NLL: ln 6
    torch.testing.assert_close(loss, torch.tensor([2 * math.log(3.0), 0.5 * math.log(2.0)]), rtol=0, atol=1e-6)
    assert metrics["nll_sum"].item() == pytest.approx(math.log(6.0), abs=1e-6)


def test_zero_weight_masks_a_token_out_of_loss_and_gradient():
    logps, logits = two_token_logps(requires_grad=True)
    loss, _ = sft_loss(logps, torch.tensor([0.0, 1.0]))
    loss.sum().backward()
    assert loss[0].item() == 0.0 and loss[1].item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert torch.all(logits.grad[0] == 0)
    # d(-log softmax(z)_1)/dz = softmax(z) - onehot(1) = [1/4, 1/2, 1/4] - [0, 1, 0]
    torch.testing.assert_close(logits.grad[1], torch.tensor([0.25, -0.5, 0.25]), rtol=0, atol=1e-6)


def test_gradient_with_respect_to_log_probs_is_minus_the_weight():
    logps = torch.tensor([-0.3, -1.2, -2.5], requires_grad=True)
    loss, _ = sft_loss(logps, torch.tensor([1.0, 0.25, 3.0]))
    loss.sum().backward()
    assert logps.grad.tolist() == [-1.0, -0.25, -3.0]


def test_certain_tokens_cost_nothing_and_low_precision_comes_back_float32():
    loss, metrics = sft_loss(torch.zeros(4))  # p = 1 -> -log p = 0
    assert loss.tolist() == [0.0] * 4 and metrics["nll_sum"].item() == 0.0
    half, _ = sft_loss(torch.tensor([-0.5, -2.0], dtype=torch.bfloat16), torch.tensor([2.0, 1.0]))
    assert half.dtype == torch.float32 and half.tolist() == [1.0, 2.0]  # -0.5 and -2 are exact in bf16


def test_micro_batches_sum_to_the_full_batch():
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(10, generator=gen) * 3
    weights = torch.rand(10, generator=gen) * 2
    full, full_metrics = sft_loss(logps, weights)
    parts = [sft_loss(logps[a:b], weights[a:b]) for a, b in ((0, 3), (3, 4), (4, 10))]
    torch.testing.assert_close(torch.cat([p for p, _ in parts]), full, rtol=0, atol=0)
    # the engine divides the summed loss by the summed units (here the total weight): same either way
    split = sum(p.sum() for p, _ in parts) / sum(weights[a:b].sum() for a, b in ((0, 3), (3, 4), (4, 10)))
    assert split.item() == pytest.approx((full.sum() / weights.sum()).item(), rel=1e-6)
    assert sum(m["nll_sum"] for _, m in parts).item() == pytest.approx(full_metrics["nll_sum"].item(), rel=1e-6)
