"""alignkit.losses.ppo: KL-shaped rewards, clipped losses, KL controllers, group advantages."""

import json
import math

import pytest
import torch

from alignkit.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    grpo_advantages,
    kl_loss,
    kl_penalized_rewards,
    policy_loss,
    ptx_loss,
    reinforce_advantages,
    rloo_advantages,
    value_loss,
)

# --------------------------------------------------------------------------- rewards


def test_kl_penalized_rewards_k1_by_hand():
    logp = torch.tensor([[-1.0, -1.0, -2.0], [-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([5.0, -1.0])
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, beta=0.1)
    # row 0: k1 = [1, 0, -1] -> -0.1*k1 = [-0.1, 0, 0.1]; score 5 on the last token -> 5.1
    # row 1: k1 = [0, -1] (padding ignored) -> [0, 0.1]; score -1 on token 1 -> -0.9
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 0.0, 5.1], [0.0, -0.9, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([0.0, -1.0]))


def test_kl_penalized_rewards_k3():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-2.0, -1.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([0.0]), logp, ref, torch.ones(1, 2), 1.0, "k3")
    # k3 with d = ref - logp = [-1, 1]: [e^-1, e - 2] = [0.36788, 0.71828]
    k3 = torch.tensor([math.exp(-1), math.e - 2])
    torch.testing.assert_close(rewards, -k3.unsqueeze(0))
    torch.testing.assert_close(kl, k3.sum().unsqueeze(0))
    with pytest.raises(ValueError):
        kl_penalized_rewards(torch.tensor([0.0]), logp, ref, torch.ones(1, 2), 1.0, "k9")


# --------------------------------------------------------------------------- policy loss


def test_policy_loss_clip_cases_by_hand():
    # ε = 0.2, one token per row; loss = -min(ρA, clip(ρ, 0.8, 1.2) A)
    ratio = torch.tensor([1.1, 1.5, 0.5, 1.1, 1.5, 0.5])
    adv = torch.tensor([2.0, 2.0, 2.0, -2.0, -2.0, -2.0])
    expected = torch.tensor(
        [
            -2.2,  # A>0, inside:       -min(2.2, 2.2)
            -2.4,  # A>0, ρ above 1.2:  -min(3.0, 1.2*2 = 2.4) -> clipped
            -1.0,  # A>0, ρ below 0.8:  -min(1.0, 0.8*2 = 1.6) -> unclipped
            2.2,  # A<0, inside:       -min(-2.2, -2.2)
            3.0,  # A<0, ρ above 1.2:  -min(-3.0, -2.4)      -> unclipped
            1.6,  # A<0, ρ below 0.8:  -min(-1.0, -1.6)      -> clipped
        ]
    )
    old = torch.full((6, 1), -1.0)
    logp = (old + torch.log(ratio).unsqueeze(1)).requires_grad_(True)
    loss, m = policy_loss(logp, old, adv.unsqueeze(1), torch.ones(6, 1), clip=0.2)
    torch.testing.assert_close(loss, expected)  # token reduction, 1 token each: B/N = 1
    assert m["clip_frac"].item() == pytest.approx(2 / 6)
    loss.sum().backward()
    g = logp.grad.squeeze(1)
    # clipped tokens get no gradient; others d(-ρA)/dlogp = -ρA
    torch.testing.assert_close(g, torch.tensor([-2.2, 0.0, -1.0, 2.2, 3.0, 0.0]))
    assert m["ratio_mean"].item() == pytest.approx(ratio.mean().item())
    assert m["ratio_max"].item() == pytest.approx(1.5)


def test_policy_loss_approx_kl():
    # ρ = 1.5: k3 of KL(old‖new) = ρ - 1 - log ρ = 0.5 - 0.405465 = 0.094535
    old = torch.tensor([[-1.0]])
    logp = old + math.log(1.5)
    _, m = policy_loss(logp, old, torch.ones(1, 1), torch.ones(1, 1))
    assert m["approx_kl"].item() == pytest.approx(0.5 - math.log(1.5), abs=1e-6)


def test_policy_loss_reductions():
    # ratio 1 everywhere -> per-token loss = -A
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp = torch.zeros(2, 3)
    # token: Σ = -(1+2+3+4) = -10 over 4 tokens = -2.5; per-example Σ_t · B/N = [-6*2/4, -4*2/4]
    tok, _ = policy_loss(logp, logp, adv, mask, reduction="token")
    torch.testing.assert_close(tok, torch.tensor([-3.0, -2.0]))
    assert tok.mean().item() == pytest.approx(-2.5)
    # sequence: [-(1+2+3)/3, -4/1] = [-2, -4], batch mean -3
    seq, _ = policy_loss(logp, logp, adv, mask, reduction="sequence")
    torch.testing.assert_close(seq, torch.tensor([-2.0, -4.0]))
    with pytest.raises(ValueError):
        policy_loss(logp, logp, adv, mask, reduction="batch")
    # sequence reduction: equal halves of the batch average to the full batch
    torch.testing.assert_close(
        seq.mean(),
        (policy_loss(logp[:1], logp[:1], adv[:1], mask[:1], reduction="sequence")[0].mean()
         + policy_loss(logp[1:], logp[1:], adv[1:], mask[1:], reduction="sequence")[0].mean()) / 2,
    )


