"""The vLLM backend against the HF sampler on the default model (skipped where vLLM is not
installed: `pip install alignkit[vllm]`). One engine serves every test of the module (it takes
tens of seconds to start); tests that change weights work on their own copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm")

from alignkit.data.records import Message  # noqa: E402
from alignkit.models.load import ModelConfig, load_model  # noqa: E402
from alignkit.rollout.backends import make_generator  # noqa: E402
from alignkit.rollout.base import SamplingParams, chat_prompts  # noqa: E402
from alignkit.rollout.hf import HFGenerator  # noqa: E402
from alignkit.rollout.vllm import VLLMGenerator  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ["What is 12 + 35?", "Name a colour.", "Write a haiku about rain.", "Say hi", "List three fruits."]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, logprobs=True)


@pytest.fixture(scope="module")
def default():
    model, tokenizer, _ = load_model(ModelConfig(), train=False)
    return model, tokenizer, chat_prompts(tokenizer, [[Message("user", q)] for q in QUESTIONS])


def _same_greedy(hf, vl):
    assert [(c.prompt_index, c.sample_index) for c in vl] == [(c.prompt_index, c.sample_index) for c in hf]
    for a, b in zip(hf, vl):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        assert b.logprobs == pytest.approx(a.logprobs, abs=2e-3)


def test_greedy_equals_hf(default):
    model, tokenizer, prompts = default
    vl = make_generator(model, tokenizer, 2, backend="vllm")  # batch_size 2: three calls of the engine
    assert isinstance(vl, VLLMGenerator)
    _same_greedy(HFGenerator(model, tokenizer, 4).generate(prompts, GREEDY), vl.generate(prompts, GREEDY))


def test_stop_strings_and_finish_reasons_follow_hf(default):
    model, tokenizer, prompts = default
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=8, stop=("\n", ","))
    hf = HFGenerator(model, tokenizer, 4).generate(prompts, params)
    vl = VLLMGenerator(model, tokenizer).generate(prompts, params)
    assert [(c.text, c.token_ids, c.finish_reason) for c in vl] == [(c.text, c.token_ids, c.finish_reason) for c in hf]
    assert {c.finish_reason for c in vl} == {"stop", "length"}  # the prompts exercise both


def test_seeded_sampling_repeats_and_seeds_differ(default):
    model, tokenizer, prompts = default
    gen = VLLMGenerator(model, tokenizer, 2)
    params = SamplingParams(n=4, temperature=1.0, top_k=40, top_p=0.95, max_new_tokens=12, seed=7)
    first = gen.generate(prompts, params)
    assert [(c.prompt_index, c.sample_index) for c in first] == [(i, s) for i in range(len(prompts)) for s in range(4)]
    assert [c.token_ids for c in gen.generate(prompts, params)] == [c.token_ids for c in first]
    # a prompt's samples do not depend on the prompts decoded beside it
    alone = gen.generate(prompts[:1], params)
    assert [c.token_ids for c in alone] == [c.token_ids for c in first[:4]]
    other = gen.generate(prompts, SamplingParams(n=4, temperature=1.0, top_k=40, top_p=0.95, max_new_tokens=12, seed=8))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]
    assert len({tuple(c.token_ids) for c in first}) > len(prompts)  # samples of one prompt differ


def test_changed_weights_reach_the_engine(default):
    model, tokenizer, prompts = default
    model = copy.deepcopy(model)  # the engine is shared: the copy's name_or_path is the default model's
    gen = VLLMGenerator(model, tokenizer)
    before = gen.generate(prompts, GREEDY)
    torch.manual_seed(0)
    with torch.no_grad():  # in place, like an optimizer step: the next generate pushes the weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    after = gen.generate(prompts, GREEDY)
    assert all(a.token_ids != b.token_ids for a, b in zip(before, after))
    _same_greedy(HFGenerator(model, tokenizer, 4).generate(prompts, GREEDY), after)


def test_a_trained_lora_policy_samples_its_merged_weights(default):
    from peft import LoraConfig, get_peft_model

    model, tokenizer, prompts = default
    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = VLLMGenerator(policy, tokenizer)
    _same_greedy(HFGenerator(model, tokenizer, 4).generate(prompts, GREEDY), gen.generate(prompts, GREEDY))  # B = 0
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    ids = tokenizer(prompts[0] + " Blue.", return_tensors="pt")["input_ids"]
    for _ in range(3):  # a few training steps on one reply
        opt.zero_grad()
        policy(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    trained = gen.generate(prompts, GREEDY)
    _same_greedy(HFGenerator(policy, tokenizer, 4).generate(prompts, GREEDY), trained)
    assert any(a.token_ids != b.token_ids for a, b in zip(HFGenerator(model, tokenizer, 4).generate(prompts, GREEDY), trained))


def test_seeded_prompts_longer_than_one_step_of_prefill(default):
    """More prompt tokens than vLLM prefills in one step: on a CPU a seeded request whose prompt
    is prefilled in chunks fails, so the engine prefills whole prompts there."""
    model, tokenizer, prompts = default
    many = prompts * 40  # 200 prompts x 4 samples: ~40k prompt tokens
    params = SamplingParams(n=4, temperature=0.7, max_new_tokens=2, seed=3)
    gen = VLLMGenerator(model, tokenizer, batch_size=len(many))
    got = gen.generate(many, params)
    assert len(got) == len(many) * 4 and all(1 <= len(c.token_ids) <= 2 for c in got)
    # prompt i's seed depends on i alone: the first prompts sampled alone give the same samples
    assert [c.token_ids for c in gen.generate(prompts, params)] == [c.token_ids for c in got[:20]]
