"""The single-query decoding attention equals transformers' SDPA path and is used only inside
`decode_attention`, only for one-query steps."""

import os

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from alignkit.models.tiny import tiny_model, tiny_tokenizer
from alignkit.rollout import decode_attention as da
from alignkit.rollout.base import SamplingParams
from alignkit.rollout.hf import HFGenerator


# ALIGNKIT_TEST_DEVICE=cuda runs these tests on a GPU (benchmarks/RESULTS.md, "CUDA checks")
DEVICE = torch.device(os.environ.get("ALIGNKIT_TEST_DEVICE", "cpu"))


class _Module(torch.nn.Module):  # what the attention functions read from the calling layer
    num_key_value_groups = 3
    is_causal = True


def _inputs(dtype, L=7, B=4):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 6, 1, 8, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(B, 2, L, 8, generator=g).to(DEVICE, dtype) for _ in range(2))
    keep = torch.ones(B, 1, 1, L, dtype=torch.bool, device=DEVICE)
    keep[0, ..., :3] = False  # row 0 is left-padded by three positions
    keep[2, ..., :1] = False
    return q, k, v, keep


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_single_query_attention_equals_sdpa(mask_kind, scaling):
    q, k, v, keep = _inputs(torch.float32)
    mask = {"none": None, "bool": keep, "float": torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))}[mask_kind]
    ours, _ = da.single_query_attention(_Module(), q, k, v, mask, scaling=scaling)
    ref, _ = sdpa_attention_forward(_Module(), q, k, v, mask, scaling=scaling)
    assert ours.shape == ref.shape == (4, 1, 6, 8)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    if mask_kind != "none":  # the padded keys carry no weight: changing them changes nothing
        k2 = k.clone()
        k2[0, :, :3] = 1e3
        again, _ = da.single_query_attention(_Module(), q, k2, v, mask, scaling=scaling)
        torch.testing.assert_close(again, ours)


def test_single_query_attention_bf16_close_to_fp32_reference():
    q, k, v, keep = _inputs(torch.bfloat16)
    ours, _ = da.single_query_attention(_Module(), q, k, v, keep)
    ref, _ = sdpa_attention_forward(_Module(), q.float(), k.float(), v.float(), keep)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, rtol=2e-2, atol=2e-2)


def test_longer_queries_go_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(da, "sdpa_attention_forward", lambda *a, **kw: calls.append(a[1].shape) or ("sdpa", None))
    q, k, v, keep = _inputs(torch.float32)
    assert da.single_query_attention(_Module(), torch.cat([q, q], 2), k, v, None)[0] == "sdpa"
    assert da.single_query_attention(_Module(), q, k, v, keep, dropout=0.1)[0] == "sdpa"
    assert da.single_query_attention(_Module(), q, k, v, keep, softcap=30.0)[0] == "sdpa"
    assert len(calls) == 3


def test_generator_decodes_through_it_and_restores_the_model(monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_model(0).to(DEVICE)
    queries = []
    real = da.single_query_attention
    monkeypatch.setitem(da.AttentionInterface._global_mapping, da.NAME,
                        lambda m, q, *a, **kw: queries.append(q.shape[2]) or real(m, q, *a, **kw))
    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    HFGenerator(model, tok).generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=0))
    assert queries and set(queries) <= {1, len(tok(prompts[0])["input_ids"])}
    assert queries.count(1) >= 2 * model.config.num_hidden_layers  # decoding steps ran through it
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"  # other implementations are left alone
    with da.decode_attention(model):
        assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("q_len,causal,additive", [(1, False, False), (3, False, False), (3, True, False), (4, True, True)])
def test_shared_root_kept_once_equals_attending_to_the_concatenation(q_len, causal, additive):
    """A root of 5 positions held once ([1, KV, 5, D]) plus each row's own 7 positions gives what
    attending to the root copied into every row gives, for a decoding step and for a prefill
    (its queries the last q_len own positions, causal, left-padded rows; bool or additive mask)."""
    q, k, v, keep = _inputs(torch.float32)
    q = torch.randn(4, 6, q_len, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    g = torch.Generator().manual_seed(2)
    root_k, root_v = (torch.randn(1, 2, 5, 8, generator=g).to(DEVICE) for _ in range(2))
    full_k, full_v = torch.cat([root_k.expand(4, -1, -1, -1), k], 2), torch.cat([root_v.expand(4, -1, -1, -1), v], 2)
    mask = torch.cat([torch.ones(4, 1, q_len, 5, dtype=torch.bool, device=DEVICE), keep.expand(-1, -1, q_len, -1)], dim=-1)
    if causal:  # query i (own position 7 - q_len + i) sees own positions up to its own
        mask = mask & (torch.arange(12, device=DEVICE) <= torch.arange(12 - q_len, 12, device=DEVICE)[:, None])
    if additive:
        mask = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf"))

    class Layer:
        root_keys, root_values = root_k, root_v

    class Cache:
        layers = [None, Layer()]

    module = _Module()
    module.layer_idx = 1
    ref, _ = sdpa_attention_forward(module, q, full_k, full_v, mask)
    with da.shared_root(Cache()):
        ours, _ = da.single_query_attention(module, q, k, v, mask)
    assert ours.shape == ref.shape == (4, q_len, 6, 8)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    module.layer_idx = 0  # a layer without a root attends to its own keys only
    with da.shared_root(Cache()):
        plain, _ = da.single_query_attention(module, q, k, v, mask[..., 5:])
    torch.testing.assert_close(plain, sdpa_attention_forward(module, q, k, v, mask[..., 5:])[0], rtol=1e-5, atol=1e-6)