def test_policy_loss_padding_is_inert():
    logp = torch.tensor([[-1.0, 50.0]], requires_grad=True)  # junk on the padded token
    old = torch.tensor([[-1.0, -50.0]])
    loss, m = policy_loss(logp, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 0]]))
    assert torch.isfinite(loss).all() and loss.item() == pytest.approx(-1.0)
    loss.sum().backward()
    assert logp.grad[0, 1].item() == 0.0 and torch.isfinite(logp.grad).all()
    assert m["ratio_max"].item() == pytest.approx(1.0)


def test_policy_loss_dual_clip_caps_negative_advantages_by_hand():
    # ε = 0.2, c = 3; one reply of 3 tokens, token reduction (B/N = 1/3).
    # PPO loss per token: max(-ρA, -clip(ρ, 0.8, 1.2)A); dual-clip, for A < 0 only: min(that, -cA).
    #   t1: ρ = 5, A = -1: max(5, 1.2) = 5 -> min(5, 3) = 3    capped: no gradient
    #   t2: ρ = 2, A = -2: max(4, 2.4) = 4 -> min(4, 6) = 4    under the cap: gradient -ρA = 4
    #   t3: ρ = 5, A = +1: max(-5, -1.2) = -1.2 (A > 0: no cap) clipped: no gradient
    # loss = (3 + 4 - 1.2) / 3 = 5.8 / 3; without the cap (5 + 4 - 1.2) / 3 = 7.8 / 3
    ratio = torch.tensor([[5.0, 2.0, 5.0]])
    adv = torch.tensor([[-1.0, -2.0, 1.0]])
    old = torch.full((1, 3), -2.0)
    mask = torch.ones(1, 3)
    logp = (old + torch.log(ratio)).requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, mask, clip=0.2, ratio_cap=3.0)
    assert loss.item() == pytest.approx(5.8 / 3)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 4.0 / 3, 0.0]]))
    assert m["ratio_max"].item() == pytest.approx(5.0)
    assert m["ratio_over_cap"].item() == pytest.approx(2 / 3)  # t1 and t3 exceed 3, whatever the sign of A
    uncapped, m = policy_loss(logp, old, adv, mask, clip=0.2)
    assert uncapped.item() == pytest.approx(7.8 / 3) and m["ratio_over_cap"].item() == 0.0
    # a padded 4th token with a huge ratio neither counts nor changes the loss (N stays 3)
    padded, m = policy_loss(torch.cat([logp, torch.tensor([[40.0]])], 1), torch.cat([old, torch.tensor([[-2.0]])], 1),
                            torch.cat([adv, torch.tensor([[-1.0]])], 1), torch.tensor([[1.0, 1.0, 1.0, 0.0]]), ratio_cap=3.0)
    assert padded.item() == pytest.approx(5.8 / 3) and m["ratio_over_cap"].item() == pytest.approx(2 / 3)
    assert m["ratio_max"].item() == pytest.approx(5.0)
    with pytest.raises(ValueError) as err:
        policy_loss(logp, old, adv, mask, ratio_cap=0.5)
    assert str(err.value) == "policy_loss: ratio_cap must be >= 1 (or None), got 0.5"


# --------------------------------------------------------------------------- value loss


def test_value_loss_clip_cases_by_hand():
    v = torch.tensor([[1.0], [1.5], [1.5]])
    old = torch.tensor([[0.9], [1.0], [1.0]])
    ret = torch.tensor([[2.0], [2.0], [1.0]])
    loss, m = value_loss(v, old, ret, torch.ones(3, 1), clip=0.2)
    # 0: |V - V_old| = 0.1 <= 0.2, clipped V = V: ½ (1 - 2)² = 0.5
    # 1: clipped V = 1.2; (1.5-2)² = 0.25 vs (1.2-2)² = 0.64 -> ½·0.64 = 0.32 (clip active)
    # 2: clipped V = 1.2; (1.5-1)² = 0.25 vs (1.2-1)² = 0.04 -> ½·0.25 = 0.125
    torch.testing.assert_close(loss, torch.tensor([0.5, 0.32, 0.125]))
    assert m["vf_clip_frac"].item() == pytest.approx(1 / 3)
    plain, _ = value_loss(v, old, ret, torch.ones(3, 1), clip=None)
    # ½ (V - R)² = [0.5, 0.125, 0.125]
    torch.testing.assert_close(plain, torch.tensor([0.5, 0.125, 0.125]))


def test_explained_variance_by_hand():
    ret = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    # residual R - V = [0, 0, 1]: mean 1/3, unbiased var ((1/9)+(1/9)+(4/9))/2 = 1/3
    # Var R over [1, 2, 3] (unbiased) = 1 -> EV = 1 - 1/3 = 2/3
    v = torch.tensor([[1.0, 2.0, 2.0, -7.0]])
    assert explained_variance(v, ret, mask).item() == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(v, torch.ones(1, 4), mask).item())


