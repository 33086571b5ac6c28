"""The fused output head (models.forward.FUSED_HEAD, ops.linear_logprobs) against the plain one:
same log-probs and gradients on a tiny model, through SFT's and PPO's paths, full and LoRA."""

from __future__ import annotations

import pytest
import torch

from alignkit.algorithms.ppo.actor_critic import _logprobs
from alignkit.data.chat import Tokenized
from alignkit.data.collate import packed_row
from alignkit.models import forward
from alignkit.models.tiny import tiny_model


def _row() -> dict:
    examples = [Tokenized(list(range(5 + 7 * k, 5 + 7 * k + n)), [-100] * 3 + list(range(8 + 7 * k, 5 + 7 * k + n)))
                for k, n in enumerate([9, 14, 6])]
    return packed_row(examples)


def _both(monkeypatch, run) -> list:
    """run() with the fused head, then with the plain one; checks the fused path was taken."""
    calls = []
    fused_op = forward.linear_logprobs
    monkeypatch.setattr(forward, "linear_logprobs", lambda *a, **k: calls.append(1) or fused_op(*a, **k))
    out = []
    for fused in (True, False):
        monkeypatch.setattr(forward, "FUSED_HEAD", fused)
        out.append(run())
        assert bool(calls) == fused
        calls.clear()
    return out


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sft_logprobs_and_gradients_match_the_plain_head(monkeypatch):
    """Full fine-tuning of a tied-embedding model: the tied [vocab, hidden] weight gets the head's
    gradient and the embedding's summed, both paths alike (fp32, 1e-5)."""
    row = _row()

    def run():
        model = tiny_model(seed=3)
        logps, _ = forward.target_logprobs(model, row)
        (logps * torch.linspace(0.5, 1.5, logps.shape[0])).sum().backward()
        return logps.detach(), _grads(model)

    (fused, fused_grads), (plain, plain_grads) = _both(monkeypatch, run)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and "model.embed_tokens.weight" in fused_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_model_takes_the_fused_path_with_a_frozen_head(monkeypatch):
    from peft import LoraConfig, get_peft_model

    row = _row()

    def run():
        model = get_peft_model(tiny_model(seed=4), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
        logps, _ = forward.target_logprobs(model, row)
        logps.sum().backward()
        return logps.detach(), _grads(model)

    (fused, fused_grads), (plain, plain_grads) = _both(monkeypatch, run)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    assert fused_grads and all("lora_" in n for n in fused_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ppo_response_logprobs_match_the_plain_head(monkeypatch, temperature):
    """PPO's log-probs at the sampling temperature, zero outside the response mask; the entropy
    the rollout logs is the same either way."""
    g = torch.Generator().manual_seed(6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ids = torch.randint(0, 100, mask.shape, generator=g)

    def run():
        model = tiny_model(seed=5)
        hidden = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        logp, ent = _logprobs(model, hidden, {"response_mask": mask, "response_ids": ids}, temperature, entropy=True)
        logp.sum().backward()
        return logp.detach(), ent, hidden.grad, model.lm_head.weight.grad

    (fused, f_ent, f_hidden, f_head), (plain, p_ent, p_hidden, p_head) = _both(monkeypatch, run)
    assert torch.all(fused[mask == 0] == 0)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(f_ent, p_ent)
    torch.testing.assert_close(f_hidden, p_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f_head, p_head, rtol=1e-4, atol=1e-6)
