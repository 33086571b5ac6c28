"""Direct preference optimisation losses: DPO, conservative DPO (label smoothing), IPO.

Inputs are summed response log-probs ``[B]`` under the policy and the frozen reference.
Pure functions (docs/architecture.md, "Losses"): tensors in, ``(per_example_loss, metrics)`` out.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = ["dpo_loss", "ipo_loss", "preference_metrics"]

Metrics = Dict[str, torch.Tensor]


def _log_ratio_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] (float32)."""
    return (policy_chosen.float() - ref_chosen.float()) - (
        policy_rejected.float() - ref_rejected.float()
    )


def preference_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> Metrics:
    """Implicit-reward metrics r̂ = β(log π − log π_ref), averaged over the batch (detached)."""
    pc, pr = policy_chosen.detach().float(), policy_rejected.detach().float()
    chosen = beta * (pc - ref_chosen.detach().float())
    rejected = beta * (pr - ref_rejected.detach().float())
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, Metrics]:
    """DPO loss per pair ``[B]``: −log σ(βh).

    With ``label_smoothing`` ε > 0 (conservative DPO, labels flipped with probability ε):
    −(1−ε)·log σ(βh) − ε·log σ(−βh). ε must lie in [0, 0.5].
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    h = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    z = beta * h
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    metrics = preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return loss, metrics


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> Tuple[torch.Tensor, Metrics]:
    """IPO loss per pair ``[B]``: (h − 1/(2β))².

    The IPO paper (and TRL) feed length-averaged log-probs here; pass those if you want that
    scale — the function uses whatever log-probs it is given. Metrics as for :func:`dpo_loss`.
    """
    if beta <= 0:
        raise ValueError(f"ipo_loss: beta must be > 0, got {beta}")
    h = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = (h - 1.0 / (2.0 * beta)) ** 2
    metrics = preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return loss, metrics
