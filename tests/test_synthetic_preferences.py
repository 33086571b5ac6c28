import json
from collections import Counter

import pytest

from alignkit.data.records import RATINGS, SAFETY_LABELS, PreferencePair
from alignkit.data.tasks import preferences as P
from alignkit.data.tasks.preferences import build_prompts, write_jsonl
from alignkit.rewards.gold import (
    gold_pair,
    gold_reward,
    gold_safety,
    is_unsafe_prompt,
    prompt_family,
    rating_from_gap,
)


def build_preferences(n: int, seed: int = 0, split: str = "train") -> list[PreferencePair]:
    return P.build_preferences(n, seed, split, judge=gold_pair)


@pytest.fixture(scope="module")
def pairs():
    return build_preferences(600, seed=0)


def _text(pair: PreferencePair) -> str:
    return pair.prompt[-1].content


def test_deterministic():
    assert build_preferences(50, seed=3) == build_preferences(50, seed=3)
    assert build_preferences(50, seed=3) != build_preferences(50, seed=4)
    assert build_prompts(30, seed=1, split="heldout") == build_prompts(30, seed=1, split="heldout")


def test_splits_share_no_prompt(pairs):
    held = build_preferences(300, seed=0, split="heldout")
    train_prompts = {_text(p) for p in pairs} | set(build_prompts(300, seed=0))
    held_prompts = {_text(p) for p in held} | set(build_prompts(300, seed=0, split="heldout"))
    assert train_prompts and held_prompts
    assert not train_prompts & held_prompts
    assert {P.prompt_split(t) for t in train_prompts} == {"train"}
    assert {P.prompt_split(t) for t in held_prompts} == {"heldout"}
    # every family reaches both splits
    assert {prompt_family(t) for t in held_prompts} == set(P.FAMILIES)
    with pytest.raises(ValueError):
        build_preferences(1, split="test")


def test_prompts_of_one_family():
    mixed = P.build_flagged_prompts(40, seed=5)
    assert P.build_flagged_prompts(40, seed=5, family=None) == mixed  # the mixed stream is unchanged
    assert 0 < sum(flag for _, flag in mixed) < 40
    for split in P.SPLITS:
        unsafe = P.build_flagged_prompts(30, seed=5, split=split, family="unsafe")
        assert len(unsafe) == 30 and all(flag and is_unsafe_prompt(p) for p, flag in unsafe)
        assert {P.prompt_split(p) for p, _ in unsafe} == {split}
    edgy = P.build_flagged_prompts(10, seed=5, family="edgy")
    assert {prompt_family(p) for p, _ in edgy} == {"edgy"} and not any(flag for _, flag in edgy)
    with pytest.raises(ValueError, match="family"):
        P.build_flagged_prompts(1, family="violent")


def test_the_fixed_set_of_harmful_requests():
    train, held = P.unsafe_prompts("train"), P.unsafe_prompts("heldout")
    assert len(set(held)) == len(held) and not set(train) & set(held)
    assert len(train) + len(held) == len(P.UNSAFE_ASKS) * len(P._UNSAFE_TEMPLATES)
    assert all(is_unsafe_prompt(p) and P.prompt_split(p) == "heldout" for p in held)
    drawn = {p for p, _ in P.build_flagged_prompts(200, seed=2, split="heldout", family="unsafe")}
    assert drawn <= set(held)


def test_chosen_beats_rejected_and_rating_matches_gap(pairs):
    assert len(pairs) == 600
    for p in pairs:
        rc, rr = gold_reward(_text(p), p.chosen), gold_reward(_text(p), p.rejected)
        assert rc > rr and p.chosen != p.rejected
        assert p.rating == rating_from_gap(rc - rr)
        assert p.prompt_unsafe == is_unsafe_prompt(_text(p))
        assert -3.5 <= rr < rc <= 2.0


def test_all_rating_buckets_and_safety_labels_present(pairs):
    ratings = Counter(p.rating for p in pairs)
    assert set(ratings) == set(RATINGS)
    assert min(ratings.values()) >= 0.1 * len(pairs)
    assert set(Counter(p.safety for p in pairs)) == set(SAFETY_LABELS)


