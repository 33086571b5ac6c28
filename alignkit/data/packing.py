"""Prompt-sharing packed rows: one prompt followed by several responses (DPO's chosen and
rejected, RRHF's K candidates), the prompt prefilled once for all of them.

A row holds groups end to end: `[prompt_0, resp_0_0, resp_0_1, ..., prompt_1, resp_1_0, ...]`.
Each response continues its prompt's positions (`position_ids` restart at the prompt length for
every response) and may attend to its own prompt and to itself only, never to a sibling
response or another group; `models.forward.group_logprobs` builds that mask from `group_ids`
and `parts`. The first token of every response is predicted from the last prompt token, so
targets carry an explicit `source` index (the position whose hidden state predicts them)
instead of the usual shift by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.chat import IGNORE, tokenize_prompt_response
from alignkit.data.collate import pack_groups
from alignkit.data.records import Message


@dataclass
class Group:
    """Token ids of one prompt and its responses; `labels[r][t]` is IGNORE where no loss."""

    prompt: list[int]
    responses: list[list[int]]
    labels: list[list[int]]
    scores: list[float] | None = None  # one per response (RRHF), when the data has them

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(r) for r in self.responses)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def tokenize_group(tokenizer, prompt: tuple[Message, ...], responses: list[str], max_length: int,
                   scores: list[float] | None = None) -> Group | None:
    """Tokenize a prompt with each response (reply tokens are the targets) and split off the
    shared prompt. A prompt plus its longest response is fitted into `max_length` tokens the
    way `data.chat.truncate` does: prompt tokens go from the left (one is always kept), then
    responses are cut at the right. Returns None when a response would keep no target token."""
    toks = [tokenize_prompt_response(tokenizer, prompt, r) for r in responses]
    first = [next(i for i, t in enumerate(t.labels) if t != IGNORE) for t in toks]
    cut = min(min(first), _common_prefix([t.input_ids for t in toks]))
    head = toks[0].input_ids[:cut]
    # Trailing non-target tokens (template whitespace after end-of-turn) predict nothing: drop them.
    ends = [len(t.labels) - next(i for i, x in enumerate(reversed(t.labels)) if x != IGNORE) for t in toks]
    bodies = [t.input_ids[cut:e] for t, e in zip(toks, ends)]
    labels = [t.labels[cut:e] for t, e in zip(toks, ends)]
    longest = max(len(b) for b in bodies)
    drop = min(max(0, len(head) + longest - max_length), len(head) - 1)
    head = head[drop:]
    room = max_length - len(head)
    bodies, labels = [b[:room] for b in bodies], [lab[:room] for lab in labels]
    if any(all(x == IGNORE for x in lab) for lab in labels):
        return None
    return Group(head, bodies, labels, scores)


def group_row(groups: list[Group], root: list[int] | tuple = ()) -> dict:
    """One packed row of groups, all tensors batch-first with batch size 1.

    `root`: tokens every group continues (group id -1), placed once at the start of the row; a
    group's prompt then holds only what follows the root (it may be empty). A response's last
    token is a target but predicts nothing, so it is not an input.

    input_ids, position_ids, group_ids, parts [1, L] (part 0 = prompt, r + 1 = response r);
    source, targets, segments [N]: for every target token, the row position whose hidden state
    predicts it, its id, and its response's index in the row (responses numbered in order);
    lengths [S] float: target tokens per response; n_responses [G]: responses per group;
    scores [S] when the groups have scores."""
    ids, pos, gids, parts = list(root), list(range(len(root))), [-1] * len(root), [0] * len(root)
    source, targets, segments, lengths = [], [], [], []
    for g, group in enumerate(groups):
        ids += group.prompt
        pos += range(len(root), len(root) + len(group.prompt))
        gids += [g] * len(group.prompt)
        parts += [0] * len(group.prompt)
        last_prompt = len(ids) - 1 if group.prompt else len(root) - 1
        start = len(root) + len(group.prompt)  # position id of every response's first token
        for r, (body, labels) in enumerate(zip(group.responses, group.labels)):
            offset = len(ids)
            ids += body[:-1]
            pos += range(start, start + len(body) - 1)
            gids += [g] * (len(body) - 1)
            parts += [r + 1] * (len(body) - 1)
            count = 0
            for t, label in enumerate(labels):
                if label != IGNORE:
                    source.append(offset + t - 1 if t else last_prompt)
                    targets.append(label)
                    segments.append(len(lengths))
                    count += 1
            lengths.append(float(count))
    row = lambda x: torch.tensor([x], dtype=torch.long)
    batch = {
        "input_ids": row(ids), "position_ids": row(pos), "group_ids": row(gids), "parts": row(parts),
        "source": torch.tensor(source, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
        "segments": torch.tensor(segments, dtype=torch.long), "lengths": torch.tensor(lengths),
        "n_responses": torch.tensor([len(g.responses) for g in groups], dtype=torch.long),
    }
    if all(g.scores is not None for g in groups):
        batch["scores"] = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float32)
    return batch


def pack_rows(groups: list[Group], max_tokens: int) -> list[dict]:
    """Groups packed into rows of at most `max_tokens` tokens (first-fit decreasing; a longer
    group gets a row alone)."""
    return [group_row([groups[i] for i in r]) for r in pack_groups([len(g) for g in groups], max_tokens)]


def shuffled(rows: list[dict], seed: int):
    """A function epoch -> the rows in an order deterministic in (seed, epoch), for engine.fit."""

    def batches(epoch: int) -> list[dict]:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]

    return batches
