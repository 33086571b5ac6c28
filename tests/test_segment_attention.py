"""Segment-batched attention over prompt-sharing rows: the same hidden states and gradients as
the dense visibility mask, the layout on a hand example, and the dense fallback when batching
segments would cost more."""

from __future__ import annotations

import torch

from alignkit.data.packing import Group, group_row
from alignkit.models.forward import group_hidden, group_visibility
from alignkit.models.segment_attention import segment_layout
from alignkit.models.tiny import tiny_model


def _segments(row: dict) -> torch.Tensor:
    gid, part = row["group_ids"][0], row["parts"][0]
    change = (gid[1:] != gid[:-1]) | (part[1:] != part[:-1])
    return torch.cat([change.new_zeros(1), change]).long().cumsum(0)


def _row() -> dict:
    """A root, six groups (one with no prompt of its own) of one to three replies each."""
    groups = []
    for g in range(6):
        replies = [[40 + 10 * g + r + t for t in range(2 + (g + r) % 3)] for r in range(1 + g % 3)]
        groups.append(Group([] if g == 2 else [30 + g, 31 + g], replies, replies))
    return group_row(groups, root=[10, 11, 12, 13])


def _assert_segments_equal_dense(row: dict) -> None:
    """group_hidden on `row` gives the dense visibility mask's hidden states and gradients."""
    visible = group_visibility(row["group_ids"], row["parts"])
    results = []
    for dense in (False, True):
        model = tiny_model(3).double()  # float64: the two orders of summation agree to ~1e-12
        decoder = model.get_decoder()
        if dense:
            hidden = decoder(input_ids=row["input_ids"], position_ids=row["position_ids"],
                             attention_mask=visible, use_cache=False).last_hidden_state
        else:
            hidden = group_hidden(decoder, row)
        (hidden * torch.linspace(-1, 1, hidden.shape[-1], dtype=torch.float64)).sum().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (h_seg, g_seg), (h_dense, g_dense) = results
    torch.testing.assert_close(h_seg, h_dense, rtol=1e-10, atol=1e-10)
    assert g_seg.keys() == g_dense.keys() and len(g_seg) > 0
    for name in g_seg:
        torch.testing.assert_close(g_seg[name], g_dense[name], rtol=1e-9, atol=1e-10)


def test_layout_hand_example():
    # root [0, 1] | group 0: prompt [2], reply [3, 4] | group 1: reply [5]
    groups = [Group([7], [[8, 9, 1]], [[8, 9, 1]]), Group([], [[6, 1]], [[6, 1]])]
    row = group_row(groups, root=[3, 4])
    assert row["input_ids"].tolist() == [[3, 4, 7, 8, 9, 6]]
    visible = group_visibility(row["group_ids"], row["parts"])[0, 0]
    layout = segment_layout(visible, _segments(row))
    # segments: root (0, 1), prompt (2), reply (3, 4), reply (5); padded to 2 queries, one bucket
    # (cutting it would save fewer than MIN_SAVING scores)
    (bucket,) = layout.buckets
    assert bucket.queries.tolist() == [[0, 1], [2, 0], [3, 4], [5, 0]]
    # keys seen by each segment's last token: the root; root + prompt; root + prompt + reply; root + own reply
    assert bucket.keys.tolist() == [[0, 1, 0, 0, 0], [0, 1, 2, 0, 0], [0, 1, 2, 3, 4], [0, 1, 5, 0, 0]]
    T, F = True, False
    assert bucket.mask[0, 0].tolist() == [[T, F, F, F, F], [T, T, F, F, F]]
    assert bucket.mask[1, 0].tolist() == [[T, T, T, F, F], [T, F, F, F, F]]  # padding query: key 0 only
    assert bucket.mask[2, 0].tolist() == [[T, T, T, T, F], [T, T, T, T, T]]
    assert bucket.mask[3, 0].tolist() == [[T, T, T, F, F], [T, F, F, F, F]]
    assert layout.inverse.tolist() == [0, 1, 2, 4, 5, 6]
    assert not layout.pays  # 4 x 2 x 5 scores > 0.75 x 6 x 6


def test_buckets_cut_long_segments_from_short_ones():
    from alignkit.models.segment_attention import _buckets

    # two 300-token prompts, four 4-token replies that see their prompt: one bucket would score
    # 6 x 300 x 304; cut: 2 x 300 x 300 + 4 x 4 x 304
    assert _buckets([300, 4, 4, 300, 4, 4], [300, 304, 304, 300, 304, 304]) == [[0, 3], [1, 2, 4, 5]]
    # similar sizes: no cut saves a tenth
    assert _buckets([60, 64, 58, 62], [60, 64, 58, 62]) == [[0, 1, 2, 3]]
    # three sizes: cut twice
    assert _buckets([400, 150, 150, 10], [400, 150, 150, 160]) == [[0], [1, 2], [3]]


