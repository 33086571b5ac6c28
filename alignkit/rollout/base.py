"""The generation protocol: prompts in, completions out, whatever engine runs the model.

Every online method (best-of-N, rejection sampling, RAFT, RFT, ReST-EM, PPO) samples through
`Generator.generate`; the backends are `rollout.hf.HFGenerator` (plain PyTorch) and
`rollout.vllm.VLLMGenerator` (a vLLM engine), and `rollout.backends.make_generator` builds the one
that `SamplingConfig.backend` names. Logprobs returned by a backend are for inspection; training
recomputes them with the policy, so a backend never decides the numbers a loss sees. `SamplingConfig` is the one set of sampling keys that
every command's recipe spells the same way; `SamplingConfig.params` turns it into the
`SamplingParams` of one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from alignkit.config import opt
from alignkit.data.records import Message

FINISH_REASONS = ("stop", "length")
BACKENDS = ("hf", "vllm")


@dataclass
class SamplingParams:
    """How to sample. The same fields mean the same thing in every backend."""

    n: int = 1
    """Completions per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax) decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    max_new_tokens: int = 128
    """Most tokens generated per completion (the eos token counts)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one; the text is cut before it."""
    seed: int | None = None
    """Seed for the sampler: the same seed, prompts and settings give the same completions."""
    logprobs: bool = False
    """Return the log-probability of each generated token (see the backend for its definition)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        else:
            self.stop = tuple(self.stop)
        _check(isinstance(self.n, int) and not isinstance(self.n, bool) and self.n >= 1,
               f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        _check(_is_real(self.temperature) and self.temperature >= 0,
               f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1,
               f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
               f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
               and self.max_new_tokens >= 1,
               f"SamplingParams.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for s in self.stop:
            _check(isinstance(s, str) and s != "",
                   f"SamplingParams.stop must hold non-empty strings, got {s!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
               f"SamplingParams.seed must be an integer or None, got {self.seed!r}")
        self.logprobs = bool(self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SamplingConfig:
    """The sampling keys of every command that samples (one spelling for all of them).
    Commands set their own defaults (e.g. `SamplingConfig(n=8, max_new_tokens=16)`)."""

    n: int = opt(1, "samples per prompt")
    temperature: float = opt(1.0, "softmax temperature (0 = greedy)")
    top_k: int = opt(0, "keep the k most likely tokens (0 = off)")
    top_p: float = opt(1.0, "nucleus sampling mass (1 = off)")
    max_new_tokens: int = opt(128, "most tokens generated per reply")
    batch_size: int = opt(32, "prompts decoded together (their n samples each share one prefill)")
    backend: str = opt("hf", "the engine that samples: hf (alignkit's PyTorch sampler) or vllm (a vLLM engine, "
                             "`pip install alignkit[vllm]`; it starts once per process and takes the trained weights in memory)")

    def __post_init__(self) -> None:
        SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       max_new_tokens=self.max_new_tokens)  # the same checks, when the recipe is read
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        _check(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def params(self, seed: int | None = None, n: int | None = None, temperature: float | None = None) -> SamplingParams:
        """The SamplingParams of one call; `n` and `temperature` replace the configured ones when given."""
        return SamplingParams(n=self.n if n is None else n, top_p=self.top_p, top_k=self.top_k,
                              temperature=self.temperature if temperature is None else temperature,
                              max_new_tokens=self.max_new_tokens, seed=seed)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    prompt_index: int
    """Index of the prompt in the list given to `generate`."""
    sample_index: int
    """0..n-1 among the samples of that prompt."""
    text: str
    """Decoded text without special tokens, cut before a stop string."""
    token_ids: list[int]
    """Generated token ids; ends with the eos id when generation stopped on eos."""
    finish_reason: str
    """"stop" (eos or a stop string) or "length" (max_new_tokens reached)."""
    logprobs: list[float] | None = None
    """Per-token log-probabilities aligned with token_ids, when asked for."""


@runtime_checkable
class Generator(Protocol):
    """Anything that samples completions for already-formatted prompt texts."""

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        """Sample `params.n` completions for each prompt.

        Prompts are final text (chat template already applied, see `chat_prompts`). The result
        is prompt-major: the n samples of prompt 0, then those of prompt 1, and so on.
        """
        ...


def chat_prompts(tokenizer, conversations: Sequence[Sequence[Message]]) -> list[str]:
    """Format conversations (each ending with a user turn) with the tokenizer's chat template,
    followed by the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template or format prompts yourself")
    out = []
    for i, conv in enumerate(conversations):
        messages = []
        for m in conv:
            if isinstance(m, Message):
                messages.append({"role": m.role, "content": m.content})
            elif isinstance(m, dict) and "role" in m and "content" in m:
                messages.append({"role": m["role"], "content": m["content"]})
            else:
                raise TypeError(f"conversation {i}: expected Message items, got {type(m).__name__}")
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The token ids of each prompt text (no special tokens added), every one checked: a list of
    non-empty strings, as every backend's `generate` takes."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    for i, ids in enumerate(encoded):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: there is nothing to condition on")
    return encoded