# --------------------------------------------------------------------------- ptx, kl loss


def test_ptx_loss_by_hand():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = ptx_loss(lp, mask)
    # token-mean NLL = (1 + 2 + 3) / 3 = 2
    assert loss.mean().item() == pytest.approx(2.0)
    assert m["ptx_nll"].item() == pytest.approx(2.0)
    seq, _ = ptx_loss(lp, mask, reduction="sequence")
    torch.testing.assert_close(seq, torch.tensor([1.5, 3.0]))


def test_kl_loss_k3_by_hand_and_gradient():
    logp = torch.tensor([[-1.0, -2.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = kl_loss(logp, ref, mask, reduction="sequence")
    # k3 = [e^-1, e - 2] over the two tokens -> mean (0.36788 + 0.71828) / 2 = 0.54308
    assert loss.item() == pytest.approx((math.exp(-1) + math.e - 2) / 2, abs=1e-6)
    assert m["kl"].item() == pytest.approx((math.exp(-1) + math.e - 2) / 2, abs=1e-6)
    loss.sum().backward()
    # d k3 / d logp = 1 - e^{ref - logp}: [1 - e^-1, 1 - e] / 2 tokens; padding 0
    torch.testing.assert_close(
        logp.grad, torch.tensor([[(1 - math.exp(-1)) / 2, (1 - math.e) / 2, 0.0]])
    )
    k1, _ = kl_loss(logp.detach(), ref, mask, estimator="k1", reduction="sequence")
    assert k1.item() == pytest.approx(0.0)  # (1 + -1) / 2


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    # KL 9: e = 9/6 - 1 = 0.5 -> clipped to 0.2; β = 0.1 (1 + 0.2·256/10000) = 0.100512
    assert c.update(9.0, 256) == pytest.approx(0.100512)
    # KL 6.6: e = 0.1; β = 0.100512 (1 + 0.1·256/10000) = 0.100512 · 1.00256
    assert c.update(torch.tensor(6.6), 256) == pytest.approx(0.100512 * 1.00256)
    c = AdaptiveKLController(0.1, 6.0, 10000)
    # KL 0: e = -1 -> clipped to -0.2; β = 0.1 (1 - 0.2·100/10000) = 0.0998
    assert c.update(0.0, 100) == pytest.approx(0.0998)
    # KL 5.4: e = -0.1; β = 0.0998 (1 - 0.1·100/10000) = 0.0998 · 0.999
    assert c.update(5.4, 100) == pytest.approx(0.0998 * 0.999)
    # KL on target: unchanged
    before = c.beta
    assert c.update(6.0, 1000) == pytest.approx(before)
    f = FixedKLController(0.05)
    assert f.update(100.0, 1000) == 0.05 and f.beta == 0.05


def test_kl_controller_state_round_trips_through_a_checkpoint():
    c = AdaptiveKLController(0.1, 6.0, 10000)
    c.update(9.0, 256)
    d = AdaptiveKLController(0.1, 6.0, 10000)
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))  # as the checkpoint's loop.json holds it
    assert d.beta == c.beta != 0.1 and d.update(6.6, 256) == c.update(6.6, 256)
    f = FixedKLController(0.05)
    f.load_state_dict({"beta": 0.2})
    assert f.beta == 0.2 and f.update(100.0, 1000) == 0.2


# --------------------------------------------------------------------------- group advantages


def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # group 0: mean 0.5, deviations ±0.5, unbiased var (4 · 0.25) / 3 = 1/3, std 0.57735
    #          ±0.5 / 0.57735 = ±0.866025 (eps negligible); group 1: all equal -> 0
    a = grpo_advantages(r, eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(a, torch.tensor([[s, -s, -s, s], [0.0, 0.0, 0.0, 0.0]]))
    a = grpo_advantages(r)
    assert torch.isfinite(a).all() and torch.all(a[1] == 0)
    torch.testing.assert_close(
        grpo_advantages(r, scale=False), torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4])
    )
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(3, 1))


def test_rloo_and_reinforce_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    # row 0: i=0 baseline (0+0+1)/3 = 1/3 -> 2/3; i=1 baseline 2/3 -> -2/3
    # row 1: i=0 baseline 0 -> 3; i=1 baseline 3/3 = 1 -> -1
    torch.testing.assert_close(
        rloo_advantages(r),
        torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [3.0, -1.0, -1.0, -1.0]]),
    )
    # equals k/(k-1) (r - mean): row 1 mean 0.75 -> 4/3 · (3 - 0.75) = 3
    torch.testing.assert_close(rloo_advantages(r), 4 / 3 * (r - r.mean(1, keepdim=True)))
    torch.testing.assert_close(
        reinforce_advantages(torch.tensor([1.0, 2.0]), 0.5), torch.tensor([0.5, 1.5])
    )
    torch.testing.assert_close(
        reinforce_advantages(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])),
        torch.tensor([0.0, 1.0]),
    )
