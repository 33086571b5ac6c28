"""Llama 2's combination of a helpfulness and a safety reward model.

Each reward model's score is read as a probability in (0, 1) (σ of its raw scalar). Per item

    R_c = R_s   if the prompt is flagged unsafe or R_s < threshold (0.15)
          R_h   otherwise

and the reward handed to PPO is WHITEN(LOGIT(R_c)) over the batch, where LOGIT undoes the
sigmoid and WHITEN subtracts the batch mean and divides by the batch's POPULATION standard
deviation (divide by n, not n-1).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from alignkit.rewards.base import RewardFn, check_batch

__all__ = ["CombinedReward", "SingleReward", "combine", "logit", "sigmoid", "whiten"]


def sigmoid(x: float) -> float:
    """σ(x), computed without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def logit(p: float, eps: float = 1e-6) -> float:
    """log(p / (1 - p)), the inverse of σ, with p clamped to [eps, 1 - eps]."""
    p = min(max(float(p), eps), 1.0 - eps)
    return math.log(p) - math.log1p(-p)


def whiten(values: Sequence[float], eps: float = 1e-8) -> list[float]:
    """(v - mean) / sqrt(var + eps) with the POPULATION variance (divide by n).

    The result has mean 0 and population std 1 (up to eps). Fewer than 2 values carry no
    spread to estimate and are returned unchanged. This is the whitening of scores; per-token
    advantages are whitened by `alignkit.ops.masked_whiten` (unbiased variance, over a mask).
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n < 2:
        return vals
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / n
    scale = math.sqrt(var + eps)
    return [(v - mean) / scale for v in vals]


def combine(
    helpful_probs: Sequence[float],
    safety_probs: Sequence[float],
    unsafe_flags: Sequence[bool],
    threshold: float = 0.15,
) -> list[float]:
    """Llama 2's R_c per item: the safety probability R_s when the prompt is flagged unsafe or
    R_s < threshold, else the helpfulness probability R_h. Inputs are probabilities."""
    n = len(helpful_probs)
    if len(safety_probs) != n or len(unsafe_flags) != n:
        raise ValueError(
            f"lengths differ: {n} helpful, {len(safety_probs)} safety, {len(unsafe_flags)} flags"
        )
    out = []
    for h, s, flag in zip(helpful_probs, safety_probs, unsafe_flags):
        for name, p in (("helpful", h), ("safety", s)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} score {p} is not a probability; pass σ(raw score)")
        out.append(float(s) if (flag or s < threshold) else float(h))
    return out


class CombinedReward:
    """A RewardFn implementing Llama 2's combined reward WHITEN(LOGIT(R_c)).

    `helpful` and `safety` are RewardFns. With `raw_scores_are_logits` (the default, for reward
    models with a scalar head) their outputs are mapped through σ; otherwise they must already be
    probabilities in [0, 1]. `is_unsafe(prompt)` flags prompts that go to the safety model.
    Whitening is over the batch passed in; a batch of one is returned unwhitened (the logit).
    After each call `last_stats` holds the share of items routed to the safety model.
    """

    def __init__(
        self,
        helpful: RewardFn,
        safety: RewardFn,
        is_unsafe: Callable[[str], bool],
        threshold: float = 0.15,
        whiten_output: bool = True,
        raw_scores_are_logits: bool = True,
    ):
        self.helpful = helpful
        self.safety = safety
        self.is_unsafe = is_unsafe
        self.threshold = threshold
        self.whiten_output = whiten_output
        self.raw_scores_are_logits = raw_scores_are_logits
        self.last_stats: dict[str, float] = {}

    def _probs(self, scores: list[float]) -> list[float]:
        return [sigmoid(x) for x in scores] if self.raw_scores_are_logits else list(scores)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        check_batch(prompts, responses)
        if not prompts:
            return []
        h = self._probs(self.helpful(prompts, responses))
        s = self._probs(self.safety(prompts, responses))
        flags = [bool(self.is_unsafe(p)) for p in prompts]
        rc = combine(h, s, flags, self.threshold)
        routed = sum(1 for f, sp in zip(flags, s) if f or sp < self.threshold)
        self.last_stats = {
            "safety_routed_frac": routed / len(prompts),
            "unsafe_prompt_frac": sum(flags) / len(prompts),
        }
        out = [logit(p) for p in rc]
        return whiten(out) if self.whiten_output else out


class SingleReward:
    """One RewardFn, optionally whitened over each batch (a batch of one is left as is)."""

    def __init__(self, rm: RewardFn, whiten_output: bool = False):
        self.rm = rm
        self.whiten_output = whiten_output

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        check_batch(prompts, responses)
        out = [float(x) for x in self.rm(prompts, responses)]
        return whiten(out) if self.whiten_output else out
