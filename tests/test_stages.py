"""The shared stages of the sampling methods: selection, dedupe, pooling, weights, pass@k/maj@k."""

import importlib.util
import math

import pytest
import torch

from alignkit.algorithms.sampling.best_of_n import kl_bound
from alignkit.algorithms.sft import sft_step
from alignkit.algorithms.sampling.stages import (
    Sample,
    above_threshold,
    best_per_prompt,
    cap_per_prompt,
    collect,
    dedupe,
    pass_maj_at_k,
    reasoning_path,
    score,
    to_sft_examples,
    tokenize_samples,
    top_fraction,
)
from alignkit.data.collate import epoch_batches_fn, pad_batch
from alignkit.data.records import Problem
from alignkit.rewards.base import FunctionReward
from alignkit.rewards.verifier_reward import VerifierReward
from alignkit.rewards.verifiers import pass_at_k
from alignkit.rollout.base import SamplingParams


def S(prompt, response, reward, it=0):
    return Sample(prompt, response, reward=reward, iteration=it)


POOL = [S("a", "a1", 0.1), S("a", "a2", 0.9), S("a", "a3", 0.5),
        S("b", "b1", 0.3), S("b", "b2", 0.2), S("b", "b3", 0.95)]


def test_local_best_per_prompt():
    assert [x.response for x in best_per_prompt(POOL)] == ["a2", "b3"]
    assert [x.response for x in best_per_prompt(POOL, k=2)] == ["a2", "a3", "b3", "b1"]


def test_global_top_fraction_ignores_prompts():
    # top 1/3 of 6 = 2 samples: 0.95 and 0.9; top half = 3: adds 0.5 (prompt a again), not b's 0.3
    assert [x.response for x in top_fraction(POOL, 1 / 3)] == ["a2", "b3"]
    assert [x.response for x in top_fraction(POOL, 0.5)] == ["a2", "a3", "b3"]
    with pytest.raises(ValueError):
        top_fraction(POOL, 0)


def test_threshold_and_unscored():
    assert [x.response for x in above_threshold(POOL, 0.5)] == ["a2", "a3", "b3"]
    with pytest.raises(ValueError, match="score"):
        above_threshold([Sample("a", "x")], 0.5)


def test_pooling_across_iterations_keeps_an_older_better_sample():
    old = [S("p", "old good", 0.8, it=1), S("q", "old bad", 0.1, it=1)]
    new = [S("p", "new worse", 0.3, it=2), S("q", "new better", 0.7, it=2)]
    chosen = {x.prompt: (x.response, x.iteration) for x in best_per_prompt(old + new)}
    assert chosen == {"p": ("old good", 1), "q": ("new better", 2)}


def test_reasoning_path_dedupe():
    a = "First 12 + 30 = 42. Then 42 - 5 = 37. The answer is 37."
    b = "We get 12+30=42, and 42 -5 = 37 so the answer is 37"  # same equations, other words
    c = "30 + 12 = 42. 42 - 5 = 37. The answer is 37."  # another path
    assert reasoning_path(a) == reasoning_path(b) == "12+30=42|42-5=37"
    assert reasoning_path(c) != reasoning_path(a)
    assert reasoning_path("  37. ") == reasoning_path("37") == "37"  # answer-only: normalised text
    kept = dedupe([S("p", a, 1), S("p", b, 1), S("p", c, 1), S("q", a, 1)], key=reasoning_path)
    assert [(x.prompt, x.response) for x in kept] == [("p", a), ("p", c), ("q", a)]
    assert len(dedupe([S("p", "85", 1), S("p", " 85 ", 1), S("p", "86", 1)])) == 2


def test_cap_per_prompt_is_seeded_and_keeps_order():
    many = [S("p", str(i), 1.0) for i in range(10)] + [S("q", "x", 1.0)]
    one, two = cap_per_prompt(many, 3, seed=1), cap_per_prompt(many, 3, seed=1)
    assert [x.response for x in one] == [x.response for x in two]
    assert sum(x.prompt == "p" for x in one) == 3 and sum(x.prompt == "q" for x in one) == 1
    kept = [int(x.response) for x in one if x.prompt == "p"]
    assert kept == sorted(kept)


def test_kl_bound_values():
    assert kl_bound(1) == 0.0
    assert kl_bound(16) == pytest.approx(1.835, abs=5e-4)
    assert kl_bound(64) == pytest.approx(3.175, abs=5e-4)
    assert kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)


