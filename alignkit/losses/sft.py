"""Supervised fine-tuning loss: negative log-likelihood of the target (assistant) tokens."""

from __future__ import annotations

import torch


def sft_loss(token_logps: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-token NLL, optionally weighted (ReST-EM's reward-weighted likelihood uses weights = r).

    token_logps: [N] log-probs of the target tokens. weights: [N] or None (all ones).
    Returns (per-token loss [N], metrics). The caller sums or averages over its units.
    """
    nll = -token_logps.float()
    if weights is not None:
        nll = nll * weights.to(nll.dtype)
    return nll, {"nll_sum": (-token_logps.detach().float()).sum()}
