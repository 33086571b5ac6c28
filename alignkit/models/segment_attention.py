"""Attention over a packed row as a batch of segments, registered with `transformers` as
"alignkit_segments".

A prompt-sharing row (`data.packing.group_row`) holds a root, prompts and responses end to end;
each token may see only some earlier segments (its own prompt, the root, itself). With a dense
[L, L] mask, SDPA scores every token against every other and throws most scores away: on the
train stage's rows of the built-in arithmetic task (a ~27-token shared prefix and ~19 replies
of ~25 tokens, L ~ 480) attention took a quarter of a training step on 2 CPU cores.

Here a segment is a maximal run of tokens with the same (group, part). Segment s's queries are
batched against the keys its last token may see (a superset of what its earlier tokens see;
the mask restores causality), so the scores computed are sum_s Q_s x K_s instead of L x L:
~20 x 27 x 52 against 480 x 480 on those rows. `segment_layout` returns None when that
batching, padded to the longest segment, would cost more than the dense mask (long prompts
with short responses); the caller then uses the dense mask (`SegmentLayout.pays`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

NAME = "alignkit_segments"


@dataclass
class SegmentLayout:
    """queries [S, Q] and keys [S, K]: row positions of each segment's queries and of the keys
    it may see (padded); mask [S, 1, Q, K] bool (True = attend); inverse [L]: for each row
    position, its place in the flattened [S * Q] query grid."""

    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    inverse: torch.Tensor

    @property
    def pays(self) -> bool:
        """Fewer (query, key) scores than the dense [L, L] mask."""
        S, _, Q, K = self.mask.shape
        return S * Q * K < self.inverse.shape[0] ** 2


def _padded(groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(g) for g in groups)
    index = torch.zeros(len(groups), width, dtype=torch.long, device=groups[0].device)
    valid = torch.zeros(len(groups), width, dtype=torch.bool, device=groups[0].device)
    for s, g in enumerate(groups):
        index[s, :len(g)] = g
        valid[s, :len(g)] = True
    return index, valid


def segment_layout(visible: torch.Tensor, segment_ids: torch.Tensor) -> SegmentLayout:
    """The layout of one row from its [L, L] bool visibility (query, key) and the [L] segment
    index of each position (segments contiguous, numbered in row order, visibility the same for
    all tokens of a segment up to causality)."""
    length = visible.shape[0]
    bounds = torch.cat([torch.tensor([0], device=visible.device),
                        torch.nonzero(segment_ids[1:] != segment_ids[:-1]).flatten() + 1,
                        torch.tensor([length], device=visible.device)]).tolist()
    spans = [torch.arange(a, b, device=visible.device) for a, b in zip(bounds[:-1], bounds[1:])]
    seen = [torch.nonzero(visible[span[-1]]).flatten() for span in spans]
    queries, q_valid = _padded(spans)
    keys, k_valid = _padded(seen)
    mask = visible[queries[:, :, None], keys[:, None, :]] & q_valid[:, :, None] & k_valid[:, None, :]
    mask[:, :, 0] |= ~q_valid  # padding queries attend to one real key (their output is dropped)
    inverse = torch.empty(length, dtype=torch.long, device=visible.device)
    inverse[queries[q_valid]] = torch.nonzero(q_valid.flatten()).flatten()
    return SegmentLayout(queries, keys, mask[:, None], inverse)


def segment_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      segment_layout: SegmentLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, H, L, D], key/value [1, KV, L, D] (H a multiple of KV); returns ([1, L, H, D], None)."""
    if segment_layout is None or query.shape[0] != 1:
        raise ValueError("alignkit_segments attention needs a segment_layout and one packed row")
    lay = segment_layout
    _, H, _, D = query.shape
    KV = key.shape[1]
    S, _, Q, K = lay.mask.shape
    G = H // KV
    # Query head h uses key/value head h // G (transformers' repeat_kv): group the G heads of a
    # key/value head into one matrix product. Explicit products beat PyTorch's CPU SDPA kernel
    # here: at these sizes (20 segments x 27 queries x 52 keys) its backward took ~4x as long.
    q = query[0][:, lay.queries].transpose(0, 1).reshape(S, KV, G * Q, D)
    k = key[0][:, lay.keys].transpose(0, 1)  # [S, KV, K, D]
    v = value[0][:, lay.keys].transpose(0, 1)
    scale = D ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q, k.transpose(-1, -2)).reshape(S, KV, G, Q, K)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale  # softmax in >= fp32
    probs = torch.softmax(scores.masked_fill(~lay.mask[:, :, None], float("-inf")), dim=-1).to(value.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.reshape(S, KV, G * Q, K), v).reshape(S, H, Q, D)
    return out.transpose(1, 2).reshape(S * Q, H, D)[lay.inverse][None], None


def _no_mask(*args, **kwargs):
    return None  # the layout carries the mask


AttentionInterface.register(NAME, segment_attention)
AttentionMaskInterface.register(NAME, _no_mask)


@contextmanager
def segmented(model):
    """Within the block, `model` (a transformers model or decoder) runs `segment_attention`;
    every forward call inside must pass `segment_layout=`."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