def test_pass_and_maj_at_k_wiring():
    gold = {"p": "5", "q": "7"}
    samples = [S("p", r, None) for r in ("5", "4", "5", "3")] + [S("q", r, None) for r in ("1", "2", "7", "2")]
    out = pass_maj_at_k(samples, gold.__getitem__, [1, 2, 4])
    assert out["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    assert out["pass@4"] == 1.0
    # maj@1 = pass@1 on disjoint chunks; maj@2 chunks: p: (5,4)->5 ok, (5,3)->5 ok; q: (1,2)->1 no, (7,2)->7 ok
    assert out["maj@1"] == pytest.approx(out["pass@1"])
    assert out["maj@2"] == pytest.approx((1.0 + 0.5) / 2)
    # maj@4: p -> 5 (2 votes) ok; q -> 2 (2 votes) wrong
    assert out["maj@4"] == pytest.approx(0.5)


def test_verifier_reward_binary_graded_gsm8k_math():
    problems = [Problem("What is 40 + 2?", "42"), Problem("Half of one?", "Tom ate 1/2. #### 1/2"),
                Problem("How many?", "3 + 4 = 7\n#### 1,000")]
    binary = VerifierReward(problems)
    assert binary(["What is 40 + 2?", "What is 40 + 2?\nAnswer with only the number."], ["42", "41"]) == [1.0, 0.0]
    assert binary(["How many?"], ["The answer is 1000."]) == [1.0]  # GSM8K '####' with a comma
    if importlib.util.find_spec("math_verify"):  # LaTeX answers need math-verify (a test extra)
        assert binary(["Half of one?", "Half of one?"], ["\\boxed{\\frac{1}{2}}", "0.3"]) == [1.0, 0.0]
    graded = VerifierReward(problems, mode="graded")
    assert graded(["What is 40 + 2?"] * 3, ["42", "41", "no idea"]) == pytest.approx([1.0, 0.5 * (1 - 1 / 42), 0.0])
    with pytest.raises(KeyError, match="no problem"):
        binary(["What is 1 + 1?"], ["2"])


def test_collect_score_and_weighted_batches(tok, model):
    class Echo:
        def generate(self, prompts, params):
            from alignkit.rollout.base import Completion
            return [Completion(i, s, f"{i}-{s}", [1], "stop") for i in range(len(prompts)) for s in range(params.n)]

    samples = collect(Echo(), tok, ["x", "y"], SamplingParams(n=3), iteration=2, source="m")
    assert [(x.prompt, x.response, x.iteration) for x in samples][:4] == [("x", "0-0", 2), ("x", "0-1", 2), ("x", "0-2", 2), ("y", "1-0", 2)]
    score(samples, FunctionReward(lambda p, r: float(r.endswith("1"))))
    assert [x.reward for x in samples] == [0, 1, 0, 0, 1, 0]
    assert to_sft_examples(samples[:1])[0].messages[-1].content == "0-0"
    # reward-weighted NLL: weights 0.5 and 2 scale each example's token losses
    for x, w in zip(samples, (0.5, 2.0)):
        x.reward = w
    data = tokenize_samples(tok, samples[:2], weighted=True)
    step = sft_step(model, weighted=True)
    padded = pad_batch(data, tok.pad_token_id)
    packed = epoch_batches_fn(data, tok.pad_token_id, 0, True, 8, 4096)(0)[0]
    loss_pad, units_pad, _ = step(padded)
    loss_pack, units_pack, _ = step(packed)
    n0, n1 = data[0].n_targets, data[1].n_targets
    assert units_pad == pytest.approx(0.5 * n0 + 2.0 * n1) and units_pack == pytest.approx(units_pad)
    assert loss_pack.item() == pytest.approx(loss_pad.item(), rel=1e-4)
    plain, _, _ = sft_step(model)(pad_batch(tokenize_samples(tok, samples[:2]), tok.pad_token_id))
    assert "weights" not in pad_batch(tokenize_samples(tok, samples[:2]), tok.pad_token_id)
    assert not torch.isclose(plain, loss_pad)


def test_shared_prefix_rows_give_the_packed_loss_and_gradient(tok, model):
    from alignkit.data.packing import shared_prefix_rows

    samples = [Sample(f"What is {a} + {b}?", str(a + b), reward=w) for a, b, w in ((1, 2, 1.0), (13, 4, 0.5), (7, 30, 2.0))]
    data = tokenize_samples(tok, samples, weighted=True)
    rows = shared_prefix_rows(data, 4096)
    assert len(rows) == 1
    assert sum(len(d.input_ids) for d in data) - rows[0]["input_ids"].shape[1] > 20  # the prefix appears once, not 3 times
    for weighted in (False, True):
        model.zero_grad()
        loss_a, units_a, _ = sft_step(model, weighted)(rows[0])
        loss_a.backward()
        grads_a = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        packed = epoch_batches_fn(data, tok.pad_token_id, 0, True, 8, 4096)(0)[0]
        loss_b, units_b, _ = sft_step(model, weighted)(packed)
        loss_b.backward()
        assert units_a == pytest.approx(units_b) and loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
        for ga, p in zip(grads_a, model.parameters()):
            torch.testing.assert_close(ga, p.grad, rtol=1e-4, atol=1e-6)
    assert sum(r["lengths"].shape[0] for r in shared_prefix_rows(data, 40)) == 3  # small rows: still every example once


def test_score_can_fail_replies_cut_off_by_the_budget():
    from alignkit.algorithms.sampling.stages import Sample, score

    done = Sample(prompt="p", response="41", finish_reason="stop")
    cut = Sample(prompt="p", response="82 + 41 =", finish_reason="length")
    always = lambda prompts, responses: [1.0] * len(prompts)
    assert [x.reward for x in score([done, cut], always)] == [1.0, 1.0]
    assert [x.reward for x in score([done, cut], always, truncated=0.0)] == [1.0, 0.0]


def test_score_rejects_nan_and_inf_naming_the_first_offender():
    long = "What is the sum of 1234 and 5678? Show every step of your working, please."  # 74 characters: cut to 57 + "..."
    samples = [Sample("short", "r0", 0, 0), Sample(long, "r0", 1, 0), Sample(long, "r1", 1, 1), Sample(long, "r2", 1, 2)]
    scores = {"r0": 1.0, "r1": math.nan, "r2": math.inf}
    reward = lambda prompts, responses: [scores[r] if p == long else 0.5 for p, r in zip(prompts, responses)]
    with pytest.raises(ValueError) as err:
        score(samples, reward, batch_size=2)  # the offenders span two reward calls
    assert str(err.value) == ("the reward function returned 2 non-finite score(s) of 4; the first: nan for response 1 of "
                              "prompt 'What is the sum of 1234 and 5678? Show every step of your...'")
    assert all(x.reward is None for x in samples)  # nothing half-scored
    scores["r1"] = -math.inf
    with pytest.raises(ValueError) as err:
        score(samples, reward, truncated=0.0)
    assert str(err.value) == ("the reward function returned 2 non-finite score(s) of 4; the first: -inf for response 1 of "
                              "prompt 'What is the sum of 1234 and 5678? Show every step of your...'")
    samples[2].finish_reason = samples[3].finish_reason = "length"  # cut off: scored `truncated`, whatever the function says
    assert [x.reward for x in score(samples, reward, truncated=0.0)] == [0.5, 1.0, 0.0, 0.0]
    short = [Sample("short", "r1", 0, 3)]
    with pytest.raises(ValueError) as err:
        score(short, lambda p, r: [math.inf])
    assert str(err.value) == "the reward function returned 1 non-finite score(s) of 1; the first: inf for response 3 of prompt 'short'"


def test_collect_puts_few_shot_turns_before_each_prompt(tok):
    """Exemplar turns go into the text the generator continues, before the user message; the
    samples keep the bare prompt (what the M-step trains on and the reward sees)."""
    from alignkit.data.chat import prompt_text
    from alignkit.data.records import Message, user_prompt
    from alignkit.rollout.base import Completion
    from alignkit.tasks import RewardConfig, TaskConfig, build_task

    seen = []

    class Recorder:
        def generate(self, prompts, params):
            seen.extend(prompts)
            return [Completion(i, 0, "7", [1], "stop") for i in range(len(prompts))]

    task = build_task(TaskConfig(train=4, val=0, heldout=2), RewardConfig())
    shots = task.shot_turns([["What is 2 + 3?", "2 + 3 = 5"], ["What is 1 - 4?", "1 - 4 = -3"]])
    assert shots == (Message("user", "What is 2 + 3?\nAnswer with only the number."), Message("assistant", "2 + 3 = 5"),
                     Message("user", "What is 1 - 4?\nAnswer with only the number."), Message("assistant", "1 - 4 = -3"))
    samples = collect(Recorder(), tok, ["q1"], SamplingParams(), shots=shots)
    assert seen == [prompt_text(tok, shots + (Message("user", "q1"),))] == [prompt_text(tok, user_prompt("q1", None, shots))]
    assert seen[0].index("1 - 4 = -3") < seen[0].index("q1") and samples[0].prompt == "q1"
    collect(Recorder(), tok, ["q1"], SamplingParams())
    assert seen[1] == prompt_text(tok, (Message("user", "q1"),)) and "2 + 3" not in seen[1]
