"""Reward models: a causal-LM backbone plus a linear head read at each sequence's last token.

A reward model is a transformers `AutoModelForSequenceClassification` with `num_labels=1`.
Loading a causal-LM directory this way keeps the backbone (`model.model`) and adds a fresh
`score` head, Linear(hidden, 1, bias=False). alignkit never finds the last token by looking for
the pad token (SmolLM2 pads with its end-of-turn token): it runs the backbone, takes each
sequence's last token from the layout of a packed row, and applies the head there only.

Packed rows share prompts (`data.packing`): a *group* is one prompt with its K responses (a
preference pair has K=2). The tokens that the K renderings share from the start (the prompt, and
more when the responses begin alike) appear once (`data.packing.scoring_group`); each response's
remaining tokens attend to that prefix and to their own earlier tokens, with positions
continuing from the prefix, so every response gets exactly the score it would get alone while
the prompt is computed once ("prefill once"). A row holds several groups end to end, each
response whole (`group_row(..., keep_last=True)`: `ends` gives its last token's position).

A saved reward model is a plain HF directory (LoRA merged, `score` head included, tokenizer and
chat template beside it, `config.pad_token_id` set). Plain transformers users score with it so:

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], tokenize=False)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    reward = rm(**enc).logits[0, 0].item()     # raw scalar; torch.sigmoid for a probability

transformers reads the rightmost token that is not the pad token; that is the last token, and
so the same score as alignkit's, whenever the rendered text does not end with the pad token
(ChatML templates end with '<|im_end|>\\n', and '\\n' is no pad token). Batches padded on
either side work the same way. For a template that ends with the pad token, read the head at
the last token yourself: `rm.score(rm.model(**enc).last_hidden_state[0, -1])`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.data.collate import pack_groups
from alignkit.data.packing import group_row, scoring_group
from alignkit.data.records import Message, user_prompt
from alignkit.models.forward import group_hidden, unwrap
from alignkit.precision import resolve_precision
from alignkit.models.load import DTYPES, ModelConfig, ModelError, add_lora, load_pretrained, load_tokenizer, resolve_model_path
from alignkit.rewards.combine import sigmoid


def load_reward_model(cfg: ModelConfig, train: bool = True, seed: int = 0):
    """(model, tokenizer, resolved path). A causal-LM directory gets a new `score` head (seeded);
    a reward-model directory keeps its own. With `cfg.lora` and `train`, the backbone gets a
    LoRA adapter and the head is trained in full, both in float32 (with model.dtype=bfloat16
    only the frozen base is bf16: half the memory, and no per-step weight casts under bf16
    autocast)."""
    from transformers import AutoModelForSequenceClassification

    if cfg.dtype not in DTYPES:
        raise ModelError(f"model.dtype '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    path = resolve_model_path(cfg.path)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(seed)
    model = load_pretrained(AutoModelForSequenceClassification, path, cfg, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora is not None and train:
        model = add_lora(model, cfg.lora, task_type="SEQ_CLS")
        for p in model.parameters():  # adapter and head train in float32 over a base kept in model.dtype
            if p.requires_grad:
                p.data = p.data.float()
    return model, tokenizer, path


def sequence_rewards(model, batch: dict) -> torch.Tensor:
    """Reward of every response in a row of scoring groups (`data.packing.group_row` with
    `keep_last`), float32 [N], in row order.

    The backbone runs once over the row (`forward.group_hidden`: segment by segment when that
    scores fewer pairs than the dense mask); the `score` head only sees each response's last token."""
    rm = unwrap(model)
    hidden = group_hidden(rm.model, batch)
    return rm.score(hidden[0, batch["ends"]]).squeeze(-1).float()


class RewardModel:
    """A trained reward model as a RewardFn: `rm(prompts, responses) -> list[float]`.

    Prompts are user-message texts; each (prompt, response) goes through the chat template.
    Responses to the same prompt share its tokens; groups are packed into padding-free rows of
    at most `max_tokens` tokens and scored without gradient. Returns raw scalars, or σ(r) with
    `probabilities=True` (Llama 2 reads each reward model as a probability before combining
    helpfulness and safety). `precision="bf16"` scores under bf16 autocast ("auto": where native).
    """

    def __init__(self, model, tokenizer, probabilities: bool = False, max_length: int = 1024,
                 max_tokens: int = 2048, precision: str = "fp32"):
        self.model = model
        self.tokenizer = tokenizer
        self.probabilities = probabilities
        self.max_length = max_length
        self.max_tokens = max_tokens
        self.precision = resolve_precision(precision)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu", **kwargs) -> "RewardModel":
        """Load a reward-model directory written by `alignkit rm` (or any one-label
        SequenceClassification model directory)."""
        model, tokenizer, _ = load_reward_model(ModelConfig(path=str(path), dtype=dtype), train=False)
        return cls(model.to(device).eval(), tokenizer, **kwargs)

    def score_conversations(self, prompts: list[tuple[Message, ...]], responses: list[str]) -> list[float]:
        """Rewards for (prompt conversation, response) pairs, in input order."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        by_prompt: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            by_prompt.setdefault(tuple(p), []).append(i)
        items = list(by_prompt.items())
        groups = [scoring_group(self.tokenizer, p, [responses[i] for i in idx], self.max_length) for p, idx in items]
        out = [0.0] * len(prompts)
        device = next(self.model.parameters()).device
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            for row in pack_groups([len(g) for g in groups], self.max_tokens):
                batch = {k: v.to(device) for k, v in group_row([groups[g] for g in row], keep_last=True).items()}
                order = [i for g in row for i in items[g][1]]
                for i, r in zip(order, sequence_rewards(self.model, batch).tolist()):
                    out[i] = r
        return [sigmoid(r) for r in out] if self.probabilities else out

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score_conversations([user_prompt(p) for p in prompts], responses)
