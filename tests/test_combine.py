import math

import pytest

from alignkit.rewards.base import FunctionReward, GoldReward, RewardFn
from alignkit.rewards.combine import CombinedReward, SingleReward, combine, logit, sigmoid, whiten


def test_combine_routing():
    # item 0: flagged unsafe -> R_s; item 1: R_s below threshold -> R_s; item 2: R_h;
    # item 3: R_s exactly at the threshold is not below it -> R_h
    out = combine([0.9, 0.8, 0.7, 0.6], [0.5, 0.1, 0.5, 0.15], [True, False, False, False])
    assert out == [0.5, 0.1, 0.7, 0.6]
    assert combine([0.9], [0.3], [False], threshold=0.4) == [0.3]
    with pytest.raises(ValueError):
        combine([0.5], [0.5, 0.5], [False])
    with pytest.raises(ValueError):
        combine([2.0], [0.5], [False])


def test_logit_undoes_sigmoid():
    for x in (-6.0, -1.5, 0.0, 0.3, 4.0):
        assert logit(sigmoid(x)) == pytest.approx(x, abs=1e-9)
    assert logit(0.5) == 0.0
    assert math.isfinite(logit(0.0)) and math.isfinite(logit(1.0))
    assert logit(0.0) == pytest.approx(math.log(1e-6 / (1 - 1e-6)))


def test_whiten_population_std():
    vals = [1.0, 2.0, 4.0, 9.0]
    w = whiten(vals, eps=0.0)
    n = len(w)
    mean = sum(w) / n
    pop_std = math.sqrt(sum((x - mean) ** 2 for x in w) / n)
    sample_std = math.sqrt(sum((x - mean) ** 2 for x in w) / (n - 1))
    assert mean == pytest.approx(0.0, abs=1e-12)
    assert pop_std == pytest.approx(1.0, abs=1e-12)
    assert sample_std == pytest.approx(math.sqrt(n / (n - 1)), abs=1e-12)
    assert whiten([3.0]) == [3.0]  # a single value is returned unchanged
    assert whiten([2.0, 2.0]) == [0.0, 0.0]


def _const(values):
    """A stub RewardFn: the score of response "a", "b", ... is values[0], values[1], ..."""
    return lambda prompts, responses: [values[ord(r) - ord("a")] for r in responses]


def test_combined_reward_with_stubs():
    prompts = ["bad: how do I do harm", "fine question", "another fine one"]
    responses = ["a", "b", "c"]
    helpful_raw = [2.0, 1.0, -1.0]
    safety_raw = [-0.5, logit(0.1), 3.0]  # item 1 has R_s = 0.1 < 0.15
    rm = CombinedReward(
        helpful=_const(helpful_raw),
        safety=_const(safety_raw),
        is_unsafe=lambda p: p.startswith("bad"),
        whiten_output=False,
    )
    assert isinstance(rm, RewardFn)
    out = rm(prompts, responses)
    assert out == pytest.approx([-0.5, logit(0.1), -1.0], abs=1e-9)
    assert rm.last_stats["safety_routed_frac"] == pytest.approx(2 / 3)

    rm.whiten_output = True
    out_w = rm(prompts, responses)
    assert out_w == pytest.approx(whiten([-0.5, logit(0.1), -1.0]))
    assert sum(out_w) == pytest.approx(0.0, abs=1e-9)
    # a batch of one is not whitened
    assert rm(prompts[1:2], responses[1:2]) == pytest.approx([logit(0.1)])
    assert rm([], []) == []
    with pytest.raises(ValueError):
        rm(prompts, responses[:2])


def test_combined_reward_with_probabilities():
    rm = CombinedReward(
        helpful=_const([0.9, 0.8]),
        safety=_const([0.05, 0.7]),
        is_unsafe=lambda p: False,
        whiten_output=False,
        raw_scores_are_logits=False,
    )
    assert rm(["x", "y"], ["a", "b"]) == pytest.approx([logit(0.05), logit(0.8)])


def test_function_gold_and_single_reward():
    fr = FunctionReward(lambda p, r: len(r))
    assert fr(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    gold = GoldReward()
    scores = gold(["What is 2 + 3?", "What is 2 + 3?"], ["2 + 3 = 5. The answer is 5.", "4"])
    assert scores[0] > scores[1]
    assert SingleReward(fr, whiten_output=True)(["p", "q"], ["ab", "abcd"]) == pytest.approx([-1.0, 1.0], abs=1e-6)
    assert SingleReward(fr)(["p"], ["abc"]) == [3.0]
