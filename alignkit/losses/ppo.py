"""PPO (RLHF) and critic-free policy-gradient pieces: KL-shaped rewards, clipped policy and
value losses, PTX loss, KL controllers, and GRPO / RLOO / REINFORCE advantages.

Pure functions (docs/architecture.md), besides the KL controllers that hold β. Per-token
inputs are ``[B, T]`` right-padded responses with a 0/1 ``mask`` over response tokens.

Reduction of per-token losses (argument ``reduction``), chosen so that in both cases
``per_example_loss.mean()`` is the batch loss:

* ``"token"`` (default): token-mean over the whole batch, Σ_{b,t} l_bt / N_tokens. Every token
  weighs the same, so long responses are not down-weighted. The per-example value returned is
  Σ_t l_bt · B / N_tokens.
* ``"sequence"``: mean over each sequence's tokens, then mean over sequences (the GRPO paper's
  form). The per-example value is Σ_t l_bt / n_b.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from alignkit.ops import kl_estimator, kl_k3, masked_mean, masked_sum, masked_var

__all__ = [
    "kl_penalized_rewards",
    "policy_loss",
    "value_loss",
    "explained_variance",
    "ptx_loss",
    "kl_loss",
    "AdaptiveKLController",
    "FixedKLController",
    "grpo_advantages",
    "rloo_advantages",
    "reinforce_advantages",
]

Metrics = Dict[str, torch.Tensor]
REDUCTIONS = ("token", "sequence")


def _check_shapes(name: str, *tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in tensors):
        raise ValueError(
            f"{name}: per-token inputs must all be [B, T]; got "
            + ", ".join(str(tuple(t.shape)) for t in tensors)
        )


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-example losses ``[B]`` whose mean is the batch loss under ``reduction``."""
    if reduction == "sequence":
        return masked_mean(per_token, mask, dim=1)
    if reduction == "token":
        sums = masked_sum(per_token, mask, dim=1)
        n = mask.float().sum()
        scale = torch.where(n > 0, per_token.shape[0] / n.clamp_min(1.0), torch.zeros_like(n))
        return sums * scale
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")


# ---------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------


