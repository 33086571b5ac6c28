"""alignkit.ops: hand-derived values and agreement with naive references."""

import math

import pytest
import torch

from alignkit import ops


# --------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 4096])
def test_gather_logprobs_matches_log_softmax(chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 3), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = ops.gather_logprobs(logits, labels, chunk_size=chunk_size)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_gather_logprobs_bf16_is_float32_math():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(7, 50, generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 50, (7,), generator=g)
    out = ops.gather_logprobs(logits, labels, chunk_size=3)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # gradient flows back in the input dtype
    lg = logits.clone().requires_grad_(True)
    ops.gather_logprobs(lg, labels, chunk_size=3).sum().backward()
    assert lg.grad.dtype == torch.bfloat16


def test_gather_logprobs_gradient_matches_reference():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = base.clone().requires_grad_(True)
    (ops.gather_logprobs(a, labels, chunk_size=5) * weights).sum().backward()
    b = base.clone().requires_grad_(True)
    ref = torch.log_softmax(b, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_gather_logprobs_ignore_index_and_shape_error():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.tensor([[1, -100, 2], [-100, 0, 4]])
    out = ops.gather_logprobs(logits, labels, chunk_size=2)
    assert out[0, 1] == 0 and out[1, 0] == 0
    out.sum().backward()
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[1, 0] == 0)
    assert torch.any(logits.grad[0, 0] != 0)
    with pytest.raises(ValueError):
        ops.gather_logprobs(torch.randn(2, 5), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.0), (3, 0.7), (64, 1.0)])
def test_linear_logprobs_equals_materialised_head(chunk_size, temperature):
    """Values and both gradients equal the plain head + log-softmax in float64, with ignored
    labels, a chunk that does not divide N and a temperature."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(7, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 12, -100, 5, 5, -100, 3])
    upstream = torch.randn(7, generator=g, dtype=torch.float64)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = ops.linear_logprobs(h1, w1, labels, chunk_size=chunk_size, temperature=temperature)
    (out * upstream).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = torch.log_softmax(h2 @ w2.T / temperature, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    ref = torch.where(labels >= 0, logp, torch.zeros_like(logp))
    (ref * upstream).sum().backward()
    assert out.dtype == torch.float32 and out[2] == 0 and out[5] == 0
    torch.testing.assert_close(out, ref.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-6)  # softmax maths in float32
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=1e-6)
    assert torch.all(h1.grad[2] == 0)


def test_linear_logprobs_frozen_weight_and_bf16_autocast():
    """A weight without gradient gets none; under bf16 autocast the product runs in bf16 like
    nn.Linear's, so the values match the plain head's under autocast to float32 rounding."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(9, 16, generator=g).requires_grad_(True)
    weight = torch.randn(40, 16, generator=g) / 4
    labels = torch.randint(0, 40, (9,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.linear_logprobs(hidden, weight, labels, chunk_size=4)
        ref = ops.gather_logprobs(torch.nn.functional.linear(hidden, weight), labels)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    out.sum().backward()
    assert hidden.grad.dtype == torch.float32 and torch.any(hidden.grad != 0)
    with pytest.raises(ValueError, match=r"must be \[N, H\]"):
        ops.linear_logprobs(torch.randn(2, 3, 4), weight, torch.zeros(2, 3, dtype=torch.long))


def test_entropy_from_logits():
    # uniform over V = 8 -> H = log 8 = 2.0794
    torch.testing.assert_close(
        ops.entropy_from_logits(torch.zeros(2, 8), chunk_size=1), torch.full((2,), math.log(8))
    )
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 13, generator=g).to(torch.bfloat16)
    lp = torch.log_softmax(logits.float(), -1)
    ref = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(ops.entropy_from_logits(logits, chunk_size=4), ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- masked ops


def test_masked_sum_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("inf")], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # all: 1 + 2 + 4 = 7 over 3 entries -> 7/3; the inf is masked out and must not leak
    assert ops.masked_sum(x, m).item() == 7.0
    assert ops.masked_mean(x, m).item() == pytest.approx(7 / 3)
    # rows: sums [3, 4, 0], means [1.5, 4, 0 (empty row)]
    torch.testing.assert_close(ops.masked_sum(x, m, dim=1), torch.tensor([3.0, 4.0, 0.0]))
    torch.testing.assert_close(ops.masked_mean(x, m, dim=1), torch.tensor([1.5, 4.0, 0.0]))
    assert ops.masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_masked_var_by_hand():
    x = torch.tensor([1.0, 2.0, 100.0, 4.0])
    m = torch.tensor([True, True, False, True])
    # values 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # biased 14/3 / 3 = 14/9; unbiased 14/3 / 2 = 7/3
    assert ops.masked_var(x, m, unbiased=False).item() == pytest.approx(14 / 9)
    assert ops.masked_var(x, m, unbiased=True).item() == pytest.approx(7 / 3)
    # one element: unbiased falls back to 0 instead of dividing by zero
    assert ops.masked_var(x, torch.tensor([True, False, False, False])).item() == 0.0


def test_masked_whiten():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, generator=g) * 5 + 3
    m = torch.rand(4, 6, generator=g) > 0.3
    w = ops.masked_whiten(x, m)
    vals = w[m]
    assert vals.mean().abs().item() < 1e-5
    assert vals.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(w[~m] == 0)
    # shift_mean=False: same spread, original mean kept
    w2 = ops.masked_whiten(x, m, shift_mean=False)
    assert w2[m].mean().item() == pytest.approx(x[m].mean().item(), abs=1e-4)
    assert w2[m].std().item() == pytest.approx(1.0, abs=1e-5)
    # 1-D, all counted: [1, 2, 3] -> mean 2, unbiased std 1 -> [-1, 0, 1]
    x1 = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(ops.masked_whiten(x1, torch.ones(3, dtype=torch.bool)), torch.tensor([-1.0, 0.0, 1.0]))


