"""The one packer of prompt-sharing rows: a prompt followed by several responses, the prompt
computed once for all of them (DPO's chosen and rejected, RRHF's K candidates, a reward model's
K responses, the train stage's samples, PPO's rollouts).

A *group* is a prompt with its responses. A row holds groups end to end, optionally after a
*root* that every group continues: `[root, prompt_0, resp_0_0, resp_0_1, ..., prompt_1, ...]`.
Each response continues its prompt's positions (`position_ids` restart at the prompt's end for
every response) and may attend to the root, its own prompt and itself only, never to a sibling
response or another group; `models.forward.group_visibility` builds that mask from `group_ids`
(-1 on the root) and `parts` (0 on root and prompts, r + 1 on response r). The first token of
every response is predicted from the last prompt token, so targets carry an explicit `source`
index (the position whose hidden state predicts them) instead of the usual shift by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.data.chat import IGNORE, Tokenized, render_ids, tokenize_prompt_response
from alignkit.data.collate import epoch_permutation, pack_groups
from alignkit.data.records import Message


@dataclass
class Group:
    """Token ids of one prompt and its responses: `prompt + responses[r]` is sequence r.

    `prompt` holds the tokens every response continues (for reward scoring also the responses'
    common start). `labels[r][t]` is the target of response token t (IGNORE where no loss), or
    `labels` is None when the responses carry no targets (a reward model reads them whole)."""

    prompt: list[int]
    responses: list[list[int]]
    labels: list[list[int]] | None = None
    scores: list[float] | None = None  # one per response (RRHF), when the data has them
    truncated: bool = False  # a sequence was cut to fit max_length

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(r) for r in self.responses)


def common_prefix(seqs: list) -> int:
    """Length of the prefix that all sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _fit(prompt: list[int], longest: int, max_length: int) -> tuple[list[int], int]:
    """`prompt` cut from the left until it and the `longest` response fit in `max_length` tokens
    (one prompt token is always kept), and the room left for a response."""
    prompt = prompt[min(max(0, len(prompt) + longest - max_length), max(len(prompt) - 1, 0)):]
    return prompt, max_length - len(prompt)


def tokenize_group(tokenizer, prompt: tuple[Message, ...], responses: list[str], max_length: int,
                   scores: list[float] | None = None) -> Group | None:
    """A group for likelihood training: the prompt with each response, reply tokens the targets.

    A prompt plus its longest response is fitted into `max_length` tokens the way
    `data.chat.truncate` does: prompt tokens go from the left (one is always kept), then
    responses are cut at the right. Returns None when a response would keep no target token."""
    toks = [tokenize_prompt_response(tokenizer, prompt, r) for r in responses]
    first = [next(i for i, t in enumerate(t.labels) if t != IGNORE) for t in toks]
    cut = min(min(first), common_prefix([t.input_ids for t in toks]))
    # Trailing non-target tokens (template whitespace after end-of-turn) predict nothing: drop them.
    ends = [len(t.labels) - next(i for i, x in enumerate(reversed(t.labels)) if x != IGNORE) for t in toks]
    bodies = [t.input_ids[cut:e] for t, e in zip(toks, ends)]
    labels = [t.labels[cut:e] for t, e in zip(toks, ends)]
    longest = max(len(b) for b in bodies)
    head, room = _fit(toks[0].input_ids[:cut], longest, max_length)
    bodies, labels = [b[:room] for b in bodies], [lab[:room] for lab in labels]
    if any(all(x == IGNORE for x in lab) for lab in labels):
        return None
    return Group(head, bodies, labels, scores, truncated=cut + longest > max_length)


def scoring_group(tokenizer, prompt: tuple[Message, ...], responses: list[str], max_length: int) -> Group:
    """A group for a reward model: each prompt + response rendered whole through the chat template
    (a reward model reads the last token of the rendering); the tokens all renderings share from
    the start are the group's prompt, computed once. No targets.

    A sequence longer than `max_length` loses tokens from the left of the shared part (one is
    kept), then from the right of its response (one is kept); the group is marked `truncated`."""
    seqs = [render_ids(tokenizer, prompt + (Message("assistant", r),)) for r in responses]
    n = min(common_prefix(seqs), min(len(s) for s in seqs) - 1)  # every response keeps a token
    longest = max(len(s) for s in seqs) - n
    head, room = _fit(seqs[0][:n], longest, max_length)
    return Group(head, [s[n:][:max(room, 1)] for s in seqs], truncated=n + longest > max_length)


