from __future__ import annotations

import re

import pytest

from alignkit.data.tasks.arithmetic import (
    ArithmeticConfig,
    generate_problems,
    prompt_text,
    split_of,
    target_text,
)
from alignkit.rewards.verifiers import extract_answer

STEP = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)\.")


def equation(problem):
    """(operands, ops) read back from the worked solution, with each step re-checked."""
    steps = STEP.findall(problem.solution)
    assert steps, problem.solution
    operands, ops, value = [int(steps[0][0])], [], int(steps[0][0])
    for x, op, y, z in steps:
        assert int(x) == value
        value = value + int(y) if op == "+" else value - int(y) if op == "-" else value * int(y)
        assert int(z) == value
        operands.append(int(y))
        ops.append(op)
    assert str(value) == problem.answer
    return tuple(operands), tuple(ops)


def test_answers_recomputed_from_operands_in_the_text():
    for p in generate_problems(100, seed=1):
        operands, ops = equation(p)
        assert [int(n) for n in re.findall(r"\d+", p.question)] == list(operands)
        assert p.solution.endswith(f"The answer is {p.answer}.")


def test_plain_form_evaluates_with_python_precedence():
    cfg = ArithmeticConfig(ops=("+", "-", "*"), n_operands=3, word_problems=False)
    for p in generate_problems(100, seed=2, config=cfg):
        expr = re.fullmatch(r"What is (.+)\?", p.question).group(1)
        assert str(eval(expr)) == p.answer  # parentheses make left-to-right order explicit
        equation(p)


def test_deterministic_and_seed_dependent():
    a = generate_problems(30, seed=5)
    assert a == generate_problems(30, seed=5)
    assert a != generate_problems(30, seed=6)
    assert generate_problems(10, seed=5) == a[:10]


def test_splits_disjoint_across_seeds_and_no_duplicates():
    train = [p for s in (0, 1) for p in generate_problems(300, seed=s, split="train")]
    held = [p for s in (0, 1) for p in generate_problems(300, seed=s, split="heldout")]
    train_eq = {equation(p) for p in train}
    held_eq = {equation(p) for p in held}
    assert not train_eq & held_eq
    assert not {p.question for p in train} & {p.question for p in held}
    one = generate_problems(300, seed=0, split="heldout")
    assert len({equation(p) for p in one}) == 300
    assert all(split_of(*equation(p)) == "heldout" for p in one)


def test_split_ignores_wording():
    cfg = ArithmeticConfig(word_problems=False)
    held = {equation(p) for p in generate_problems(200, seed=0, split="heldout", config=cfg)}
    train = {equation(p) for p in generate_problems(400, seed=3, split="train")}
    assert not held & train


def test_ids_stable_and_unique():
    a = generate_problems(50, seed=4)
    assert [p.id for p in a] == [p.id for p in generate_problems(50, seed=4)]
    assert len({p.id for p in a}) == 50 and all(p.id.startswith("arith-") for p in a)


def test_difficulty_knobs():
    cfg = ArithmeticConfig(min_digits=3, max_digits=3, ops=("-",), n_operands=3, allow_negative=False)
    for p in generate_problems(50, seed=0, config=cfg):
        operands, ops = equation(p)
        assert len(operands) == 3 and set(ops) == {"-"}
        assert all(100 <= x <= 999 for x in operands)
        assert operands[0] - operands[1] >= 0 and int(p.answer) >= 0


def test_word_problems_vary():
    starts = {p.question.split(" ")[1] for p in generate_problems(100, seed=0)}
    assert len(starts) >= 4
    plain = generate_problems(5, config=ArithmeticConfig(word_problems=False))
    assert all(p.question.startswith("What is ") for p in plain)


def test_prompt_and_target_styles():
    p = generate_problems(1, seed=7)[0]
    assert prompt_text(p).startswith(p.question) and prompt_text(p).endswith("Answer with only the number.")
    assert "step by step" in prompt_text(p, "cot") and "The answer is N." in prompt_text(p, "cot")
    assert target_text(p, "answer") == p.answer
    assert target_text(p, "cot") == p.solution
    assert extract_answer(target_text(p, "cot")) == p.answer
    with pytest.raises(ValueError, match="style"):
        prompt_text(p, "essay")


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, split="test")
    with pytest.raises(ValueError, match="ops"):
        ArithmeticConfig(ops=("/",))
    with pytest.raises(ValueError, match="digits"):
        ArithmeticConfig(min_digits=3, max_digits=2)
    tiny = ArithmeticConfig(min_digits=1, max_digits=1, ops=("+",))  # only 81 equations exist
    with pytest.raises(ValueError, match="widen"):
        generate_problems(100, config=tiny)
