"""Decoding linears through oneDNN (`rollout/packed_linear.py`): the same products as F.linear,
weights as they are when the block starts, everything put back afterwards, only where it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignkit.models.tiny import tiny_model, tiny_tokenizer
from alignkit.rollout import packed_linear
from alignkit.rollout.base import SamplingParams
from alignkit.rollout.hf import HFGenerator
from alignkit.rollout.packed_linear import packed_linears

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="no oneDNN linear path on this machine")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16, bias=False))


def test_same_products_as_f_linear_and_forward_put_back():
    net = _net()
    x = torch.randn(3, 5, 24)  # 3-D input: rows are flattened and the shape restored
    with torch.inference_mode():
        want = net(x)
        with packed_linears(net) as count:
            assert count == 2 and all("forward" in m.__dict__ for m in (net[0], net[2]))
            got = net(x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in net.modules())
    with pytest.raises(ValueError), torch.inference_mode(), packed_linears(net):
        raise ValueError("the block fails")
    assert not any("forward" in m.__dict__ for m in net.modules())  # put back on an error too


def test_each_block_uses_the_weights_as_they_are_then():
    net = _net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.5, fused=True)  # updates in place, no version bump
    x = torch.randn(4, 24)
    with torch.inference_mode(), packed_linears(net):
        before = net(x)
    net(x).square().sum().backward()
    optimizer.step()
    with torch.inference_mode():
        want = net(x)
        with packed_linears(net):
            after = net(x)
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, want, atol=1e-5)


def test_not_applied_under_autocast_or_to_other_dtypes():
    net = _net()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(net) as count:
        assert count == 0
    with torch.inference_mode(), packed_linears(_net().double()) as count:
        assert count == 0


def test_refuses_gradients():
    net = _net()
    with torch.no_grad(), packed_linears(net):
        pass
    with packed_linears(net), pytest.raises(RuntimeError, match="inference"):
        net(torch.randn(2, 24))  # grad enabled: the reordered weights have no gradient path


def test_generator_decodes_through_it_with_the_same_greedy_output(monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_model(0)
    calls = []
    real = packed_linear.packed_forward
    monkeypatch.setattr(packed_linear, "packed_forward", lambda *a: calls.append(1) or real(*a))
    prompts = ["hello there", "what is 2 + 2?"]
    params = SamplingParams(n=2, temperature=0, max_new_tokens=8)
    packed = [c.token_ids for c in HFGenerator(model, tok, batch_size=2).generate(prompts, params)]
    assert calls  # the linears ran through oneDNN
    calls.clear()
    plain = [c.token_ids for c in HFGenerator(model, tok, batch_size=2, pack_linears=False).generate(prompts, params)]
    assert not calls and packed == plain
