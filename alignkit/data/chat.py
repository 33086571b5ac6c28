"""Chat formatting: conversations -> token ids with labels on assistant tokens only.

The tokenizer's own chat template renders the text. Assistant spans are found by rendering
growing prefixes of the conversation: the tokens between "prompt up to turn i with the
generation prompt" and "conversation up to turn i" are turn i's reply (its end-of-turn token
included, so the model learns to stop; whitespace the template adds after it is not a target).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.data.records import Message

IGNORE = -100


class ChatTemplateError(ValueError):
    """The tokenizer's chat template does not render conversations prefix-consistently."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    weight: float | None = None  # per-example loss weight (ReST-EM's reward); None = 1

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _as_dicts(messages) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(tokenizer, messages) -> str:
    """The prompt as text, ending with the assistant header (what a generator continues)."""
    return tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=True)


def tokenize_conversation(tokenizer, messages: tuple[Message, ...], targets: str = "all") -> Tokenized:
    """Token ids and labels for a conversation; `targets` is 'all' assistant turns or only the 'last'."""
    if targets not in ("all", "last"):
        raise ValueError(f"targets must be 'all' or 'last', not {targets!r}")
    full = render_ids(tokenizer, messages)
    labels = [IGNORE] * len(full)
    turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if targets == "last":
        turns = turns[-1:]
    eos = tokenizer.eos_token_id
    for i in turns:
        start = len(render_ids(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render_ids(tokenizer, messages[: i + 1]))
        if full[:end] != render_ids(tokenizer, messages[: i + 1]) or start > end:
            raise ChatTemplateError("the chat template does not render conversations prefix-consistently; "
                                    "alignkit cannot locate the assistant tokens")
        span = full[start:end]
        if eos in span:  # stop the target at the end-of-turn token
            end = start + len(span) - span[::-1].index(eos)
        labels[start:end] = full[start:end]
    return Tokenized(full, labels)


def tokenize_prompt_response(tokenizer, prompt: tuple[Message, ...], response: str) -> Tokenized:
    """A prompt conversation followed by one assistant reply, with the reply as the only target."""
    return tokenize_conversation(tokenizer, prompt + (Message("assistant", response),), targets="last")


def truncate(example: Tokenized, max_length: int, min_target_tokens: int = 1) -> Tokenized | None:
    """Fit an example into `max_length` tokens.

    Policy: first drop prompt tokens from the left (the start of a long context matters least),
    keeping the first target token's context; then cut the response at the right. Returns None
    when fewer than `min_target_tokens` targets would survive (the caller counts and reports it).
    """
    n = len(example.input_ids)
    if n <= max_length:
        return example
    first = next((i for i, t in enumerate(example.labels) if t != IGNORE), n)
    drop_left = min(n - max_length, max(first - 1, 0))
    ids, labels = example.input_ids[drop_left:], example.labels[drop_left:]
    ids, labels = ids[:max_length], labels[:max_length]
    kept = Tokenized(ids, labels)
    return kept if kept.n_targets >= min_target_tokens else None
