"""Arithmetic word problems with exact integer answers (the testbed for RFT, ReST-EM, PPO).

A problem is a left-to-right chain `a op b op c ...`. Its split ("train" or "heldout") is a
pure function of the equation (a hash of its canonical text), so the two splits never share
an equation, whatever the seed, template or config that produced them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from alignkit.data.records import Problem

OPS = ("+", "-", "*")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20  # share of all equations that belong to the held-out split
STYLES = ("answer", "cot")

NAMES = ("Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Tom")


@dataclass
class ArithmeticConfig:
    """Difficulty knobs of the generator."""

    min_digits: int = 2  # fewest digits of an operand
    max_digits: int = 2  # most digits of an operand
    ops: tuple[str, ...] = ("+", "-")  # operators to draw from: any of "+", "-", "*"
    n_operands: int = 2  # numbers in the chain
    word_problems: bool = True  # a short story; False gives "What is 47 + 38?"
    allow_negative: bool = True  # allow negative intermediate and final results

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops}")
        if self.n_operands < 2:
            raise ValueError(f"n_operands must be at least 2, got {self.n_operands}")


@dataclass(frozen=True)
class _Story:
    """Sentences of one word-problem theme; {name} and {n} are filled in."""

    start: str
    add: str
    sub: str
    mul: str
    question: str
    signed: bool  # negative amounts make sense (a balance, a score, a temperature)


STORIES = (
    _Story(
        "{name} has {n} apples.",
        "{name} picks {n} more apples.",
        "{name} gives {n} apples to a friend.",
        "{name}'s pile of apples then grows to {n} times its size.",
        "How many apples does {name} have now?",
        signed=False,
    ),
    _Story(
        "A library shelf holds {n} books.",
        "The librarian adds {n} more books.",
        "Readers borrow {n} books.",
        "A donation makes the collection {n} times as large.",
        "How many books are on the shelf now?",
        signed=False,
    ),
    _Story(
        "{name} drives {n} km north.",
        "Then {name} drives {n} km further north.",
        "Then {name} drives {n} km back south.",
        "Then {name} keeps going north until the distance from the start is {n} times as large.",
        "How many km north of the start is {name} now?",
        signed=False,
    ),
    _Story(
        "{name} collects {n} marbles.",
        "A friend gives {name} {n} more marbles.",
        "{name} loses {n} marbles.",
        "{name}'s collection then grows to {n} times its size.",
        "How many marbles does {name} have now?",
        signed=False,
    ),
    _Story(
        "{name}'s bank account holds {n} dollars.",
        "{name} deposits {n} dollars.",
        "{name} pays a bill of {n} dollars.",
        "A lucky investment makes the balance {n} times as large.",
        "What is the balance of {name}'s account now, in dollars?",
        signed=True,
    ),
    _Story(
        "{name} has a score of {n} points.",
        "{name} wins {n} points.",
        "{name} loses {n} points as a penalty.",
        "A bonus multiplies {name}'s score by {n}.",
        "What is {name}'s score now?",
        signed=True,
    ),
    _Story(
        "The temperature at dawn is {n} degrees.",
        "By noon it rises by {n} degrees.",
        "By night it falls by {n} degrees.",
        "A strange day makes the reading {n} times as large.",
        "What is the temperature reading now, in degrees?",
        signed=True,
    ),
)


def apply_op(op: str, x: int, y: int) -> int:
    """x op y for one of OPS."""
    return x + y if op == "+" else x - y if op == "-" else x * y


def expression(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    """Infix text that reads left to right; a product of a sum or difference gets parentheses."""
    text = str(operands[0])
    for i, (op, y) in enumerate(zip(ops, operands[1:])):
        if op == "*" and i > 0 and ops[i - 1] != "*":
            text = f"({text})"
        text = f"{text} {op} {y}"
    return text


def split_of(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    """The split an equation belongs to, from a hash of its canonical text."""
    digest = hashlib.sha256(expression(operands, ops).encode()).hexdigest()
    return "heldout" if int(digest[:8], 16) % 100 < HELDOUT_PERCENT else "train"


def _operand(rng: random.Random, cfg: ArithmeticConfig) -> int:
    digits = rng.randint(cfg.min_digits, cfg.max_digits)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 1, 10**digits - 1)


def _word_problem(rng: random.Random, operands: tuple[int, ...], ops: tuple[str, ...], negative: bool) -> str:
    story = rng.choice([s for s in STORIES if s.signed or not negative])
    name = rng.choice(NAMES)
    sentences = [story.start.format(name=name, n=operands[0])]
    for op, y in zip(ops, operands[1:]):
        line = story.add if op == "+" else story.sub if op == "-" else story.mul
        sentences.append(line.format(name=name, n=y))
    sentences.append(story.question.format(name=name))
    return " ".join(sentences)


def _values(operands: tuple[int, ...], ops: tuple[str, ...]) -> list[int]:
    """The running results of the left-to-right chain, starting with the first operand."""
    values = [operands[0]]
    for op, y in zip(ops, operands[1:]):
        values.append(apply_op(op, values[-1], y))
    return values


def _problem(rng: random.Random, operands: tuple[int, ...], ops: tuple[str, ...], word: bool) -> Problem:
    values = _values(operands, ops)
    answer = str(values[-1])
    steps = [f"{x} {op} {y} = {z}." for x, op, y, z in zip(values, ops, operands[1:], values[1:])]
    question = (
        _word_problem(rng, operands, ops, min(values) < 0)
        if word
        else f"What is {expression(operands, ops)}?"
    )
    return Problem(
        question=question,
        answer=answer,
        id="arith-" + hashlib.sha256(question.encode()).hexdigest()[:12],
        solution=" ".join(steps) + f" The answer is {answer}.",
    )


def generate_problems(
    n: int, seed: int = 0, split: str = "train", config: ArithmeticConfig | None = None
) -> list[Problem]:
    """`n` problems of one split with distinct equations, deterministic in (n, seed, split, config)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cfg = config or ArithmeticConfig()
    rng = random.Random(f"arithmetic:{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    for _ in range(50 * n + 1000):
        if len(problems) == n:
            break
        operands = tuple(_operand(rng, cfg) for _ in range(cfg.n_operands))
        ops = tuple(rng.choice(cfg.ops) for _ in range(cfg.n_operands - 1))
        key = expression(operands, ops)
        if key in seen or split_of(operands, ops) != split:
            continue
        if not cfg.allow_negative and min(_values(operands, ops)) < 0:
            continue
        seen.add(key)
        problems.append(_problem(rng, operands, ops, cfg.word_problems))
    if len(problems) < n:
        raise ValueError(
            f"found only {len(problems)} distinct {split!r} problems for {cfg}; widen the config"
        )
    return problems


def prompt_text(problem: Problem, style: str = "answer") -> str:
    """The user message: ask for the bare number ("answer") or step-by-step reasoning ("cot")."""
    if style == "answer":
        return f"{problem.question}\nAnswer with only the number."
    if style == "cot":
        return (
            f'{problem.question}\nThink step by step, then end with "The answer is N." where N is the number.'
        )
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def target_text(problem: Problem, style: str = "answer") -> str:
    """The gold assistant reply for `prompt_text(problem, style)`."""
    if style == "answer":
        return problem.answer
    if style == "cot":
        return problem.solution
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
