"""Typed records at the edges of alignkit.

Loaders turn user files into these records and validate them once; code past that point
trusts them. All texts are plain strings; conversations are lists of `Message`.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")

# Llama 2's four-level preference rating, strongest first. "unsure" is read as "negligibly better".
RATINGS = ("significantly better", "better", "slightly better", "negligibly better")
RATING_ALIASES = {"unsure": "negligibly better", "negligibly better / unsure": "negligibly better"}

# Llama 2's three safety categories of a preference pair.
SAFETY_LABELS = ("chosen_only_safe", "both_safe", "both_unsafe")


def normalise_rating(word: str) -> str | None:
    """Map a rating word (any case, '_' or ' ') to one of RATINGS; None if unknown."""
    key = " ".join(str(word).strip().lower().replace("_", " ").split())
    key = RATING_ALIASES.get(key, key)
    return key if key in RATINGS else None


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class SFTExample:
    """A conversation whose assistant turns are training targets.

    Single-turn data is [user, assistant] (optionally preceded by a system message).
    """

    messages: tuple[Message, ...]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (conversation ending with a user turn) with a preferred and a rejected reply."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    rating: str | None = None  # one of RATINGS, or None when the data has no rating
    safety: str | None = None  # one of SAFETY_LABELS, or None
    prompt_unsafe: bool | None = None  # the prompt asks for something harmful


@dataclass(frozen=True)
class RankedResponses:
    """K responses to one prompt with scores (higher is better; equal scores are ties)."""

    prompt: tuple[Message, ...]
    responses: tuple[str, ...]
    scores: tuple[float, ...]


@dataclass(frozen=True)
class Problem:
    """A question with a reference answer that a verifier can check."""

    question: str
    answer: str
    id: str = ""
    solution: str = ""  # a worked solution when the source has one (e.g. GSM8K's rationale)


def user_prompt(text: str, system: str | None = None, shots: tuple[Message, ...] = ()) -> tuple[Message, ...]:
    """The prompt conversation for a single user message, after `shots` (worked exemplars:
    user / assistant turns) when given."""
    head = (Message("system", system),) if system else ()
    return head + tuple(shots) + (Message("user", text),)
