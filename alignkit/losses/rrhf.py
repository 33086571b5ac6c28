"""RRHF: rank responses by length-normalised log-probability, plus SFT on the best one.

Pure function (docs/architecture.md, "Losses"): tensors in, ``(per_example_loss, metrics)`` out.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

__all__ = ["rrhf_loss"]

Metrics = Dict[str, torch.Tensor]


def rrhf_loss(
    seq_logps: torch.Tensor,
    lengths: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 1.0,
    weight: float = 1.0,
) -> Tuple[torch.Tensor, Metrics]:
    """RRHF loss per prompt ``[B]``.

    ``seq_logps`` ``[B, K]``: summed token log-probs of each response; ``lengths`` ``[B, K]``:
    response lengths in tokens; ``rewards`` ``[B, K]``; ``mask`` ``[B, K]``: valid responses.

        p_i    = seq_logp_i / len_i^α
        L_rank = Σ_{r_i < r_j} max(0, p_i − p_j)        (sum over valid pairs)
        L_ft   = −seq_logp_{i*},  i* = argmax_i r_i       (first one on ties)
        L      = weight·L_rank + L_ft

    A prompt with no valid response has loss 0. Metrics (detached): ``loss/rank`` and
    ``loss/ft`` (means over prompts), ``rank_accuracy`` (fraction of pairs with r_i < r_j where
    p_i < p_j; 1 when there are no pairs), ``num_pairs``.
    """
    if not (seq_logps.shape == lengths.shape == rewards.shape == mask.shape) or seq_logps.dim() != 2:
        raise ValueError(
            "rrhf_loss: seq_logps, lengths, rewards and mask must all be [B, K]; got "
            f"{tuple(seq_logps.shape)}, {tuple(lengths.shape)}, {tuple(rewards.shape)}, "
            f"{tuple(mask.shape)}"
        )
    logp = seq_logps.float()
    valid = mask.bool()
    r = rewards.float()
    lens = lengths.float().clamp_min(1.0)
    p = logp / lens.pow(alpha)

    # pairs[b, i, j]: both valid and r_i < r_j  ->  penalise p_i > p_j
    pairs = valid.unsqueeze(2) & valid.unsqueeze(1) & (r.unsqueeze(2) < r.unsqueeze(1))
    p_diff = p.unsqueeze(2) - p.unsqueeze(1)  # p_i - p_j
    rank = torch.where(pairs, p_diff.clamp_min(0.0), torch.zeros_like(p_diff)).sum(dim=(1, 2))

    masked_r = torch.where(valid, r, torch.full_like(r, float("-inf")))
    best = masked_r.argmax(dim=1, keepdim=True)
    has_any = valid.any(dim=1)
    ft = torch.where(has_any, -logp.gather(1, best).squeeze(1), torch.zeros_like(rank))

    loss = weight * rank + ft

    n_pairs = pairs.sum()
    correct = ((p_diff.detach() < 0) & pairs).sum()
    metrics: Metrics = {
        "loss/rank": rank.detach().mean(),
        "loss/ft": ft.detach().mean(),
        "rank_accuracy": torch.where(
            n_pairs > 0, correct.float() / n_pairs.clamp_min(1).float(), torch.ones((), device=n_pairs.device)
        ),
        "num_pairs": n_pairs.float(),
    }
    return loss, metrics
