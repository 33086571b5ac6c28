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
~20 x 27 x 52 against 480 x 480 on those rows. Segments of very different sizes (long prompts
with short replies: HH-style conversations) go in separate buckets, each padded to its own
longest segment (`_buckets`). When the buckets would still score nearly as many pairs as the
dense mask, the caller keeps the dense mask (`SegmentLayout.pays`).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

NAME = "alignkit_segments"


@dataclass
class Bucket:
    """Segments batched together: queries [S, Q] and keys [S, K], row positions of each segment's
    queries and of the keys it may see (padded); mask [S, 1, Q, K] bool (True = attend)."""

    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor

    @property
    def scores(self) -> int:
        S, _, Q, K = self.mask.shape
        return S * Q * K


@dataclass
class SegmentLayout:
    """The row's segments in buckets of similar size (`_buckets`), and inverse [L]: for each row
    position, its place in the buckets' flattened query grids, concatenated in bucket order."""

    buckets: list[Bucket]
    inverse: torch.Tensor

    DENSE_SHARE = 0.75
    """The segmented path is taken below this share of the dense mask's scores: the dense path's
    fused SDPA kernel does more per score on long sequences."""

    @property
    def pays(self) -> bool:
        """Clearly fewer (query, key) scores than the dense [L, L] mask."""
        return sum(b.scores for b in self.buckets) < self.DENSE_SHARE * self.inverse.shape[0] ** 2


def _padded(groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(g) for g in groups)
    index = torch.zeros(len(groups), width, dtype=torch.long, device=groups[0].device)
    valid = torch.zeros(len(groups), width, dtype=torch.bool, device=groups[0].device)
    for s, g in enumerate(groups):
        index[s, :len(g)] = g
        valid[s, :len(g)] = True
    return index, valid


MIN_SAVING = 128 * 128
"""A cut into buckets must save at least this many scores (and a tenth of them): each bucket is
more kernel calls per layer."""


def _buckets(q: list[int], k: list[int]) -> list[list[int]]:
    """Segment indices in buckets: padding every segment to the longest costs S x Q x K scores,
    which a long prompt among short replies makes several times what they need. Sorted by query
    length, the segments are cut where the cut saves a tenth of the scores (and MIN_SAVING), again
    and again on the shorter part."""
    order = sorted(range(len(q)), key=lambda s: (-q[s], -k[s]))
    out = []
    while order:
        n = len(order)
        head_k = list(itertools.accumulate((k[s] for s in order), max))  # longest keys of order[:j + 1]
        tail_k = list(itertools.accumulate((k[s] for s in reversed(order)), max))[::-1]  # of order[j:]
        best, cut = n * q[order[0]] * head_k[-1], n
        for j in range(1, n):
            cost = j * q[order[0]] * head_k[j - 1] + (n - j) * q[order[j]] * tail_k[j]
            if cost < 0.9 * best and best - cost >= MIN_SAVING:
                best, cut = cost, j
        out.append(sorted(order[:cut]))  # row order inside a bucket
        order = order[cut:]
    return out


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
    inverse = torch.empty(length, dtype=torch.long, device=visible.device)
    buckets, offset = [], 0
    for members in _buckets([len(x) for x in spans], [len(x) for x in seen]):
        queries, q_valid = _padded([spans[s] for s in members])
        keys, k_valid = _padded([seen[s] for s in members])
        mask = visible[queries[:, :, None], keys[:, None, :]] & q_valid[:, :, None] & k_valid[:, None, :]
        mask[:, :, 0] |= ~q_valid  # padding queries attend to one real key (their output is dropped)
        inverse[queries[q_valid]] = offset + torch.nonzero(q_valid.flatten()).flatten()
        offset += queries.numel()
        buckets.append(Bucket(queries, keys, mask[:, None]))
    return SegmentLayout(buckets, inverse)


SDPA_SCORES = 256 * 256
"""A bucket whose segments score at least this many (query, key) pairs each runs PyTorch's SDPA
kernel, which keeps no [Q, K] probabilities for backward; smaller ones run explicit products,
which beat that kernel at small sizes (20 segments x 27 queries x 52 keys: its backward took
~4x as long on 2 CPU cores)."""


def _bucket_attention(b: Bucket, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                      scale: float) -> torch.Tensor:
    """query [H, L, D], key/value [KV, L, D] -> the bucket's outputs [S * Q, H, D]."""
    H, _, D = query.shape
    KV = key.shape[0]
    S, _, Q, K = b.mask.shape
    G = H // KV
    q = query[:, b.queries].transpose(0, 1)  # [S, H, Q, D]
    k = key[:, b.keys].transpose(0, 1)  # [S, KV, K, D]
    v = value[:, b.keys].transpose(0, 1)
    if Q * K >= SDPA_SCORES:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask, dropout_p=dropout, scale=scale, enable_gqa=G > 1)
        return out.transpose(1, 2).reshape(S * Q, H, D)
    # Query head h uses key/value head h // G (transformers' repeat_kv): group the G heads of a
    # key/value head into one matrix product.
    scores = torch.matmul(q.reshape(S, KV, G * Q, D), k.transpose(-1, -2)).reshape(S, KV, G, Q, K)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale  # softmax in >= fp32
    probs = torch.softmax(scores.masked_fill(~b.mask[:, :, None], float("-inf")), dim=-1).to(value.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.reshape(S, KV, G * Q, K), v).reshape(S, H, Q, D)
    return out.transpose(1, 2).reshape(S * Q, H, D)


def segment_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      segment_layout: SegmentLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, H, L, D], key/value [1, KV, L, D] (H a multiple of KV); returns ([1, L, H, D], None)."""
    if segment_layout is None or query.shape[0] != 1:
        raise ValueError("alignkit_segments attention needs a segment_layout and one packed row")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    outs = [_bucket_attention(b, query[0], key[0], value[0], dropout, scale) for b in segment_layout.buckets]
    return torch.cat(outs)[segment_layout.inverse][None], None


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