def kl_penalized_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: r_t = −β·KL_t on every response token, plus the sequence score
    (``scores`` ``[B]``, e.g. the whitened RM output) at the last response token.

    ``logp`` is the behaviour (old) policy's token log-probs, ``ref_logp`` the reference's.
    Returns ``(rewards [B, T], kl [B])`` where ``kl`` is the per-sequence KL (sum over tokens
    of the chosen estimator). Both are float32, detached, and zero outside the mask.
    """
    _check_shapes("kl_penalized_rewards", logp, ref_logp, mask)
    est = kl_estimator(estimator)
    with torch.no_grad():
        m = mask.float()
        valid = m != 0
        lp = torch.where(valid, logp.float(), torch.zeros_like(m))
        rp = torch.where(valid, ref_logp.float(), torch.zeros_like(m))
        kl_tok = est(lp, rp) * m
        rewards = -beta * kl_tok
        positions = torch.arange(m.shape[1], device=m.device, dtype=m.dtype)
        last = (positions * m + (m - 1.0)).argmax(dim=1, keepdim=True)  # index of last 1
        has_any = valid.any(dim=1, keepdim=True)
        add = torch.where(has_any, scores.float().reshape(-1, 1), torch.zeros_like(m[:, :1]))
        rewards = rewards.scatter_add(1, last, add)
        kl_seq = kl_tok.sum(dim=1)
    return rewards, kl_seq


# ---------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    reduction: str = "token",
    ratio_cap: Optional[float] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate, per token: −min(ρA, clip(ρ, 1−ε, 1+ε)A), ρ = exp(logp − old_logp).

    ``ratio_cap`` c (> 1, e.g. 3; None = off) adds dual-clip PPO's bound (Ye et al. 2020). For
    A < 0 the clipped loss above is −A·max(ρ, 1−ε), which grows without bound with ρ; dual-clip
    maximises max(min(ρA, clip(ρ)A), c·A) there, i.e. the loss becomes min(−min(ρA, clip(ρ)A), −c·A):
    at most −c·A = c·|A|, with zero gradient once ρ > c. Tokens with A >= 0 are unchanged.

    Returns ``(per_example [B], metrics)`` (see the module docstring for ``reduction``).
    Metrics over masked tokens: ``clip_frac`` (share of tokens where the clipped term is the
    one used, i.e. it has zero gradient), ``approx_kl`` (mean k3 estimate of KL(π_old‖π_θ) =
    ρ − 1 − log ρ), ``ratio_mean``, ``ratio_max``, ``ratio_over_cap`` (share of tokens with
    ρ > c, whatever the sign of A; 0 when ``ratio_cap`` is None).
    """
    _check_shapes("policy_loss", logp, old_logp, advantages, mask)
    if ratio_cap is not None and ratio_cap < 1:
        raise ValueError(f"policy_loss: ratio_cap must be >= 1 (or None), got {ratio_cap}")
    valid = mask.bool()
    log_ratio = torch.where(valid, logp.float() - old_logp.float(), torch.zeros_like(logp.float()))
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    if ratio_cap is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -ratio_cap * adv), per_token)
    loss = _reduce(per_token, mask, reduction)
    with torch.no_grad():
        r = ratio.detach()
        metrics: Metrics = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(kl_k3(old_logp.float().detach(), logp.float().detach()), mask),
            "ratio_mean": masked_mean(r, mask),
            "ratio_max": torch.where(valid, r, torch.zeros_like(r)).max()
            if r.numel()
            else torch.zeros(()),
            "ratio_over_cap": masked_mean((r > ratio_cap).float(), mask)
            if ratio_cap is not None
            else torch.zeros((), device=r.device),
        }
    return loss, metrics


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the masked tokens (detached scalar).

    1 is a perfect critic, 0 predicts no better than a constant, negative is worse. NaN when
    the returns have zero variance (undefined).
    """
    with torch.no_grad():
        v, r = values.float(), returns.float()
        var_r = masked_var(r, mask)
        var_res = masked_var(r - v, mask)
        return torch.where(
            var_r > 0, 1.0 - var_res / torch.where(var_r > 0, var_r, torch.ones_like(var_r)),
            torch.full_like(var_r, float("nan")),
        )


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: Optional[float] = 0.2,
    reduction: str = "token",
) -> Tuple[torch.Tensor, Metrics]:
    """Clipped value loss per token: ½·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²).

    ``clip=None`` gives the plain ½(V − R)². Metrics: ``vf_clip_frac`` (share of tokens where
    the clipped term is larger), ``explained_variance``, ``value_mean``.
    """
    _check_shapes("value_loss", values, old_values, returns, mask)
    v = values.float()
    ret = returns.float()
    unclipped = (v - ret) ** 2
    if clip is None:
        per_token = 0.5 * unclipped
        clip_frac = torch.zeros((), device=v.device)
    else:
        old = old_values.float()
        v_clipped = old + torch.clamp(v - old, -clip, clip)
        clipped = (v_clipped - ret) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).float().detach(), mask)
    loss = _reduce(per_token, mask, reduction)
    metrics: Metrics = {
        "vf_clip_frac": clip_frac,
        "explained_variance": explained_variance(v, ret, mask),
        "value_mean": masked_mean(v.detach(), mask),
    }
    return loss, metrics


def ptx_loss(
    token_logps: torch.Tensor, mask: torch.Tensor, reduction: str = "token"
) -> Tuple[torch.Tensor, Metrics]:
    """Pretraining (PPO-ptx) loss: mean negative log-likelihood of the masked tokens.

    Metrics: ``ptx_nll`` (token-mean NLL, detached).
    """
    _check_shapes("ptx_loss", token_logps, mask)
    nll = -token_logps.float()
    loss = _reduce(nll, mask, reduction)
    return loss, {"ptx_nll": masked_mean(nll.detach(), mask)}


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    reduction: str = "token",
) -> Tuple[torch.Tensor, Metrics]:
    """KL(π_θ‖π_ref) penalty as a loss (GRPO), per token with the chosen estimator.

    Multiply by the KL coefficient yourself. Metrics: ``kl`` (token-mean, detached).
    """
    _check_shapes("kl_loss", logp, ref_logp, mask)
    valid = mask.bool()
    lp = logp.float()
    rp = torch.where(valid, ref_logp.float(), lp.detach())  # masked tokens: log ratio 0
    per_token = kl_estimator(estimator)(lp, rp)
    loss = _reduce(per_token, mask, reduction)
    return loss, {"kl": masked_mean(per_token.detach(), mask)}


# ---------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient β. A controller owns β: a training loop reads `beta` and keeps
    `state_dict()` in its checkpoints."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, current_kl: Union[float, torch.Tensor], n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> Dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """Adaptive β (Ziegler et al. 2019): e = clip(KL/target − 1, −0.2, 0.2);
    β ← β·(1 + e·n_steps/horizon)."""

    def __init__(self, init_beta: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController: target and horizon must be > 0")
        super().__init__(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: Union[float, torch.Tensor], n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


# ---------------------------------------------------------------------------
# critic-free advantages (one scalar per response)
# ---------------------------------------------------------------------------


def _check_groups(name: str, rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"{name}: rewards must be [B, k] with k >= 2, got {tuple(rewards.shape)}")


def grpo_advantages(
    rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages ``[B, k]``: (r − mean_group) / (std_group + eps).

    The std is the unbiased sample std of each group of k; ``scale=False`` only subtracts the
    group mean (Dr. GRPO). Groups with equal rewards get 0.
    """
    _check_groups("grpo_advantages", rewards)
    r = rewards.float()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        denom = r.std(dim=1, keepdim=True) + eps
        adv = adv / torch.where(denom > 0, denom, torch.ones_like(denom))
    return adv


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO advantages ``[B, k]``: r_i − mean_{j≠i} r_j = (k/(k−1))·(r_i − mean r)."""
    _check_groups("rloo_advantages", rewards)
    r = rewards.float()
    k = r.shape[1]
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return r - baseline


def reinforce_advantages(
    rewards: torch.Tensor, baseline: Union[float, torch.Tensor] = 0.0
) -> torch.Tensor:
    """REINFORCE advantages: r − b (``baseline`` a float or a broadcastable tensor)."""
    return rewards.float() - baseline
