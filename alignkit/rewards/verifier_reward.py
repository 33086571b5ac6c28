"""A verifier as a RewardFn: problems with reference answers, looked up by prompt text.

`VerifierReward(problems)` maps every prompt text a problem can be asked with (its question,
and the task's 'answer' and 'cot' prompts, or any texts given by `prompt_fn`) to the problem's
reference answer, and scores a response against it:

* checker "number" (default for numeric answers): `verifiers.extract_answer` + numeric match;
* checker "math": `verifiers.math_equal` (math-verify when installed: fractions, LaTeX...);
* checker "auto": "number" when the reference is a number, else "math".

mode "binary" gives 1/0; mode "graded" gives `verifiers.graded` (1 if correct, up to 0.5 for a
near miss), which is what ReST's increasing thresholds need. A GSM8K answer field
('rationale #### 42') is reduced to its final answer.
"""

from __future__ import annotations

from typing import Callable, Iterable

from alignkit.data.records import Problem
from alignkit.rewards.base import check_batch
from alignkit.rewards.verifiers import graded, gsm8k_final_answer, math_equal, parse_number, verify

MODES = ("binary", "graded")
CHECKERS = ("auto", "number", "math")


def reference_answer(answer: str) -> str:
    """The final answer of a reference: the text after GSM8K's '####' when present."""
    return gsm8k_final_answer(answer) if "####" in answer else answer.strip()


def default_prompts(problem: Problem) -> list[str]:
    """Texts a built-in problem is asked with: the question and the task's two prompt styles."""
    from alignkit.data.tasks.arithmetic import prompt_text

    return [problem.question, prompt_text(problem, "answer"), prompt_text(problem, "cot")]


class VerifierReward:
    """RewardFn over problems: `reward(prompts, responses) -> list[float]`.

    problems: the problems whose prompts will be scored.
    mode: "binary" (1/0) or "graded" (partial credit for near misses, numeric answers only).
    checker: "auto", "number" or "math" (see the module docstring).
    prompt_fn: Problem -> the prompt text(s) it is asked with (default: `default_prompts`).
    """

    def __init__(self, problems: Iterable[Problem], mode: str = "binary", checker: str = "auto",
                 prompt_fn: Callable[[Problem], str | list[str]] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if checker not in CHECKERS:
            raise ValueError(f"checker must be one of {CHECKERS}, not {checker!r}")
        self.mode, self.checker = mode, checker
        self.answers: dict[str, str] = {}
        for p in problems:
            texts = (prompt_fn or default_prompts)(p)
            for text in [texts] if isinstance(texts, str) else texts:
                self.answers[text.strip()] = reference_answer(p.answer)
        if not self.answers:
            raise ValueError("VerifierReward needs at least one problem")

    def with_mode(self, mode: str) -> "VerifierReward":
        """The same problems scored in another mode ("binary" or "graded")."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        other = object.__new__(VerifierReward)
        other.__dict__.update(self.__dict__, mode=mode)
        return other

    def answer_for(self, prompt: str) -> str:
        try:
            return self.answers[prompt.strip()]
        except KeyError:
            raise KeyError(f"VerifierReward has no problem for the prompt {prompt[:80]!r}; build it from the "
                           "problems whose prompts are scored (or pass prompt_fn)") from None

    def score_one(self, response: str, answer: str) -> float:
        checker = self.checker
        if checker == "auto":
            checker = "number" if parse_number(answer) is not None else "math"
        if checker == "math":
            correct = math_equal(response, answer)
            return 1.0 if correct else (0.0 if self.mode == "binary" else graded(response, answer))
        return verify(response, answer) if self.mode == "binary" else graded(response, answer)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        check_batch(prompts, responses)
        return [self.score_one(r, self.answer_for(p)) for p, r in zip(prompts, responses)]

    def __repr__(self) -> str:
        return f"VerifierReward({len(self.answers)} prompts, mode={self.mode}, checker={self.checker})"
