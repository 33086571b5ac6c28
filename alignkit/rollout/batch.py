"""Rollouts as training tensors: left-padded prompts followed by right-padded responses.

Row b of a batch of prompts p_b (P_b tokens) and responses r_b (T_b >= 1 tokens), with
P = max P_b and T = max T_b, is

    input_ids[b]      = [pad] * (P - P_b) + p_b + r_b + [pad] * (T - T_b)      # [B, P + T]
    attention_mask[b] = 0 on padding, 1 on prompt and response tokens
    position_ids[b]   = 0, 1, ... counted over the real tokens only
    response_ids[b]   = r_b + [pad] * (T - T_b)                                 # [B, T]
    response_mask[b]  = 1 on the T_b response tokens                            # [B, T]

so every response starts in column P for every row: the logits (and critic values) for
response token j of any row sit at column P - 1 + j, and per-token tensors are plain [B, T]
slices, right-padded as the PPO losses expect. `prompt_width` (= P) travels with the batch.
Extra per-token ([B, T]) and per-sequence ([B]) tensors added to the dict (old log-probs,
advantages, rewards...) follow the rows through `select_rows`.
"""

from __future__ import annotations

import torch

from alignkit.data.packing import prompt_row

INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def assemble(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict:
    """The tensor batch for aligned lists of prompt and response token ids (see module doc)."""
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(f"need as many prompts as responses (>0), got {len(prompt_ids)} and {len(response_ids)}")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p or not r:
            raise ValueError(f"row {i}: empty {'prompt' if not p else 'response'}")
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    T = max(len(r) for r in response_ids)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + T), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        ids[b, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, P - len(p):P + len(r)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp_(min=0),
        "response_ids": ids[:, P:].clone(),
        "response_mask": mask[:, P:].float(),
        "prompt_width": P,
    }


def select_rows(batch: dict, rows: list[int] | torch.Tensor) -> dict:
    """The sub-batch of `rows`, with columns that are padding in every selected row cut away
    (left prompt padding and right response padding)."""
    index = torch.as_tensor(rows, dtype=torch.long)
    B, T, P = batch["response_ids"].shape[0], batch["response_ids"].shape[1], batch["prompt_width"]
    mask = batch["attention_mask"].index_select(0, index)
    prompt_len = mask[:, :P].sum(1)
    response_len = mask[:, P:].sum(1)
    new_p, new_t = int(prompt_len.max()), int(response_len.max())
    out = {"prompt_width": new_p}
    for key, value in batch.items():
        if key == "prompt_width":
            continue
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != B:
            out[key] = value
            continue
        value = value.index_select(0, index)
        if key in INPUT_KEYS:
            value = value[:, P - new_p:P + new_t]
        elif value.dim() >= 2 and value.shape[1] == T:
            value = value[:, :new_t]
        out[key] = value
    return out


def shared_prefix_row(batch: dict) -> dict:
    """The rows of `batch` as ONE padding-free row [1, L] (`data.packing.prompt_row`) that holds
    every token once: the prefix common to all prompts (the root), then per distinct prompt its
    remainder followed by its responses. With `models.forward.group_visibility` every token
    sees exactly what it sees in its own padded row, so hidden states are those of the padded
    layout, without padding and without recomputing a prompt (or a system prompt) that several
    rows share.

    Returns group_row's input_ids, position_ids, group_ids, parts ([1, L]) and `index` [B, T]: the
    position in the row of the hidden state that predicts response token j of row b (0 on padding)."""
    P = batch["prompt_width"]
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    prompts = [ids[b, :P][mask[b, :P]].tolist() for b in range(ids.shape[0])]
    responses = [ids[b, P:][mask[b, P:]].tolist() for b in range(ids.shape[0])]
    row, order = prompt_row(prompts, responses)  # order: the batch row of each response, in row order
    index = torch.zeros(batch["response_ids"].shape, dtype=torch.long)
    lengths = torch.tensor([len(responses[b]) for b in order])
    column = torch.arange(len(row["source"])) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    index[torch.tensor(order).repeat_interleave(lengths), column] = row["source"]
    return {key: row[key] for key in ("input_ids", "position_ids", "group_ids", "parts")} | {"index": index}
