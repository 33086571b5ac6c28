"""Forward passes that pay only for the tokens that carry a loss.

`target_logprobs` runs the decoder, keeps the hidden states at positions whose *next* token is
a target, and applies the output head there only: no [batch, length, vocab] logits tensor for
prompt or padding tokens. Works for plain HF causal LMs and peft-wrapped ones.
"""

from __future__ import annotations

import torch

from alignkit.data.chat import IGNORE
from alignkit.models.segment_attention import segment_layout, segmented
from alignkit.ops import gather_logprobs, linear_logprobs


def unwrap(model):
    """The underlying transformers causal LM (through a peft wrapper if there is one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


PACKED_SEGMENTS = True
"""Run a packed row of several examples (`data.collate.packed_row`) as a batch of its examples
(`segment_attention`) when that scores fewer (query, key) pairs than the row's dense [L, L] mask;
False: always the dense mask (what benchmarks/sft_vs_trl.py compares against)."""


FUSED_HEAD = True
"""Run the output head and the log-softmax together, a chunk of rows at a time
(`ops.linear_logprobs`), so the [tokens, vocab] logits and their gradient are never held whole;
False: the head's full logits, then `ops.gather_logprobs` (what benchmarks/head_memory.py
compares against)."""


def head_logprobs(lm, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 512,
                  temperature: float = 1.0) -> torch.Tensor:
    """log π(target) [N] at the hidden states [N, H] through the output head of `lm` (a
    transformers causal LM), with logits divided by `temperature`. A plain bias-free linear head
    takes the fused path (`FUSED_HEAD`); any other head (a LoRA-wrapped one) the plain one."""
    head = lm.get_output_embeddings()
    if FUSED_HEAD and type(head) is torch.nn.Linear and head.bias is None:
        return linear_logprobs(hidden, head.weight, targets, chunk_size, temperature)
    logits = head(hidden)
    if temperature != 1.0:
        logits = logits / temperature
    return gather_logprobs(logits, targets, chunk_size=chunk_size)


def decoder_hidden(model, batch: dict) -> torch.Tensor:
    """Last hidden states [B, L, H] of the decoder stack (no output head). A packed row of
    several examples (`segment_ids`, one row, SDPA or eager attention) attends example by
    example: on the built-in SFT mixture (16 examples in a 2,238-token row) the dense mask made
    attention ~40% of a training step on 2 CPU cores, for scores that are all masked but 1/16."""
    lm = unwrap(model)
    decoder = lm.get_decoder()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False}
    segments = batch.get("segment_ids")
    if (PACKED_SEGMENTS and segments is not None and segments.shape[0] == 1 and batch.get("attention_mask") is None
            and decoder.config._attn_implementation in ("sdpa", "eager") and bool(segments[0, -1] > 0)):
        ids = segments[0]
        length = ids.shape[0]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        layout = segment_layout(causal & (ids[:, None] == ids[None, :]), ids)
        if layout.pays:
            with segmented(decoder):
                return decoder(**inputs, segment_layout=layout).last_hidden_state
    return decoder(**inputs, attention_mask=batch.get("attention_mask")).last_hidden_state


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions 0..L-2 whose next token is a target, the target ids there)."""
    nxt = labels[:, 1:]
    mask = nxt != IGNORE
    return mask, nxt[mask]


def target_logprobs(model, batch: dict, chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every target token, flat [N], and the [B, L-1] mask that says where they sit."""
    hidden = decoder_hidden(model, batch)
    mask, targets = target_positions(batch["labels"])
    return head_logprobs(unwrap(model), hidden[:, :-1][mask], targets, chunk_size), mask


def group_visibility(group_ids: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool (query, key) of a prompt-sharing row (data.packing): causal, inside one
    group, and a response sees its prompt and itself but no sibling response. Tokens of group -1
    are a root shared by every group. The one construction of this mask: the segment layout
    (`segment_attention`) and reward scoring start from it."""
    length = group_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=group_ids.device).tril()
    same_group = (group_ids[:, :, None] == group_ids[:, None, :]) | (group_ids[:, None, :] == -1)
    visible = (parts[:, None, :] == 0) | (parts[:, :, None] == parts[:, None, :])
    return (causal & same_group & visible)[:, None]


def group_hidden(decoder, row: dict) -> torch.Tensor:
    """Last hidden states [1, L, H] of a prompt-sharing row (input_ids, position_ids, group_ids,
    parts [1, L]) run through `decoder` (a transformers decoder stack). With SDPA or eager
    attention the row runs as a batch of segments (`segment_attention`) when that scores fewer
    pairs than the dense mask; otherwise the dense mask goes to the attention implementation."""
    implementation = decoder.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"prompt-sharing rows need attn_implementation sdpa or eager, not {implementation!r}")
    visible = group_visibility(row["group_ids"], row["parts"])
    inputs = {"input_ids": row["input_ids"], "position_ids": row["position_ids"], "use_cache": False}
    change = (row["group_ids"][0, 1:] != row["group_ids"][0, :-1]) | (row["parts"][0, 1:] != row["parts"][0, :-1])
    segments = torch.cat([change.new_zeros(1), change]).long().cumsum(0)
    layout = segment_layout(visible[0, 0], segments) if row["input_ids"].shape[0] == 1 else None
    if layout is not None and layout.pays:
        with segmented(decoder):
            return decoder(**inputs, segment_layout=layout).last_hidden_state
    if implementation == "eager":
        visible = torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, torch.finfo(torch.float32).min)
    return decoder(**inputs, attention_mask=visible).last_hidden_state


def group_token_logprobs(model, batch: dict, chunk_size: int = 512) -> torch.Tensor:
    """Log-probs of every target token of a prompt-sharing row (`data.packing.group_row`, batch
    size 1), flat [N] in row order (`batch["segments"]` gives each one's response). The output
    head runs on target positions only."""
    lm = unwrap(model)
    hidden = group_hidden(lm.get_decoder(), batch)
    return head_logprobs(lm, hidden[0, batch["source"]], batch["targets"], chunk_size)


def group_logprobs(model, batch: dict, chunk_size: int = 512) -> torch.Tensor:
    """Summed target log-probs of every response of a prompt-sharing row: a tensor [num_responses]."""
    logps = group_token_logprobs(model, batch, chunk_size)
    total = batch["lengths"].shape[0]
    return torch.zeros(total, dtype=logps.dtype, device=logps.device).index_add(0, batch["segments"], logps)
