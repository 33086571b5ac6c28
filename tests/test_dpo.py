import copy
import json
import math

import pytest
import torch

from alignkit.algorithms.dpo import (
    DPOConfig,
    DPODataConfig,
    dpo_step,
    precompute_reference,
    reference_fn,
    run,
    tokenize_pairs,
)
from alignkit.algorithms.make_pairs import PairsConfig, pair_answers, pair_record
from alignkit.data.chat import IGNORE, tokenize_prompt_response
from alignkit.data.packing import pack_rows, tokenize_group
from alignkit.data.records import Message, PreferencePair, Problem
from alignkit.engine.config import TrainConfig
from alignkit.engine.logging import read_metrics
from alignkit.engine.trainer import Engine, fit
from alignkit.eval.arithmetic import TrainingEvalConfig
from alignkit.losses.dpo import dpo_loss, ipo_loss
from alignkit.models.forward import group_logprobs
from alignkit.models.load import LoraConfig, ModelConfig, add_lora
from alignkit.models.tiny import save_tiny, tiny_model
from alignkit.rollout.base import Completion, SamplingConfig

PAIRS = [
    PreferencePair((Message("user", "what is 2+2?"),), "4", "5 or maybe 6"),
    PreferencePair((Message("system", "be brief"), Message("user", "reverse abc")), "cba", "abc"),
    PreferencePair((Message("user", "say hi"),), "hi there", "no"),
    PreferencePair((Message("user", "count to three"),), "1 2 3", "1 2 4 5"),
]


def plain_logp(model, tok, prompt, response) -> float:
    """One unpacked forward of prompt+response; log_softmax gathered over the response tokens."""
    t = tokenize_prompt_response(tok, prompt, response)
    logits = model(torch.tensor([t.input_ids])).logits[0, :-1].float()
    labels = torch.tensor(t.labels[1:])
    keep = labels != IGNORE
    return torch.log_softmax(logits, -1)[keep].gather(1, labels[keep][:, None]).sum().item()


def plain_pair_logps(model, tok):
    return [torch.tensor([plain_logp(model, tok, p.prompt, getattr(p, side)) for p in PAIRS])
            for side in ("chosen", "rejected")]


@pytest.mark.parametrize("loss,smoothing", [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0)])
def test_step_loss_equals_dpo_loss_on_independent_logps(tok, loss, smoothing):
    policy, ref = tiny_model(seed=0).eval(), tiny_model(seed=1).eval()
    cfg = DPOConfig(loss=loss, beta=0.5, label_smoothing=smoothing)
    rows = pack_rows(tokenize_pairs(tok, PAIRS, 512), max_tokens=60)
    assert len(rows) > 1  # several rows, each with one or more prompt-sharing pairs
    step = dpo_step(policy, cfg, reference_fn(policy, ref))
    with torch.no_grad():
        sums = [step(row) for row in rows]
        pc, pr = plain_pair_logps(policy, tok)
        rc, rr = plain_pair_logps(ref, tok)
    if loss == "ipo":
        lengths = [torch.tensor([float(sum(x != IGNORE for x in tokenize_prompt_response(tok, p.prompt, getattr(p, side)).labels))
                                 for p in PAIRS]) for side in ("chosen", "rejected")]
        expected, metrics = ipo_loss(pc / lengths[0], pr / lengths[1], rc / lengths[0], rr / lengths[1], beta=0.5)
    else:
        expected, metrics = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=smoothing)
    units = sum(s[1] for s in sums)
    assert units == len(PAIRS)
    assert sum(s[0].item() for s in sums) / units == pytest.approx(expected.mean().item(), abs=1e-5)
    for key in ("rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"):
        assert sum(s[2][key] for s in sums) / units == pytest.approx(metrics[key].item(), abs=1e-5)


def test_lora_reference_is_the_adapter_disabled_base(tok):
    base = tiny_model(seed=0).eval()
    model = add_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter changes the outputs
    row = pack_rows(tokenize_pairs(tok, PAIRS, 512), max_tokens=4096)[0]
    with torch.no_grad():
        ref = reference_fn(model)(row)
        torch.testing.assert_close(ref, group_logprobs(base, row), rtol=0, atol=1e-5)
        assert (group_logprobs(model, row) - ref).abs().max() > 1e-2


def _engine(tmp_path, model, steps=20):
    cfg = TrainConfig(output_dir=str(tmp_path), lr=3e-3, max_steps=steps, warmup_steps=0, schedule="constant",
                      progress=False, weight_decay=0.0)
    return Engine(model, cfg, steps)