def group_row(groups: list[Group], root: list[int] | tuple = (), keep_last: bool = False) -> dict:
    """One packed row of groups, all tensors batch-first with batch size 1.

    `root`: tokens every group continues (group id -1), placed once at the start of the row; a
    group's prompt then holds only what follows the root (it may be empty). A response's last
    token predicts nothing, so it is not an input, unless `keep_last` (a reward model reads the
    hidden state at each response's last token).

    input_ids, position_ids, group_ids, parts [1, L] (part 0 = prompt, r + 1 = response r);
    source, targets, segments [N]: for every target token, the row position whose hidden state
    predicts it, its id, and its response's index in the row (responses numbered in order);
    lengths [S] float: target tokens per response; n_responses [G]: responses per group;
    ends [S] with `keep_last`: the row position of each response's last token; scores [S] when
    the groups have scores."""
    ids, pos, gids, parts = list(root), list(range(len(root))), [-1] * len(root), [0] * len(root)
    source, targets, segments, lengths, ends = [], [], [], [], []
    for g, group in enumerate(groups):
        ids += group.prompt
        pos += range(len(root), len(root) + len(group.prompt))
        gids += [g] * len(group.prompt)
        parts += [0] * len(group.prompt)
        last_prompt = len(ids) - 1 if group.prompt else len(root) - 1
        start = len(root) + len(group.prompt)  # position id of every response's first token
        for r, body in enumerate(group.responses):
            offset = len(ids)
            inputs = body if keep_last else body[:-1]
            ids += inputs
            pos += range(start, start + len(inputs))
            gids += [g] * len(inputs)
            parts += [r + 1] * len(inputs)
            ends.append(offset + len(body) - 1)
            count = 0
            for t, label in enumerate(group.labels[r] if group.labels is not None else ()):
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
    if keep_last:
        batch["ends"] = torch.tensor(ends, dtype=torch.long)
    if all(g.scores is not None for g in groups):
        batch["scores"] = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float32)
    return batch


def pack_rows(groups: list[Group], max_tokens: int) -> list[dict]:
    """Groups packed into rows of at most `max_tokens` tokens (first-fit decreasing; a longer
    group gets a row alone)."""
    return [group_row([groups[i] for i in r]) for r in pack_groups([len(g) for g in groups], max_tokens)]


def shared_prefix_rows(train: list[Tokenized], max_tokens: int) -> list[dict]:
    """Training examples (`Tokenized`, one target span each) packed into rows that hold the
    prompt prefix ALL examples share (the system prompt and the start of the user turn, for
    templated prompts) once: one group per row whose prompt is that prefix and whose responses
    are the examples' remainders (prompt rest and reply). Every example attends to the prefix
    and to itself only, so the loss and gradient are those of plain packing for fewer tokens.
    Each row also holds `weights` [S]: the examples' weights (1 where None)."""
    first = min(next(i for i, t in enumerate(e.labels) if t != IGNORE) for e in train)
    cut = common_prefix([train[0].input_ids[:first]] + [e.input_ids for e in train[1:]])
    if not cut:
        raise ValueError("the examples share no prompt prefix; use plain packing")
    shared = train[0].input_ids[:cut]
    out = []
    for row in pack_groups([len(e.input_ids) - cut for e in train], max(1, max_tokens - cut)):
        batch = group_row([Group(shared, [train[i].input_ids[cut:] for i in row], [train[i].labels[cut:] for i in row])])
        batch["weights"] = torch.tensor([1.0 if train[i].weight is None else train[i].weight for i in row])
        out.append(batch)
    return out


def prompt_row(prompts: list[list[int]], responses: list[list[int]]) -> tuple[dict, list[int]]:
    """ONE row that holds every token of these (prompt, response) pairs once: the prefix common
    to all prompts as the root, then per distinct prompt its remainder followed by its responses
    (every response token a target). Returns `group_row`'s dict and, for each response in row
    order, the index of its pair."""
    by_prompt: dict[tuple, list[int]] = {}
    for b, prompt in enumerate(prompts):
        by_prompt.setdefault(tuple(prompt), []).append(b)
    distinct = list(by_prompt)
    root = common_prefix(distinct)
    row = group_row([Group(list(p[root:]), [responses[b] for b in rows], [responses[b] for b in rows])
                     for p, rows in by_prompt.items()], distinct[0][:root])
    return row, [b for rows in by_prompt.values() for b in rows]


def shuffled(rows: list[dict], seed: int):
    """A function epoch -> the rows in an order deterministic in (seed, epoch), for engine.fit."""

    def batches(epoch: int) -> list[dict]:
        return [rows[i] for i in epoch_permutation(len(rows), seed, epoch)]

    return batches
