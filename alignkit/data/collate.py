"""Batches for training: right padding, or padding-free packing.

Packed rows hold several examples end to end with `position_ids` restarting at 0 for each
example and no attention mask; transformers then builds a block-diagonal causal mask, so no
token attends across examples (tests check the logits equal those of the examples run alone).
The label of token t sits at position t; the loss code shifts by one.
"""

from __future__ import annotations

import torch

from alignkit.data.chat import IGNORE, Tokenized


def pad_batch(examples: list[Tokenized], pad_id: int) -> dict:
    """Right-padded batch with attention_mask; labels are IGNORE on padding. When an example
    carries a `weight`, the batch has per-token `weights` (1 for examples without one)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.weight is not None for e in examples):
        batch["weights"] = torch.tensor([[1.0 if e.weight is None else e.weight] for e in examples]) * mask
    return batch


def pack_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_tokens` tokens (first-fit decreasing).

    Deterministic: ties keep the input order. An example longer than `max_tokens` gets a row alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(r) for r in rows]


def packed_row(examples: list[Tokenized]) -> dict:
    """One row of concatenated examples: input_ids, position_ids, labels and segment_ids (the
    index of the example each token belongs to), all of shape [1, total]; plus per-token
    `weights` when an example carries a `weight`."""
    ids, pos, labels, segs, weights = [], [], [], [], []
    for k, e in enumerate(examples):
        segs.extend([k] * len(e.input_ids))
        weights.extend([1.0 if e.weight is None else e.weight] * len(e.input_ids))
        ids.extend(e.input_ids)
        labels.extend([IGNORE] + e.labels[1:])  # never predict an example's first token from the previous one
        pos.extend(range(len(e.input_ids)))
    row = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "segment_ids": torch.tensor([segs], dtype=torch.long),
    }
    if any(e.weight is not None for e in examples):
        row["weights"] = torch.tensor([weights])
    return row


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of `n` micro-batches (or examples) in `epoch`: a permutation deterministic in
    (seed, epoch), the same for every method that shuffles per epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def epoch_batches_fn(examples: list[Tokenized], pad_id: int, seed: int, packing: bool,
                     batch_size: int, max_tokens: int):
    """A function epoch -> list of micro-batches, deterministic in (seed, epoch).

    Packing: rows are packed once (first-fit decreasing) and their order shuffled per epoch.
    Padding: examples are shuffled per epoch and cut into batches of `batch_size`.
    """
    groups = pack_groups([len(e.input_ids) for e in examples], max_tokens) if packing else None

    def batches(epoch: int) -> list[dict]:
        if groups is not None:
            return [packed_row([examples[i] for i in groups[r]]) for r in epoch_permutation(len(groups), seed, epoch)]
        order = epoch_permutation(len(examples), seed, epoch)
        return [pad_batch([examples[i] for i in order[s: s + batch_size]], pad_id)
                for s in range(0, len(order), batch_size)]

    return batches