def test_overfit_batch_margin_and_accuracy_rise(tok, tmp_path):
    model = tiny_model(seed=0)
    rows = pack_rows(tokenize_pairs(tok, PAIRS, 512), max_tokens=4096)
    engine = _engine(tmp_path, model)  # moves the model to the engine's device
    frozen = copy.deepcopy(engine.model).requires_grad_(False).eval()
    fit(engine, dpo_step(engine.model, DPOConfig(beta=0.1), reference_fn(model, frozen)), lambda epoch: rows)
    log = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert log[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert log[-1]["rewards/margin"] > 0.5 and log[-1]["rewards/accuracy"] == 1.0
    assert log[-1]["loss"] < log[0]["loss"] - 0.1


def test_precomputed_reference_gives_the_live_loss(tok):
    policy, ref = tiny_model(seed=0).eval(), tiny_model(seed=1).eval()
    rows = pack_rows(tokenize_pairs(tok, PAIRS, 512), max_tokens=60)
    cfg = DPOConfig()
    with torch.no_grad():
        live = [dpo_step(policy, cfg, reference_fn(policy, ref))(row)[0] for row in rows]
        precompute_reference(rows, reference_fn(policy, ref), TrainConfig(device="cpu"))
        stored = [dpo_step(policy, cfg)(row)[0] for row in rows]
    torch.testing.assert_close(torch.stack(stored), torch.stack(live), rtol=0, atol=1e-6)


def _run_cfg(tmp_path, name, **kw):
    model = ModelConfig(path=str(tmp_path / "tiny"), lora=kw.pop("lora", None))
    train = TrainConfig(output_dir=str(tmp_path / name), lr=1e-3, max_steps=3, progress=False,
                        max_tokens_per_batch=kw.pop("max_tokens", 80))
    return DPOConfig(model=model, train=train, eval=TrainingEvalConfig(problems=kw.pop("eval", 0), max_new_tokens=4), **kw)


def test_run_precompute_matches_live_reference(tok, tmp_path):
    save_tiny(str(tmp_path / "tiny"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair_record(p)) + "\n" for p in PAIRS))
    results = [run(_run_cfg(tmp_path, f"run{pre}", data=DPODataConfig(path=str(data)), precompute_ref=pre))
               for pre in (False, True)]
    losses = [[r["loss"] for r in read_metrics(tmp_path / f"run{pre}") if "loss" in r] for pre in (False, True)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert results[0]["rewards/margin"] == pytest.approx(results[1]["rewards/margin"], abs=1e-6)


def test_run_builtin_pairs_lora_sft_reference(tmp_path):
    save_tiny(str(tmp_path / "tiny"))
    pairs = PairsConfig(problems=3, sampling=SamplingConfig(n=2, max_new_tokens=4, batch_size=3))
    cfg = _run_cfg(tmp_path, "builtin", lora=LoraConfig(r=4, alpha=8), sft_reference=True, eval=2,
                   max_tokens=4096, data=DPODataConfig(pairs=pairs))
    cfg.reference_train.max_steps = 1
    cfg.reference_train.progress = False
    result = run(cfg)
    assert result["pairs/pairs"] > 0 and (tmp_path / "builtin" / "pairs.jsonl").is_file()
    assert (tmp_path / "builtin" / "reference" / "checkpoints").is_dir()
    assert 0.0 <= result["eval/arithmetic_accuracy"] <= 1.0
    assert (tmp_path / "builtin" / "final" / "config.json").is_file()


def test_overlong_pair_loses_prompt_tokens_first_then_response_tail(tok):
    prompt = (Message("user", "x" * 100),)
    whole = tokenize_group(tok, prompt, ["ab", "abcd"], max_length=512)
    assert [len(r) for r in whole.responses] == [3, 5]  # bytes + end-of-turn; template "\n" after it dropped
    fitted = tokenize_group(tok, prompt, ["ab", "abcd"], max_length=40)
    assert fitted.prompt == whole.prompt[-35:] and fitted.responses == whole.responses
    tight = tokenize_group(tok, prompt, ["ab", "abcd"], max_length=4)
    assert tight.prompt == whole.prompt[-1:] and tight.responses == [whole.responses[0], whole.responses[1][:3]]


def test_nll_weight_adds_the_chosen_per_token_nll():
    from alignkit.algorithms.dpo import pair_loss

    policy = torch.tensor([-2.0, -6.0, -3.0, -1.0])  # chosen, rejected, chosen, rejected
    reference = torch.tensor([-3.0, -5.0, -3.0, -2.0])
    lengths = torch.tensor([2.0, 3.0, 4.0, 1.0])
    base, _ = pair_loss(policy, reference, lengths, DPOConfig(beta=0.5))
    # h = (pc - rc) - (pr - rr): pair 1: (1) - (-1) = 2 -> -log σ(1); pair 2: 0 - 1 = -1 -> -log σ(-0.5)
    assert base.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))])
    rpo, metrics = pair_loss(policy, reference, lengths, DPOConfig(beta=0.5, nll_weight=2.0))
    assert (rpo - base).tolist() == pytest.approx([2.0 * 2.0 / 2, 2.0 * 3.0 / 4])
    assert metrics["nll/chosen"].item() == pytest.approx((1.0 + 0.75) / 2)


def test_pair_answers_prefers_own_correct_and_bare_wrong_numbers():
    problems = [Problem("What is 2 + 3?", "5"), Problem("What is 9 - 4?", "5"), Problem("What is 1 + 1?", "2")]
    said = [(0, "I think it is 7", "stop"), (0, "6", "stop"), (0, "5", "stop"), (0, "5", "length"),
            (1, "4", "stop"), (1, "9 - 4 =", "length"),   # no correct answer: the truncated one is not correct
            (2, "2", "stop")]                             # only correct answers: no rejected, no pair
    completions = [Completion(i, k, text, [], reason) for k, (i, text, reason) in enumerate(said)]
    pairs, stats = pair_answers(problems, completions, PairsConfig(pairs_per_problem=2))
    assert [(p.chosen, p.rejected) for p in pairs] == [("5", "6"), ("5", "I think it is 7"), ("5", "4"), ("5", "9 - 4 =")]
    assert stats["pairs_with_gold_chosen"] == 2 and stats["problems_with_a_correct_sample"] == 2
    assert stats["sample_accuracy"] == pytest.approx(2 / 7)
    own, own_stats = pair_answers(problems, completions, PairsConfig(pairs_per_problem=2, gold_chosen=False))
    assert [(p.chosen, p.rejected) for p in own] == [("5", "6"), ("5", "I think it is 7")]
    assert own_stats["pairs_with_gold_chosen"] == 0