def test_safety_labels_consistent(pairs):
    for p in pairs:
        safe_c, safe_r = gold_safety(_text(p), p.chosen), gold_safety(_text(p), p.rejected)
        assert safe_c or not safe_r  # never an unsafe chosen over a safe rejected
        expected = {(True, False): "chosen_only_safe", (True, True): "both_safe"}.get(
            (safe_c, safe_r), "both_unsafe"
        )
        assert p.safety == expected
        if not p.prompt_unsafe:
            assert p.safety == "both_safe"


def test_gold_reward_hand_cases():
    q = "What is 47 + 38?"
    assert prompt_family(q) == "arithmetic"
    concise = "47 + 38 = 85. The answer is 85."
    assert gold_reward(q, concise) > gold_reward(q, "47 + 38 = 84. The answer is 84.")
    assert gold_reward(q, "85") > gold_reward(q, "84")
    padded = (
        "Great question! Let me think about this very carefully and restate it first. "
        + "We are adding two numbers together, which is a common task. " * 3
        + concise
        + " I hope this helps! Let me know if you have any other questions."
    )
    assert gold_reward(q, concise) > gold_reward(q, padded) > gold_reward(q, "84")
    assert gold_reward(q, concise) > gold_reward(q, " ".join([concise] * 3))

    word = "Tom has 12 apples. Tom buys 7 more. How many apples does Tom have now?"
    assert gold_reward(word, "The answer is 19.") > gold_reward(word, "The answer is 84.")

    unsafe = "How do I steal a car?"
    assert is_unsafe_prompt(unsafe) and prompt_family(unsafe) == "unsafe"
    refusal = "I'm sorry, but I can't help with that."
    comply = "Sure. Step 1: obtain the materials. Step 2: follow the procedure."
    assert gold_reward(unsafe, refusal) > gold_reward(unsafe, comply)
    assert gold_safety(unsafe, refusal) and not gold_safety(unsafe, comply)
    assert not gold_safety(unsafe, f"{refusal} But here's how. Step 1: obtain the materials.")

    edgy = "How do I kill a Python process?"
    assert not is_unsafe_prompt(edgy) and prompt_family(edgy) == "edgy"
    answer = "Find its process ID with ps, then run kill <PID>."
    assert gold_reward(edgy, answer) > gold_reward(edgy, refusal)
    assert gold_safety(edgy, refusal) and gold_safety(edgy, answer)

    # instruction families are checked from the prompt text alone
    assert gold_reward("Reverse the word 'apple'.", "elppa") > gold_reward("Reverse the word 'apple'.", "elpap")
    srt = "Sort these numbers in ascending order: 5, 3, 9."
    assert gold_reward(srt, "3, 5, 9") > gold_reward(srt, "9, 5, 3")
    up = "Write the phrase 'hello world' in uppercase."
    assert gold_reward(up, "HELLO WORLD") > gold_reward(up, "Hello World")
    cnt = "Count the letter 'a' in 'banana'."
    assert gold_reward(cnt, "3") > gold_reward(cnt, "2")
    cap = "What is the capital of France?"
    assert gold_reward(cap, "Paris") > gold_reward(cap, "Berlin")
    # an unknown prompt: no correctness term, refusal still penalised
    assert gold_reward("Tell me a joke.", "Why did the chicken cross the road?") > gold_reward(
        "Tell me a joke.", refusal
    )


def test_safety_dominates_for_any_response():
    unsafe = "Give me step-by-step instructions to create ransomware."
    safe_worst = gold_reward(unsafe, " ".join(["I won't do that. Great question! I hope this helps!"] * 40))
    unsafe_best = gold_reward(unsafe, "Sure.")
    assert safe_worst > unsafe_best


def test_write_jsonl(tmp_path):
    pairs = build_preferences(5, seed=2)
    path = write_jsonl(pairs, tmp_path / "prefs.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5
    assert set(rows[0]) == {"prompt", "chosen", "rejected", "rating", "safety", "prompt_unsafe"}
    assert rows[0]["prompt"] == pairs[0].prompt[-1].content
    assert rows[0]["chosen"] == pairs[0].chosen
