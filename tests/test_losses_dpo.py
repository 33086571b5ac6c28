"""alignkit.losses.dpo: DPO, conservative DPO and IPO on hand numbers and limits."""

import math

import pytest
import torch

from alignkit.losses.dpo import dpo_loss, ipo_loss

# policy chosen/rejected, reference chosen/rejected
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.0
# h = (PC - RC) - (PR - RR) = 1 - (-1) = 2


def t(x):
    return torch.tensor([x], dtype=torch.float32)


def test_dpo_hand_value_and_metrics():
    loss, m = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1)
    # βh = 0.2 -> -log σ(0.2) = log(1 + e^{-0.2}) = 0.598139
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1)  # 0.1 * (-10 + 11)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)  # 0.1 * (-12 + 11)
    assert m["rewards/margin"].item() == pytest.approx(0.2)
    assert m["rewards/accuracy"].item() == 1.0
    assert m["logps/chosen"].item() == -10.0
    assert m["logps/rejected"].item() == -12.0


def test_dpo_swap_gives_minus_log_sigmoid_minus_beta_h():
    loss, m = dpo_loss(t(PR), t(PC), t(RR), t(RC), beta=0.1)
    # -log σ(-0.2) = log(1 + e^{0.2}) = 0.798139
    assert loss.item() == pytest.approx(math.log1p(math.exp(0.2)), abs=1e-6)
    assert m["rewards/accuracy"].item() == 0.0


def test_dpo_small_beta_limit():
    beta = 1e-4
    pc = t(PC).requires_grad_(True)
    loss, _ = dpo_loss(pc, t(PR), t(RC), t(RR), beta=beta)
    # β -> 0: loss -> log 2; dL/dh = -β σ(-βh) -> -β/2 (dL/dh = dL/d policy_chosen)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-3)
    loss.sum().backward()
    assert pc.grad.item() / beta == pytest.approx(-0.5, abs=1e-3)


def test_cdpo():
    a, _ = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=0.0)
    b, _ = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1)
    torch.testing.assert_close(a, b)
    c, _ = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=0.1)
    # 0.9 * log(1 + e^{-0.2}) + 0.1 * log(1 + e^{0.2}) = 0.9*0.598139 + 0.1*0.798139 = 0.618139
    assert c.item() == pytest.approx(0.618139, abs=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), label_smoothing=0.7)
    with pytest.raises(ValueError):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.0)


def test_ipo_hand_value_and_minimum():
    loss, _ = ipo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1)
    # 1/(2β) = 5; (h - 5)² = (2 - 5)² = 9
    assert loss.item() == pytest.approx(9.0)
    # h = 5 exactly: chosen log ratio 5, rejected 0 -> loss 0 and zero gradient
    pc = t(-6.0).requires_grad_(True)
    loss, _ = ipo_loss(pc, t(-12.0), t(-11.0), t(-12.0), beta=0.1)
    assert loss.item() == pytest.approx(0.0)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(0.0)
    # either side of the minimum the loss is larger
    for h_off in (-0.5, 0.5):
        l2, _ = ipo_loss(t(-6.0 + h_off), t(-12.0), t(-11.0), t(-12.0), beta=0.1)
        assert l2.item() == pytest.approx(0.25)


def test_dpo_is_per_example_so_batches_split():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(6, generator=g) for _ in range(4)]
    full, _ = dpo_loss(*x, beta=0.3)
    halves = torch.cat([dpo_loss(*[a[:3] for a in x], beta=0.3)[0], dpo_loss(*[a[3:] for a in x], beta=0.3)[0]])
    torch.testing.assert_close(full, halves)
