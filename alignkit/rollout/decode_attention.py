"""Attention for one-token decoding steps, registered with `transformers` as "alignkit_decode".

In a decoding step each row has one query against its own cached keys. PyTorch's CPU
scaled-dot-product kernel handles that shape (grouped-query heads, a few dozen keys, hundreds of
rows) at a fraction of its speed on long queries: on the default model (9 query heads over 3
key/value heads, 512 rows, ~55 keys, bf16, 2 cores) one layer took ~5 ms, two batched matrix
products with the query heads grouped under their key/value head take ~2 ms. Over 30 layers
and every step that was a third of the decoding time.

`decode_attention(model)` switches a model using "sdpa" to this function for the duration of a
`with` block; any call that is not a plain single-query step (prefill, dropout, soft-capping,
attention sinks, position biases) goes to transformers' SDPA function unchanged, and the
attention mask is built exactly as for SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "alignkit_decode"
_UNUSUAL = ("softcap", "sinks", "s_aux", "position_bias", "cache")


def single_query_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, 1, D], key/value [B, KV, L, D] (H a multiple of KV), mask None, bool
    [B|1, 1, 1, L] (True = attend) or additive float; returns ([B, 1, H, D], None)."""
    B, H, q_len, D = query.shape
    KV = key.shape[1]
    if q_len != 1 or dropout or H % KV or any(kwargs.get(k) is not None for k in _UNUSUAL):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = D ** -0.5 if scaling is None else scaling
    # Query head h uses key/value head h // (H // KV), as in transformers' repeat_kv.
    scores = torch.matmul(query.reshape(B, KV, H // KV, D), key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(B, 1, H, D), None


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
