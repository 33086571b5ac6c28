"""Small instruction task families with exact outputs and short rationales (Flan-style data).

A family draws (template fields, input, output, rationale) from a seeded RNG and words its
instruction with one of several templates. Items of one `generate` call have distinct
(fields, input) pairs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from alignkit.data.tasks.arithmetic import generate_problems

WORDS = tuple(
    """
    apple river garden yellow pencil window banana cloud forest candle rocket silver monkey
    orange planet butter dragon little summer winter guitar basket mirror jacket coffee bridge
    castle flower island letter marble needle pillow rabbit saddle tomato violin wallet zebra
    anchor button carpet dinner engine finger gravel hammer jungle kettle ladder meadow nickel
    office pepper quartz ribbon tunnel velvet walrus yogurt cat dog sun map cup hat pen box key
    egg owl bee sea sky bread chair table grape lemon horse mouse paper stone train water cherry
    puzzle bottle pocket spider tiger teapot banner cookie mammal
    """.split()
)

CONVERSIONS = (  # (larger unit, smaller unit, smaller units per larger unit)
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
)

Draw = tuple[dict[str, str], str, str, str]  # (template fields, input, output, rationale)


@dataclass(frozen=True)
class TaskItem:
    """One instruction example: `output` is exact, `rationale` explains how to reach it."""

    task: str
    instruction: str
    input: str
    output: str
    rationale: str


@dataclass(frozen=True)
class TaskFamily:
    """A named task: instruction templates and a seeded drawer of (fields, input, output, rationale)."""

    name: str
    templates: tuple[str, ...]
    draw: Callable[[random.Random], Draw]

    def generate(self, n: int, seed: int = 0) -> list[TaskItem]:
        """`n` distinct items, deterministic in (n, seed)."""
        rng = random.Random(f"{self.name}:{seed}")
        items: list[TaskItem] = []
        seen: set[tuple] = set()
        for _ in range(50 * n + 1000):
            if len(items) == n:
                return items
            fields, text, output, rationale = self.draw(rng)
            instruction = rng.choice(self.templates).format(**fields)
            key = (tuple(sorted(fields.items())), text)
            if key not in seen:
                seen.add(key)
                items.append(TaskItem(self.name, instruction, text, output, rationale))
        raise ValueError(f"task {self.name!r} found only {len(items)} distinct items, asked for {n}")


def _spell(text: str) -> str:
    return ", ".join("(space)" if ch == " " else ch for ch in text)


def _arithmetic(rng: random.Random) -> Draw:
    problem = generate_problems(1, seed=rng.randrange(2**31), split="train")[0]
    return (
        {},
        problem.question,
        problem.answer,
        problem.solution.removesuffix(f" The answer is {problem.answer}."),
    )


def _reverse_string(rng: random.Random) -> Draw:
    text = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
    out = text[::-1]
    return {}, text, out, f'The characters of "{text}" are {_spell(text)}. From last to first: {_spell(out)}.'


def _change_case(rng: random.Random) -> Draw:
    case = rng.choice(("upper", "lower"))
    words = [
        rng.choice((str.lower, str.capitalize, str.upper))(w) for w in rng.sample(WORDS, rng.randint(2, 4))
    ]
    text = " ".join(words)
    out = text.upper() if case == "upper" else text.lower()
    if out == text:
        text = text.swapcase()
    return {"case": case}, text, out, f'Writing every letter of "{text}" in {case} case gives "{out}".'


def _sort_numbers(rng: random.Random) -> Draw:
    order = rng.choice(("ascending", "descending"))
    nums = [rng.randint(0, 99) for _ in range(rng.randint(4, 7))]
    ranked = sorted(nums, reverse=order == "descending")
    sign = " <= " if order == "ascending" else " >= "
    fields = {
        "order": order,
        "direction": "smallest to largest" if order == "ascending" else "largest to smallest",
    }
    return (
        fields,
        ", ".join(map(str, nums)),
        ", ".join(map(str, ranked)),
        f"Comparing the numbers: {sign.join(map(str, ranked))}.",
    )


def _sort_words(rng: random.Random) -> Draw:
    words = rng.sample(WORDS, rng.randint(3, 6))
    ranked = sorted(words)
    return (
        {},
        ", ".join(words),
        ", ".join(ranked),
        f"Comparing the words letter by letter: {' < '.join(ranked)}.",
    )


def _count_letters(rng: random.Random) -> Draw:
    word = rng.choice(WORDS)
    absent = sorted(set("abcdefghijklmnopqrstuvwxyz") - set(word))
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(absent)
    where = [str(i + 1) for i, ch in enumerate(word) if ch == letter]
    found = f"appears at position(s) {', '.join(where)}" if where else "does not appear"
    why = f'Spelling "{word}": {_spell(word)}. The letter "{letter}" {found}, so {len(where)} time(s).'
    return {"letter": letter}, word, str(len(where)), why


def _count_words(rng: random.Random) -> Draw:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
    numbered = ", ".join(f"{i} {w}" for i, w in enumerate(words, 1))
    return (
        {},
        " ".join(words),
        str(len(words)),
        f"Numbering the words: {numbered}. There are {len(words)} words.",
    )


def _unit_conversion(rng: random.Random) -> Draw:
    big, small, factor = rng.choice(CONVERSIONS)
    k = rng.randint(1, 99)
    rule = f"1 {big[:-1]} = {factor} {small}"
    if rng.random() < 0.5:
        why = f"{rule}, so {k} {big} = {k} * {factor} = {k * factor} {small}."
        return {"unit": small}, f"{k} {big}", str(k * factor), why
    why = f"{rule}, so {k * factor} {small} = {k * factor} / {factor} = {k} {big}."
    return {"unit": big}, f"{k * factor} {small}", str(k), why


def _max_of_list(rng: random.Random) -> Draw:
    nums = [rng.randint(-50, 99) for _ in range(rng.randint(4, 8))]
    running = [max(nums[: i + 1]) for i in range(len(nums))]
    seen = ", ".join(map(str, running))
    why = f"Keeping the largest value seen so far: {seen}. The largest is {running[-1]}."
    return {}, ", ".join(map(str, nums)), str(running[-1]), why


FAMILIES = (
    TaskFamily(
        "arithmetic",
        (
            "Solve the following problem.",
            "Work out the answer to this question.",
            "Answer the arithmetic question below.",
        ),
        _arithmetic,
    ),
    TaskFamily(
        "reverse_string",
        (
            "Reverse the following text.",
            "Write the text below backwards, character by character.",
            "Spell this string in reverse order.",
        ),
        _reverse_string,
    ),
    TaskFamily(
        "change_case",
        (
            "Convert the text below to {case}case.",
            "Rewrite the following in {case} case letters.",
            "Change every letter of this text to {case} case.",
        ),
        _change_case,
    ),
    TaskFamily(
        "sort_numbers",
        (
            "Sort these numbers in {order} order.",
            "Arrange the following numbers from {direction}.",
            "List the numbers below in {order} order, separated by commas.",
        ),
        _sort_numbers,
    ),
    TaskFamily(
        "sort_words",
        (
            "Sort these words alphabetically.",
            "Put the following words in alphabetical order.",
            "Arrange the words below from A to Z.",
        ),
        _sort_words,
    ),
    TaskFamily(
        "count_letters",
        (
            'How many times does the letter "{letter}" appear in the word below?',
            'Count the occurrences of "{letter}" in this word.',
            'In the following word, how many "{letter}" letters are there?',
        ),
        _count_letters,
    ),
    TaskFamily(
        "count_words",
        (
            "How many words are in the text below?",
            "Count the words in the following text.",
            "Give the number of words in this text.",
        ),
        _count_words,
    ),
    TaskFamily(
        "unit_conversion",
        (
            "Convert the quantity below to {unit}.",
            "How many {unit} is this?",
            "Express the following in {unit}.",
        ),
        _unit_conversion,
    ),
    TaskFamily(
        "max_of_list",
        (
            "What is the largest number in this list?",
            "Find the maximum of the following numbers.",
            "Which number below is the biggest?",
        ),
        _max_of_list,
    ),
)
