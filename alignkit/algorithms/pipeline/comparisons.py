"""Iterative reward modelling (Llama 2 §3.2.1): fresh comparisons of the newest model's samples.

Each RLHF iteration asks annotators to compare two replies of the newest model to the same
prompt, with a rating of how much better the chosen one is; the new comparisons join all earlier
data and the reward models are trained again, so they stay on the policy's distribution. Here
the gold reward of the built-in preferences stands in for the annotators (`rewards.gold.gold_pair`:
chosen = the higher gold score, its four rating levels from the score gap, the safety label and
the prompt's unsafe flag). Of a prompt's n replies, one pair the gold rules do not score equal
is labelled (drawn at random among such pairs); a prompt whose replies all tie gives no pair, as
annotators' ties are dropped. With n = 2 that is the pair itself; a larger n wastes fewer prompts
on ties (about half of a 135M model's pairs tie) at the cost of sampling more replies.

Safety comparisons are also collected apart, as in Llama 2 (§4.2): `unsafe_prompts` more prompts
a version, harmful requests only, so that the safety reward model sees how the newest model
answers them (a mixed draw holds only a fifth of them).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from alignkit.algorithms.sampling.problems import generator_for
from alignkit.algorithms.sampling.stages import by_prompt, collect
from alignkit.config import at_least, in_range, opt
from alignkit.data.records import PreferencePair
from alignkit.rewards.gold import gold_pair
from alignkit.rollout.base import SamplingConfig


@dataclass
class ComparisonsConfig:
    prompts: int = opt(64, "built-in training prompts per iteration (new ones each iteration), one pair each at most")
    unsafe_prompts: int = opt(0, "more built-in training prompts per iteration, harmful requests only: Llama 2 collects "
                                 "safety comparisons apart, on adversarial prompts, for its safety reward model")
    sampling: SamplingConfig = opt(factory=lambda: SamplingConfig(n=2, temperature=1.0, top_k=40, max_new_tokens=48, batch_size=32),
                                   help="how the replies are sampled (n: replies per prompt; the pair is drawn among those "
                                        "the gold rules do not tie)")
    newest_eval_fraction: float = opt(0.25, "share of each iteration's new pairs held out to measure the reward models "
                                            "on the newest samples")

    def __post_init__(self):
        at_least(self, 1, "prompts")
        at_least(self, 0, "unsafe_prompts")
        at_least(self, 2, "sampling.n")
        in_range(self, "newest_eval_fraction", 0.0, 1.0, high_open=True)


def label_pair(prompt: str, replies: list[str], rng: random.Random) -> PreferencePair | None:
    """One gold-labelled pair of `replies`, drawn at random among the pairs the gold rules do
    not tie; None when every pair ties."""
    pairs = list(itertools.combinations(replies, 2))
    rng.shuffle(pairs)
    return next((p for a, b in pairs if (p := gold_pair(prompt, a, b)) is not None), None)


def compare_samples(model, tokenizer, prompts: list[str], sampling: SamplingConfig, precision: str,
                    seed: int) -> tuple[list[PreferencePair], dict]:
    """`sampling.n` replies per prompt from `model` and one gold-labelled pair of them
    (`label_pair`); returns (pairs, statistics: prompts, pairs, ties, share of safety pairs)."""
    samples = collect(generator_for(model, tokenizer, sampling, precision), tokenizer, prompts, sampling.params(seed))
    rng = random.Random(seed)
    pairs, ties = [], 0
    for prompt, group in by_prompt(samples).items():
        pair = label_pair(prompt, [x.response for x in group], rng)
        if pair is None:
            ties += 1
        else:
            pairs.append(pair)
    safety = sum(1 for p in pairs if p.prompt_unsafe)
    return pairs, {"prompts": len(prompts), "pairs": len(pairs), "ties": ties, "safety_pairs": safety}