# --------------------------------------------------------------------------- GAE


def test_gae_three_step_by_hand():
    # rewards [0, 0, 1], values [0.5, 0.4, 0.3], gamma 1, lambda 0.95, V after the end = 0
    # δ2 = 1 + 0   - 0.3 =  0.7
    # δ1 = 0 + 0.3 - 0.4 = -0.1
    # δ0 = 0 + 0.4 - 0.5 = -0.1
    # A2 = 0.7
    # A1 = -0.1 + 0.95 * 0.7   = 0.565
    # A0 = -0.1 + 0.95 * 0.565 = 0.43675
    # returns = A + V = [0.93675, 0.965, 1.0]
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.4, 0.3]])
    adv, ret = ops.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.43675, 0.565, 0.7]]))
    torch.testing.assert_close(ret, torch.tensor([[0.93675, 0.965, 1.0]]))


def test_gae_right_padding_by_hand():
    # response of length 2, padded to 3 with junk; gamma 0.9, lambda 0.5
    # δ1 = 2 + 0.9*0   - 0.5 = 1.5           A1 = 1.5
    # δ0 = 0 + 0.9*0.5 - 1.0 = -0.55         A0 = -0.55 + 0.45*1.5 = 0.125
    # returns = [0.125 + 1, 1.5 + 0.5] = [1.125, 2.0]; padding -> 0
    r = torch.tensor([[0.0, 2.0, 9.0]])
    v = torch.tensor([[1.0, 0.5, 7.0]])
    m = torch.tensor([[1, 1, 0]])
    adv, ret = ops.gae(r, v, m, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.125, 1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.125, 2.0, 0.0]]))


def test_gae_gamma_lambda_one_is_monte_carlo():
    g = torch.Generator().manual_seed(5)
    r = torch.randn(3, 5, generator=g)
    v = torch.randn(3, 5, generator=g)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv, ret = ops.gae(r, v, m, gamma=1.0, lam=1.0)
    mc = torch.flip(torch.cumsum(torch.flip(r * m, [1]), 1), [1])  # Σ_{l >= t} r_l
    torch.testing.assert_close(adv, (mc - v) * m)
    torch.testing.assert_close(ret, mc * m)


# --------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -3.0])
    ref = torch.tensor([-2.0, -1.0, -3.0])
    # k1 = logp - ref = [1, -1, 0]
    torch.testing.assert_close(ops.kl_k1(logp, ref), torch.tensor([1.0, -1.0, 0.0]))
    # k2 = ½ (logp - ref)² = [0.5, 0.5, 0]
    torch.testing.assert_close(ops.kl_k2(logp, ref), torch.tensor([0.5, 0.5, 0.0]))
    # k3 with d = ref - logp = [-1, 1, 0]: e^d - d - 1 = [e^-1, e - 2, 0]
    torch.testing.assert_close(
        ops.kl_k3(logp, ref), torch.tensor([math.exp(-1), math.e - 2, 0.0])
    )
    assert ops.kl_estimator("k3") is ops.kl_k3
    with pytest.raises(ValueError):
        ops.kl_estimator("k4")


def test_k3_nonnegative():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert torch.all(ops.kl_k3(a, b) >= 0)
    assert torch.all(ops.kl_k2(a, b) >= 0)
