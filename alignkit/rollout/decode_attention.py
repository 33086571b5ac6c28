"""Attention for one-token decoding steps, registered with `transformers` as "alignkit_decode".

In a decoding step each row has one query against its own cached keys. PyTorch's CPU
scaled-dot-product kernel handles that shape (grouped-query heads, a few dozen keys, hundreds of
rows) at a fraction of its speed on long queries; two batched matrix products with the query
heads grouped under their key/value head do the same work in less time, and over every layer and
step that is a measurable part of the decoding time (`benchmarks/generator_ab.py --feature
decode-attention`; the figures are in benchmarks/RESULTS.md).

`decode_attention(model)` switches a model using "sdpa" to this function for the duration of a
`with` block; any call that is neither a plain single-query step nor a query against a shared
root (below) (a prefill without one, dropout, soft-capping, attention sinks, position biases)
goes to transformers' SDPA function unchanged, and the attention mask is built exactly as for SDPA.

Shared root. When the prompts of a batch share a prefix (a system prompt, few-shot exemplars),
the generator keeps its keys/values once, [1, KV, P, D], instead of a copy per row: `shared_root`
names, for the duration of a `with` block, the cache whose layers hold such a root
(`root_keys` / `root_values`, None when absent). The cache then returns only each row's own
positions, and the attention adds the root: a single-query step scores every row's queries
against the root in one matrix product and softmaxes over root and row keys together (the same
result as attending to the concatenation), and so does a longer query (the prefill of the
prompts' own parts), so the root is never copied into the rows: copying a long root (few-shot
exemplars) to hundreds of rows and re-reading those copies at every step is a large part of a
sampling pass (`benchmarks/generator_ab.py --feature root-kept-once`).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "alignkit_decode"
_UNUSUAL = ("softcap", "sinks", "s_aux", "position_bias", "cache")
_ROOT_CACHE: ContextVar = ContextVar("alignkit_root_cache", default=None)


@contextmanager
def shared_root(cache):
    """Within the block, attention layers find their shared root in `cache.layers[layer_idx]`."""
    token = _ROOT_CACHE.set(cache)
    try:
        yield
    finally:
        _ROOT_CACHE.reset(token)


def _root_of(module) -> tuple[torch.Tensor, torch.Tensor] | None:
    cache, idx = _ROOT_CACHE.get(), getattr(module, "layer_idx", None)
    if cache is None or idx is None:
        return None
    layer = cache.layers[idx]
    keys = getattr(layer, "root_keys", None)
    return None if keys is None else (keys, layer.root_values)


def single_query_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D], key/value [B, KV, L, D] (H a multiple of KV), mask None, bool
    [B|1, 1, T, P+L] (True = attend; P the shared root's length, 0 without one) or additive
    float; returns ([B, T, H, D], None). Grouped products for a decoding step (T = 1) and for any
    query against a shared root (the prefill of the prompts' own parts); SDPA otherwise."""
    B, H, T, D = query.shape
    KV = key.shape[1]
    root = _root_of(module)
    if (T != 1 and root is None) or dropout or H % KV or any(kwargs.get(k) is not None for k in _UNUSUAL):
        if root is not None:  # attend to root + own positions, concatenated for this call
            key = torch.cat([root[0].expand(B, -1, -1, -1), key], dim=2)
            value = torch.cat([root[1].expand(B, -1, -1, -1), value], dim=2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = D ** -0.5 if scaling is None else scaling
    G = H // KV
    # Query head h uses key/value head h // G, as in transformers' repeat_kv: [B, KV, G*T, D].
    q = query.reshape(B, KV, G * T, D)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale
    if root is not None:
        # Every row's queries against the one copy of the root: [KV, B*G*T, D] x [KV, D, P].
        P = root[0].shape[2]
        rows = q.transpose(0, 1).reshape(KV, B * G * T, D)
        on_root = torch.matmul(rows, root[0][0].transpose(-1, -2)).float() * scale
        scores = torch.cat([on_root.reshape(KV, B, G * T, P).transpose(0, 1), scores], dim=-1)
    if attention_mask is not None:
        scores = scores.view(B, KV, G, T, -1)
        mask = attention_mask.unsqueeze(1)  # [B|1, 1, 1, T, keys]
        if mask.dtype == torch.bool:  # in place: scores is this call's own tensor
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
        scores = scores.view(B, KV, G * T, -1)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if root is None:
        out = torch.matmul(probs, value)
    else:
        own = torch.matmul(probs[..., P:], value)
        from_root = torch.matmul(probs[..., :P].transpose(0, 1).reshape(KV, B * G * T, P), root[1][0])
        out = own + from_root.reshape(KV, B, G * T, D).transpose(0, 1)
    return out.reshape(B, H, T, D).transpose(1, 2), None


AttentionInterface.register(NAME, single_query_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def decode_attention(model):
    """Within the block, a model whose attention is "sdpa" runs `single_query_attention`;
    other implementations (eager, flash, flex) are left alone."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa":
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
