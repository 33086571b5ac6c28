"""HFGenerator on the tiny model: exactness against a no-cache loop, shared prefill, seeds, stops."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from alignkit.data.records import Message, user_prompt
from alignkit.models.tiny import tiny_model, tiny_tokenizer
from alignkit.rollout.base import Completion, Generator, SamplingParams, chat_prompts
from alignkit.rollout import hf
from alignkit.rollout.hf import HFGenerator

TOK = tiny_tokenizer()
# ALIGNKIT_TEST_DEVICE=cuda runs the generator tests on a GPU (benchmarks/RESULTS.md, "CUDA checks")
DEVICE = torch.device(os.environ.get("ALIGNKIT_TEST_DEVICE", "cpu"))
EOS = TOK.eos_token_id


def _model(eos_boost: float = 0.0):
    """Tiny model with larger weights (so greedy text depends on the prompt) and an optional
    bonus on the eos logit (so rows finish at different steps)."""
    model = tiny_model(0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if eos_boost:
        bonus = torch.zeros(model.config.vocab_size, device=DEVICE)
        bonus[EOS] = eos_boost
        model.lm_head.register_forward_hook(lambda mod, args, out: out + bonus)
    return model.to(DEVICE)


PROMPTS = chat_prompts(TOK, [
    user_prompt("hi"),
    user_prompt("what is 12 + 30? answer briefly"),
    (Message("system", "be terse"), Message("user", "a much longer prompt, with more bytes in it than the others")),
])


@torch.no_grad()
def _greedy_reference(model, prompt: str, max_new: int) -> list[int]:
    """Step-by-step argmax with a full forward pass each step, no cache and no padding."""
    ids = TOK(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(max_new):
        logits = model(torch.tensor([ids + out], device=DEVICE)).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == EOS:
            break
    return out


def test_sampling_params_validation():
    for bad in [dict(n=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                dict(max_new_tokens=0), dict(stop=("",)), dict(temperature=float("nan"))]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="\n").stop == ("\n",)


def test_chat_prompts_adds_generation_prompt():
    assert PROMPTS[0] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("eos_boost", [0.0, 3.0])
def test_greedy_matches_no_cache_argmax_loop(eos_boost, monkeypatch):
    crops = []
    real_crop = hf._crop_front
    monkeypatch.setattr(hf, "_crop_front", lambda cache, cut: crops.append(cut) or real_crop(cache, cut))
    model = _model(eos_boost)
    gen = HFGenerator(model, TOK, batch_size=3)
    assert isinstance(gen, Generator)
    out = gen.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=20))
    assert [(c.prompt_index, c.sample_index) for c in out] == [(0, 0), (1, 0), (2, 0)]
    refs = [_greedy_reference(model, p, 20) for p in PROMPTS]
    assert [c.token_ids for c in out] == refs
    for c, ref in zip(out, refs):
        assert c.finish_reason == ("stop" if ref[-1] == EOS else "length")
        assert c.text == TOK.decode([t for t in ref if t != EOS], skip_special_tokens=True)
    if eos_boost:  # rows ended at different steps, so row dropping and cache cropping ran
        assert len({len(c.token_ids) for c in out}) > 1 and any(c.finish_reason == "stop" for c in out)
        assert out[0].token_ids[-1] == EOS  # the eos id is kept in token_ids
        # the longest prompt finished first: the padding columns left of the others were cut
        assert crops == [len(TOK(PROMPTS[2], add_special_tokens=False)["input_ids"])
                         - len(TOK(PROMPTS[1], add_special_tokens=False)["input_ids"])]


def test_prompt_prefilled_once_for_n_samples_and_decoded_once_per_distinct_prefix(monkeypatch):
    monkeypatch.setattr(hf, "COMPACT_AFTER", 0.0)  # finished rows leave at once
    model = _model(eos_boost=3.0)
    calls = []
    model.model.embed_tokens.register_forward_pre_hook(lambda mod, args: calls.append(tuple(args[0].shape)))
    n = 4
    out = HFGenerator(model, TOK, batch_size=1).generate(
        PROMPTS, SamplingParams(n=n, temperature=1.0, max_new_tokens=12, seed=0))
    lengths = [len(TOK(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    prefills = [shape for shape in calls if shape[1] > 1]
    # every prompt token went through the model exactly once, not n times
    assert sorted(prefills) == sorted((1, length) for length in lengths)
    # decode calls: step t feeds one row per distinct t-token prefix of the samples still running
    for p in range(len(PROMPTS)):
        samples = out[p * n:(p + 1) * n]
        expected = [len({tuple(c.token_ids[:t]) for c in samples if len(c.token_ids) > t}) for t in range(1, 12)]
        expected = [e for e in expected if e > 0]
        start = calls.index((1, lengths[p])) + 1
        assert [s[0] for s in calls[start:start + len(expected)]] == expected
    assert len({len(c.token_ids) for c in out}) > 1  # some rows did stop early
    # and some prefixes were shared, some split
    assert any(0 < len({tuple(c.token_ids[:1]) for c in out[p * n:(p + 1) * n]}) < n for p in range(len(PROMPTS)))
    assert any(len({tuple(c.token_ids) for c in out[p * n:(p + 1) * n]}) > 1 for p in range(len(PROMPTS)))


@torch.no_grad()
def _independent_rows_reference(model, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    """Every sample as its own row, with a full no-cache forward pass per row and step, drawing
    one uniform number per running row in row order, as the generator does."""
    gen = torch.Generator(device=DEVICE).manual_seed(params.seed)
    ids = [TOK(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [(i, []) for i in range(len(prompts)) for _ in range(params.n)]
    running = list(range(len(rows)))
    for _ in range(params.max_new_tokens):
        logits = torch.stack([model(torch.tensor([ids[rows[r][0]] + rows[r][1]], device=DEVICE)).logits[0, -1]
                              for r in running])
        for r, token in zip(running, hf._sample(logits, params, gen).tolist()):
            rows[r][1].append(token)
        running = [r for r in running if rows[r][1][-1] != EOS]
        if not running:
            break
    return [tokens for _, tokens in rows]


@pytest.mark.parametrize("kw", [dict(temperature=0.6, top_k=20), dict(temperature=1.0, top_p=0.9), dict(temperature=0.3)])
def test_shared_prefix_decoding_equals_independent_rows(kw):
    """Rows that share a prefix share one forward pass; the samples are exactly those of
    independent rows given the same random numbers, with prefix sharing on or off."""
    model = _model(eos_boost=2.0)
    rows = []
    model.model.embed_tokens.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    params = SamplingParams(n=6, max_new_tokens=10, seed=5, **kw)
    out = HFGenerator(model, TOK, batch_size=len(PROMPTS)).generate(PROMPTS, params)
    shared = sum(rows[1:])  # rows decoded after the prefill
    assert [c.token_ids for c in out] == _independent_rows_reference(model, PROMPTS, params)
    rows.clear()
    alone = HFGenerator(model, TOK, batch_size=len(PROMPTS), share_prefixes=False).generate(PROMPTS, params)
    assert [c.token_ids for c in alone] == [c.token_ids for c in out]
    assert shared < sum(rows[1:])  # fewer rows decoded
    per_prompt = [[tuple(c.token_ids) for c in out[p * 6:(p + 1) * 6]] for p in range(len(PROMPTS))]
    assert any(len({s[:1] for s in samples}) < 6 for samples in per_prompt)  # some rows shared a prefix
    assert any(len(set(samples)) > 1 for samples in per_prompt)  # and split later


def test_when_finished_rows_leave_changes_no_output(monkeypatch):
    model = _model(eos_boost=3.0)
    params = SamplingParams(n=3, temperature=0, max_new_tokens=12, logprobs=True)
    outs = []
    for compact_after in (0.0, hf.COMPACT_AFTER, 1e9):  # at once, the default policy, never
        monkeypatch.setattr(hf, "COMPACT_AFTER", compact_after)
        outs.append([(c.token_ids, c.finish_reason, c.text) for c in HFGenerator(model, TOK, batch_size=2).generate(PROMPTS, params)])
    assert outs[0] == outs[1] == outs[2]
    assert len({len(ids) for ids, _, _ in outs[0]}) > 1  # rows did finish at different steps


def test_seed_reproduces_and_different_seeds_differ():
    model = _model()
    gen = HFGenerator(model, TOK, batch_size=2)
    params = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10)
    a = gen.generate(PROMPTS, SamplingParams(seed=7, **params))
    b = gen.generate(PROMPTS, SamplingParams(seed=7, **params))
    c = gen.generate(PROMPTS, SamplingParams(seed=8, **params))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # samples of one prompt are not copies of each other
    assert len({tuple(x.token_ids) for x in a[:3]}) > 1


def test_result_is_prompt_major_and_order_independent_of_batching():
    model = _model()
    params = SamplingParams(n=2, temperature=0, max_new_tokens=8)
    reversed_prompts = PROMPTS[::-1]  # longest first: sorting by length must not leak into the order
    a = HFGenerator(model, TOK, batch_size=2).generate(reversed_prompts, params)
    b = HFGenerator(model, TOK, batch_size=1).generate(reversed_prompts, params)
    assert [(c.prompt_index, c.sample_index) for c in a] == [(i, s) for i in range(3) for s in range(2)]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    refs = [_greedy_reference(model, p, 8) for p in reversed_prompts]
    assert [c.token_ids for c in a] == [r for r in refs for _ in range(2)]


def test_top_k_1_equals_greedy():
    model = _model()
    gen = HFGenerator(model, TOK)
    greedy = gen.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    topk1 = gen.generate(PROMPTS, SamplingParams(n=2, temperature=1.3, top_k=1, max_new_tokens=10, seed=3))
    assert [c.token_ids for c in topk1] == [c.token_ids for c in greedy for _ in range(2)]


def test_stop_string_stops_and_cuts_text():
    model = _model()
    gen = HFGenerator(model, TOK)
    full = gen.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=24))[0]
    text = full.text
    # a printable ASCII character that first appears at position k >= 3 of the greedy text
    k = next(i for i in range(3, len(text)) if text[i].isascii() and text[i].isprintable() and text[i] not in text[:i])
    stop = text[k]
    cut = gen.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=24, stop=(stop, "never-seen")))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[:k]
    # generation ended on the token that completed the stop string; that token is kept
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    assert stop in TOK.decode(cut.token_ids) and stop not in TOK.decode(cut.token_ids[:-1])
    assert full.finish_reason == "length" and len(full.token_ids) == 24


def test_max_new_tokens_gives_length_and_logprobs_are_untempered():
    model = _model()
    out = HFGenerator(model, TOK).generate(
        PROMPTS[:2], SamplingParams(n=2, temperature=0.7, max_new_tokens=6, seed=1, logprobs=True))
    assert all(c.finish_reason == "length" and len(c.token_ids) == 6 for c in out)
    for c in out:
        ids = TOK(PROMPTS[c.prompt_index], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids + c.token_ids], device=DEVICE)).logits[0, len(ids) - 1:-1]
        expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(c.token_ids, device=DEVICE)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(c.logprobs), expected.cpu(), atol=1e-4)
    assert HFGenerator(model, TOK).generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, seed=0))[0].logprobs is None


def test_training_flag_restored_and_bf16_runs():
    model = _model()
    model.train()
    out = HFGenerator(model, TOK, dtype="bf16").generate(PROMPTS[:2], SamplingParams(n=2, max_new_tokens=4, seed=0))
    assert model.training
    assert len(out) == 4 and all(isinstance(c, Completion) and len(c.token_ids) >= 1 for c in out)
    with pytest.raises(ValueError):
        HFGenerator(model, TOK).generate([""], SamplingParams())


def test_sampler_follows_temperature_top_k_top_p():
    from alignkit.rollout.hf import _sample

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rows = logits.repeat(40000, 1)
    gen = torch.Generator().manual_seed(0)

    def freq(**kw):
        picks = _sample(rows, SamplingParams(**kw), gen)
        return torch.bincount(picks, minlength=4).float() / len(picks)

    assert torch.allclose(freq(temperature=1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01)
    # temperature 0.5 squares the probabilities: [.25, .09, .0225, .0025] / .365
    assert torch.allclose(freq(temperature=0.5), torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365, atol=0.01)
    # top_k=2 keeps 0.5 and 0.3, renormalised: [.625, .375, 0, 0]
    assert torch.allclose(freq(top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)
    # top_p=0.7: 0.5 alone is below 0.7, 0.5+0.3 reaches it, so the nucleus is the first two tokens
    assert torch.allclose(freq(top_p=0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)
    # top_p=0.45: the most likely token alone already has 0.5
    assert torch.equal(freq(top_p=0.45), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = _model(eos_boost=3.0)
    base = HFGenerator(model, TOK).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    out = HFGenerator(wrapped, TOK).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    assert [c.token_ids for c in out] == [c.token_ids for c in base]  # a fresh LoRA adapter is a no-op
    assert wrapped.training


def test_merged_twin_decodes_the_current_adapters():
    peft = pytest.importorskip("peft")
    from alignkit.algorithms.ppo.actor_critic import adapter_scope
    from alignkit.rollout.merged import MergedTwin

    wrapped = peft.get_peft_model(_model(eos_boost=0.0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    twin = MergedTwin.of(wrapped)
    ids = torch.tensor([[5, 9, 14, 20, 33, 41]], device=DEVICE)
    with torch.no_grad():
        want = wrapped(input_ids=ids).logits
        assert not torch.allclose(want, wrapped.get_base_model()(input_ids=ids).logits * 0 + want.mean())
        torch.testing.assert_close(twin.refresh()(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        for name, p in wrapped.named_parameters():  # the adapters move: a refresh follows them
            if "lora_A" in name:
                p.mul_(-2.0)
        moved = wrapped(input_ids=ids).logits
        assert not torch.allclose(moved, want, atol=1e-3)
        torch.testing.assert_close(twin.refresh()(input_ids=ids).logits, moved, rtol=1e-4, atol=1e-4)
        with adapter_scope(wrapped, None):  # adapters off: the twin is the base model
            base = wrapped(input_ids=ids).logits
            torch.testing.assert_close(twin.refresh()(input_ids=ids).logits, base, rtol=1e-4, atol=1e-4)
    lm = wrapped.get_base_model()
    assert twin.model.get_input_embeddings().weight is lm.get_input_embeddings().weight  # shared, not copied
    assert twin.model.model.layers[0].self_attn.q_proj.weight.data_ptr() != \
        lm.model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr()
    out = HFGenerator(wrapped, TOK).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    plain = HFGenerator(wrapped, TOK, merge_lora=False).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]


def test_max_rows_sets_prompts_per_batch_from_n(monkeypatch):
    sizes = []
    real = HFGenerator._generate_batch
    monkeypatch.setattr(HFGenerator, "_generate_batch", lambda self, m, ids, *a: sizes.append(len(ids)) or real(self, m, ids, *a))
    gen = HFGenerator(_model(0.0), TOK, batch_size=1, max_rows=4)
    prompts = PROMPTS * 3  # 9 prompts
    greedy = gen.generate(prompts, SamplingParams(temperature=0, max_new_tokens=3))
    assert sizes == [4, 4, 1]
    sizes.clear()
    gen.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=3, seed=0))
    assert sizes == [2, 2, 2, 2, 1]
    sizes.clear()
    gen.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=3, seed=0))
    assert sizes == [1] * 9  # never fewer than one prompt per batch
    one_by_one = HFGenerator(_model(0.0), TOK, batch_size=1).generate(prompts, SamplingParams(temperature=0, max_new_tokens=3))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in one_by_one]
    with pytest.raises(ValueError, match="max_rows"):
        HFGenerator(_model(0.0), TOK, max_rows=0)


SHARED = chat_prompts(TOK, [
    (Message("system", "you are a careful assistant who answers every question briefly"), Message("user", question))
    for question in ("hi", "what is 12 + 30?", "name a colour, then another one")
])


@pytest.mark.parametrize("eos_boost", [0.0, 3.0])
def test_shared_root_prefilled_once_per_batch_and_output_unchanged(eos_boost):
    model = _model(eos_boost)
    ids = [TOK(p, add_special_tokens=False)["input_ids"] for p in SHARED]
    root = hf._shared_root(ids)
    assert root >= hf.MIN_SHARED_ROOT and all(x[:root] == ids[0][:root] for x in ids)
    assert ids[0][root] != ids[1][root] or ids[0][root] != ids[2][root]  # the longest common prefix
    calls, split = [], []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda mod, args: calls.append(tuple(args[0].shape)))
    real_split = hf._BufferLayer.split_root

    def spy(layer, rows):  # the root's keys stay one row; the layer's own buffers get the batch's rows
        real_split(layer, rows)
        split.append((rows, layer.root_keys.shape[0], layer.root_keys.shape[2], layer.keys.shape[0]))
    params = SamplingParams(n=2, temperature=0, max_new_tokens=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf._BufferLayer, "split_root", spy)
        out = HFGenerator(model, TOK, batch_size=3).generate(SHARED, params)
    assert split == [(3, 1, root, 3)] * model.config.num_hidden_layers
    # the root once, then the rest of the three prompts (left-padded), then one token per step
    assert calls[:2] == [(1, root), (3, max(len(x) for x in ids) - root)]
    assert all(shape[1] == 1 for shape in calls[2:])
    hook.remove()
    alone = HFGenerator(model, TOK, batch_size=1).generate(SHARED, params)  # one prompt: no root
    assert [c.token_ids for c in out] == [c.token_ids for c in alone]
    refs = [_greedy_reference(model, p, 10) for p in SHARED]
    assert [c.token_ids for c in out] == [r for r in refs for _ in range(2)]
    if eos_boost:
        assert len({len(c.token_ids) for c in out}) > 1  # rows finished at different steps


def test_shared_root_needs_a_long_enough_common_prefix():
    assert hf._shared_root([[1] * 20, [1] * 5 + [2] * 15]) == 0  # 5 common tokens: below the minimum
    assert hf._shared_root([[1] * 20, [1] * 12 + [2]]) == 12
    assert hf._shared_root([[7] * 10, [7] * 10]) == 9  # identical prompts: the last token stays out


def test_cache_keyword_follows_the_installed_forward(recwarn):
    class OldStyle(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            raise NotImplementedError

    assert hf.cache_keyword(OldStyle()) == "past_key_values"
    model = _model()
    kw = hf.cache_keyword(model)
    assert kw in ("cache", "past_key_values")
    assert kw in inspect.signature(type(model).forward).parameters
    HFGenerator(model, TOK).generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=0))
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]  # no deprecated name passed