def test_segments_equal_the_dense_mask_in_values_and_gradients():
    row = _row()
    visible = group_visibility(row["group_ids"], row["parts"])
    assert segment_layout(visible[0, 0], _segments(row)).pays  # the segmented path is the one tested
    _assert_segments_equal_dense(row)


def test_a_costlier_batching_falls_back_to_the_dense_mask():
    # one long prompt, one short reply: 30 x 30 + 3 x 33 scores > 0.75 x 33 x 33
    prompt = list(range(20, 50))
    row = group_row([Group(prompt, [[60, 61, 62]], [[60, 61, 62]])])
    visible = group_visibility(row["group_ids"], row["parts"])
    assert not segment_layout(visible[0, 0], _segments(row)).pays
    model = tiny_model(1).eval()
    with torch.no_grad():
        hidden = group_hidden(model.get_decoder(), row)
        alone = model.get_decoder()(input_ids=torch.tensor([prompt + [60, 61]])).last_hidden_state
    torch.testing.assert_close(hidden, alone, rtol=1e-5, atol=1e-5)


def test_long_prompts_with_short_replies_run_in_buckets_equal_to_the_dense_mask():
    """HH-style rows (two groups of a 300-token prompt and two 4-token replies): the prompts run
    as one bucket through SDPA (segment_attention.SDPA_SCORES), the replies as another through
    explicit products; the same hidden states and gradients as the dense mask (float64)."""
    from alignkit.models import segment_attention

    groups = [Group([20 + (7 * t + g) % 200 for t in range(300)], [[5, 6, 7, 8], [9, 10, 11, 12]], [[5, 6, 7, 8], [9, 10, 11, 12]])
              for g in range(2)]
    row = group_row(groups)
    visible = group_visibility(row["group_ids"], row["parts"])
    layout = segment_layout(visible[0, 0], _segments(row))
    assert layout.pays and [b.mask.shape[0] for b in layout.buckets] == [2, 4]
    assert layout.buckets[0].mask.shape[2] * layout.buckets[0].mask.shape[3] >= segment_attention.SDPA_SCORES
    _assert_segments_equal_dense(row)


def test_a_packed_row_of_examples_gives_the_dense_masks_logprobs_and_gradients(monkeypatch):
    """SFT's packed rows (data.collate.packed_row) attend example by example: the same target
    log-probs and gradients as the dense block-diagonal path (fp32, within 1e-5), and the same as
    each example run alone."""
    from alignkit.data.chat import Tokenized
    from alignkit.data.collate import packed_row
    from alignkit.models import forward

    examples = [Tokenized(list(range(5 + 7 * k, 5 + 7 * k + n)), [-100] * 3 + list(range(8 + 7 * k, 5 + 7 * k + n)))
                for k, n in enumerate([9, 14, 6, 11, 17])]
    row = packed_row(examples)
    results = []
    for segmented_rows in (True, False):
        monkeypatch.setattr(forward, "PACKED_SEGMENTS", segmented_rows)
        model = tiny_model(seed=3)
        logps, _ = forward.target_logprobs(model, row)
        logps.sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast, fast_grads), (dense, dense_grads) = results
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    model = tiny_model(seed=3)
    alone = torch.cat([forward.target_logprobs(model, packed_row([e]))[0] for e in examples]).detach()
    torch.testing.assert_close(fast, alone, rtol=1e-5, atol=1e-5)


def test_a_packed_row_uses_the_segment_layout_only_when_it_pays(monkeypatch):
    from alignkit.data.chat import Tokenized
    from alignkit.data.collate import packed_row
    from alignkit.models import forward

    calls = []
    real = forward.segmented
    monkeypatch.setattr(forward, "segmented", lambda decoder: calls.append(1) or real(decoder))
    model = tiny_model(seed=3)
    many = packed_row([Tokenized([5 + k, 6, 7, 8], [-100, 6, 7, 8]) for k in range(6)])
    forward.target_logprobs(model, many)
    assert calls == [1]
    one = packed_row([Tokenized([5, 6, 7, 8], [-100, 6, 7, 8])])  # a single example: the dense path
    forward.target_logprobs(model, one)
    assert calls == [1]
