"""The task registry: splits, prompts and rewards of every source and reward kind."""

import json
import sys
import types

import pytest

from alignkit.algorithms.ppo.common import PromptsConfig
from alignkit.algorithms.ppo.common import RewardConfig as PPORewardConfig
from alignkit.data.tasks.arithmetic import ArithmeticConfig, generate_problems, prompt_text
from alignkit.data.tasks.preferences import build_prompts
from alignkit.rewards.base import GoldReward
from alignkit.tasks import RewardConfig, TaskConfig, build_task


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_built_in_arithmetic_splits_prompts_and_verifier():
    task = build_task(TaskConfig(train=6, val=2, heldout=3, seed=5, heldout_seed=7), RewardConfig(kind="graded"))
    pool = generate_problems(8, seed=5, split="train", config=ArithmeticConfig(word_problems=False))
    assert task.train == [prompt_text(p) for p in pool[:6]] and task.val == [prompt_text(p) for p in pool[6:]]
    held = generate_problems(3, seed=7, split="heldout", config=ArithmeticConfig(word_problems=False))
    assert task.heldout == [prompt_text(p) for p in held]
    first = pool[0]
    assert task.answer_for(task.train[0]) == first.answer and task.reference(task.train[0]).endswith(first.answer)
    right, near = first.answer, str(int(first.answer) + 1)
    graded = task.reward([task.train[0]] * 2, [right, near])  # reward.kind=graded: partial credit for a near miss
    assert graded[0] == 1.0 and 0.0 < graded[1] <= 0.5
    assert task.verifier("binary")([task.train[0]] * 2, [right, near]) == [1.0, 0.0]


def test_ppo_defaults_draw_both_splits_with_one_seed():
    """PPO's task section: preference prompts by default, held-out drawn with `seed` (no validation)."""
    task = build_task(PromptsConfig(train=5, heldout=3, seed=2), PPORewardConfig())
    assert task.train == build_prompts(5, 2, "train") and task.heldout == build_prompts(3, 2, "heldout") and not task.val
    assert isinstance(task.reward, GoldReward) and not task.has_answers
    arith = build_task(PromptsConfig(source="arithmetic", train=4, heldout=2, seed=1), PPORewardConfig(kind="verifier"))
    assert arith.train == [prompt_text(p) for p in generate_problems(4, seed=1, split="train")]  # word problems
    assert arith.heldout == [prompt_text(p) for p in generate_problems(2, seed=1, split="heldout")]


def test_problems_file_keeps_its_tail_apart(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(10)]
    task = build_task(TaskConfig(source="problems", path=_jsonl(tmp_path / "p.jsonl", rows), train=100, val=2, heldout=3),
                      RewardConfig())
    asked = lambda ts: [int(t.split()[2]) for t in ts]
    assert asked(task.train) == [0, 1, 2, 3, 4] and asked(task.val) == [5, 6] and asked(task.heldout) == [7, 8, 9]
    assert task.reward(task.heldout, ["8", "10", "0"]) == [1.0, 0.0, 0.0]


def test_prompts_file_with_a_function_reward_and_no_answers(tmp_path, monkeypatch):
    module = types.ModuleType("h2_reward_module")
    module.length = lambda prompts, responses: [float(len(r)) for r in responses]
    monkeypatch.setitem(sys.modules, "h2_reward_module", module)
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": "Say hi."}, {"prompt": "Name a colour."}])
    held = _jsonl(tmp_path / "held.jsonl", [{"prompt": "Count to 3."}])
    task = build_task(TaskConfig(source="prompts", path=train, heldout_path=held),
                      RewardConfig(kind="function", function="h2_reward_module:length"))
    assert task.train == ["Say hi.", "Name a colour."] and task.heldout == ["Count to 3."] and not task.has_answers
    assert task.reward(task.train, ["hi", "red!"]) == [2.0, 4.0]
    assert task.shot_turns([["Q?", "A."]])[0].content == "Q?"  # no problem wording to put the question in
    with pytest.raises(ValueError, match="a prompts file has no answers"):
        build_task(TaskConfig(source="prompts", path=train), RewardConfig())
    with pytest.raises(ValueError, match="needs problems with answers"):
        build_task(TaskConfig(source="prompts", path=train), RewardConfig(kind="verifier"))
    with pytest.raises(ValueError, match="needs task.path"):
        TaskConfig(source="prompts")


def test_prompts_file_unsafe_flag_routes_the_combined_reward(tmp_path):
    """Safety as data: a prompts file's `unsafe: true` sends the prompt to the safety reward model,
    whatever its wording (no keyword match); unflagged prompts get the helpfulness model's score."""
    from alignkit.models.tiny import save_tiny
    from alignkit.rewards.model import RewardModel

    helpful, safety = save_tiny(str(tmp_path / "helpful"), seed=0), save_tiny(str(tmp_path / "safety"), seed=1)
    rows = [{"prompt": "Tell me about tea."}, {"prompt": "Tell me about knots.", "unsafe": True},
            {"prompt": "Tell me about rope.", "unsafe": False}, {"prompt": "Tell me about locks.", "prompt_unsafe": True}]
    task = build_task(TaskConfig(source="prompts", path=_jsonl(tmp_path / "p.jsonl", rows)),
                      RewardConfig(kind="combined", helpful_path=helpful, safety_path=safety))
    assert task.unsafe == {"Tell me about knots.", "Tell me about locks."}
    replies = ["Green tea is nice."] * 4
    want_h, want_s = RewardModel.from_pretrained(helpful)(task.train, replies), RewardModel.from_pretrained(safety)(task.train, replies)
    assert all(abs(w) < 3 for w in want_s)  # σ(score) stays above the 0.15 threshold: only the flag routes
    got = task.reward(task.train, replies)
    expected = [want_s[i] if task.train[i] in task.unsafe else want_h[i] for i in range(4)]
    assert got == pytest.approx(expected, abs=1e-4)
    assert task.reward.last_stats == {"safety_routed_frac": 0.5, "unsafe_prompt_frac": 0.5}
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "unsafe": "yes"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: unsafe: expected true or false"):
        build_task(TaskConfig(source="prompts", path=bad), RewardConfig(kind="gold"))


def test_built_in_preference_prompts_carry_their_unsafe_flag():
    """The built-in prompts' flags come from the generator (the harmful-request family)."""
    from alignkit.rewards.gold import is_unsafe_prompt

    task = build_task(TaskConfig(source="preferences", train=200, heldout=50, val=0), RewardConfig(kind="combined"))
    flagged = [p for p in task.train + task.heldout if task.is_unsafe(p)]
    assert 0 < len(flagged) < 250
    assert all(is_unsafe_prompt(p) == task.is_unsafe(p) for p in task.train + task.heldout)  # the gold rules agree
