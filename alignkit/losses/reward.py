"""Reward-model losses: pairwise ranking with optional Llama 2 margin, and K-way rankings.

Pure functions (docs/architecture.md, "Losses"): tensors in, ``(per_example_loss, metrics)`` out.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["RATINGS", "MARGIN_TABLES", "margin_for_ratings", "pairwise_loss", "ranked_loss"]

RATINGS = ("significantly better", "better", "slightly better", "negligibly better")

MARGIN_TABLES: Dict[str, Dict[str, float]] = {
    # Llama 2, Table 28: margin m(rating) in L = -log σ(r_c - r_r - m)
    "small": {
        "significantly better": 1.0,
        "better": 2.0 / 3.0,
        "slightly better": 1.0 / 3.0,
        "negligibly better": 0.0,
    },
    "large": {
        "significantly better": 3.0,
        "better": 2.0,
        "slightly better": 1.0,
        "negligibly better": 0.0,
    },
    "none": {r: 0.0 for r in RATINGS},
}

Metrics = Dict[str, torch.Tensor]


def margin_for_ratings(
    ratings: Sequence[Optional[str]], table: str = "small"
) -> torch.Tensor:
    """Margins ``[len(ratings)]`` (float32) for annotator ratings under a Llama 2 table.

    ``table`` is "small", "large" or "none" (all zeros). A ``None`` rating gives margin 0.
    Ratings must be exactly one of :data:`RATINGS`; anything else raises ``ValueError``.
    """
    if table not in MARGIN_TABLES:
        raise ValueError(f"unknown margin table {table!r}; choose one of {sorted(MARGIN_TABLES)}")
    values = MARGIN_TABLES[table]
    out = []
    for i, rating in enumerate(ratings):
        if rating is None:
            out.append(0.0)
        elif rating in values:
            out.append(values[rating])
        else:
            raise ValueError(
                f"rating #{i} is {rating!r}; expected None or one of {list(RATINGS)}"
            )
    return torch.tensor(out, dtype=torch.float32)


def pairwise_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    center_coef: float = 0.0,
) -> Tuple[torch.Tensor, Metrics]:
    """Pairwise ranking loss per pair ``[B]``:

        L = −log σ(r_c − r_r − m) + c·(r_c + r_r)²

    ``margin`` (``[B]`` or scalar, default 0) is the Llama 2 rating margin; ``center_coef`` c
    keeps rewards centred on zero. Metrics: ``accuracy`` (r_c > r_r), ``margin`` (mean
    r_c − r_r), ``rewards/chosen``, ``rewards/rejected`` (means).
    """
    rc = r_chosen.float()
    rr = r_rejected.float()
    if rc.shape != rr.shape:
        raise ValueError(f"r_chosen {tuple(rc.shape)} and r_rejected {tuple(rr.shape)} differ")
    diff = rc - rr
    m = torch.zeros_like(diff) if margin is None else margin.to(diff.device, torch.float32)
    loss = -F.logsigmoid(diff - m)
    if center_coef:
        loss = loss + center_coef * (rc + rr) ** 2
    d = diff.detach()
    metrics: Metrics = {
        "accuracy": (d > 0).float().mean(),
        "margin": d.mean(),
        "rewards/chosen": rc.detach().mean(),
        "rewards/rejected": rr.detach().mean(),
    }
    return loss, metrics


def ranked_loss(
    rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
) -> Tuple[torch.Tensor, Metrics]:
    """InstructGPT loss for K ranked responses per prompt.

    ``rewards`` ``[B, K]``: predicted rewards; ``scores`` ``[B, K]``: given scores (higher is
    better; ranks or Elo work); ``mask`` ``[B, K]``: which responses exist. Every pair i < j of
    valid responses with different scores contributes −log σ(r_better − r_worse); ties are
    dropped. The loss of a prompt is the mean over its pairs, 0 when it has none.

    Metrics: ``accuracy`` over all valid pairs, ``num_pairs``, ``prompts_without_pairs``.
    """
    if rewards.shape != scores.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            "ranked_loss: rewards, scores and mask must all be [B, K]; got "
            f"{tuple(rewards.shape)}, {tuple(scores.shape)}, {tuple(mask.shape)}"
        )
    r = rewards.float()
    s = scores.float()
    valid = mask.bool()
    K = r.shape[1]
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=r.device), diagonal=1)
    s_diff = s.unsqueeze(2) - s.unsqueeze(1)  # [B, K, K]: s_i - s_j
    pairs = upper & valid.unsqueeze(2) & valid.unsqueeze(1) & (s_diff != 0)
    sign = torch.sign(s_diff)
    r_diff = (r.unsqueeze(2) - r.unsqueeze(1)) * sign  # r_better - r_worse
    pair_loss = torch.where(pairs, -F.logsigmoid(r_diff), torch.zeros_like(r_diff))
    n_pairs = pairs.sum(dim=(1, 2))
    loss = pair_loss.sum(dim=(1, 2)) / n_pairs.clamp_min(1).float()
    total = n_pairs.sum()
    correct = ((r_diff.detach() > 0) & pairs).sum()
    metrics: Metrics = {
        "accuracy": correct.float() / total.clamp_min(1).float(),
        "num_pairs": total.float(),
        "prompts_without_pairs": (n_pairs == 0).sum().float(),
    }
    return loss, metrics
