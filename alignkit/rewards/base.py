"""The reward-function protocol that online stages (PPO, best-of-N, rejection sampling) call.

A reward function scores a batch of (prompt, response) pairs without gradient. `prompts` are
the user's prompt TEXT (the last user message, no chat template applied) and `responses` the
generated reply texts, aligned one to one. Implementations that need a chat template (a reward
model) apply it themselves.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from alignkit.rewards.gold import gold_reward

__all__ = ["FunctionReward", "GoldReward", "RewardFn", "check_batch"]


@runtime_checkable
class RewardFn(Protocol):
    """Scores a batch: `fn(prompts, responses) -> list[float]`, one float per pair, no gradient.

    `prompts[i]` is the user's prompt text for `responses[i]`; higher scores are better.
    """

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]: ...


def check_batch(prompts: list[str], responses: list[str]) -> None:
    """Raise ValueError unless prompts and responses are aligned lists of the same length."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")


class FunctionReward:
    """Adapts a per-item function `fn(prompt, response) -> float` to a RewardFn."""

    def __init__(self, fn: Callable[[str, str], float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function_reward")

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        check_batch(prompts, responses)
        return [float(self.fn(p, r)) for p, r in zip(prompts, responses)]

    def __repr__(self) -> str:
        return f"FunctionReward({self.name})"


class GoldReward(FunctionReward):
    """The rule-based gold reward of the built-in preference task (`alignkit.rewards.gold`)."""

    def __init__(self) -> None:
        super().__init__(gold_reward, name="gold_reward")
