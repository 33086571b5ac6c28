from __future__ import annotations

import math
import sys

import pytest

from alignkit.rewards.verifiers import (
    answers_match,
    extract_answer,
    graded,
    gsm8k_final_answer,
    gsm8k_split,
    majority_vote,
    math_equal,
    parse_number,
    pass_at_k,
    verify,
)

EXTRACT_CASES = [
    ("The answer is 42.", "42"),
    ("#### 42", "42"),
    ("so x = 42", "42"),
    ("42", "42"),
    ("\\boxed{42}", "42"),
    ("The total is 1,234", "1234"),
    ("It drops to -7", "-7"),
    ("It drops to \u22127", "-7"),
    ("She paid $1,234.50.", "1234.50"),
    ("The answer is **42**.", "42"),
    ("The answer is 42. Check: 40 + 3 = 43", "42"),  # the marker beats the last number
    ("47-38=9 so 9 apples, then 10 more", "10"),  # no marker: last number; '-' glued to 47 is not a sign
    ("The answer is 3 + 4 = 7.", "7"),  # inside the answer sentence, the number after '='
    ("Final answer: -12", "-12"),
    ("Steps 3 and 4\n#### 1,000", "1000"),
    ("#### 5\nThe answer is 6", "5"),  # '####' outranks 'answer is'
    ("The answer is 6 but \\boxed{7}", "7"),  # \boxed outranks everything
    ("\\boxed{5 \\text{ apples}}", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("$\\boxed{1{,}024}$", "1024"),
    ("The answer is unclear, maybe 8", "8"),  # a marker without a number falls back
    ("Version 3.14.", "3.14"),
    ("no digits here", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_parse_number():
    assert parse_number("1,234") == 1234.0
    assert parse_number("$5.50") == 5.5
    assert parse_number("-7.") == -7.0
    assert parse_number("\u22123") == -3.0
    assert parse_number("4 apples") is None
    assert parse_number("abc") is None
    assert parse_number(None) is None


def test_answers_match():
    assert answers_match("42", "42.0")
    assert answers_match("1234", "1,234")
    assert not answers_match("41", "42")
    assert not answers_match(None, "1")
    assert answers_match("0.3333333", "0.33333333")  # |diff| 3e-8 <= 1e-6
    assert not answers_match("0.33", "0.34")
    assert answers_match("Paris.", "paris")  # non-numeric: normalised strings


def test_verify_and_graded():
    assert verify("The answer is 85.", "85") == 1.0
    assert verify("The answer is 84.", "85") == 0.0
    assert verify("I don't know", "85") == 0.0
    assert graded("#### 100", "100") == 1.0
    assert graded("#### 90", "100") == pytest.approx(0.45)  # 0.5 * (1 - 10/100)
    assert graded("#### -12", "-10") == pytest.approx(0.4)  # 0.5 * (1 - 2/10)
    assert graded("#### 0.5", "0") == pytest.approx(0.25)  # 0.5 * (1 - 0.5/max(0, 1))
    assert graded("#### 300", "100") == 0.0  # relative error 200% -> floor at 0
    assert graded("no number", "100") == 0.0


def test_gsm8k_fields():
    field = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 1,072"
    )
    rationale, final = gsm8k_split(field)
    assert final == "1072" == gsm8k_final_answer(field)
    assert rationale == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether."
    with pytest.raises(ValueError, match="####"):
        gsm8k_final_answer("no marker")


def test_math_equal_with_math_verify():
    pytest.importorskip("math_verify")
    assert math_equal("The answer is \\boxed{\\frac{1}{2}}", "0.5")
    assert math_equal("So the result is $1,234$", "1234")
    assert not math_equal("The answer is \\boxed{3}", "4")


def test_math_equal_falls_back_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes the import raise ImportError
    assert math_equal("The answer is 1,234.", "1234")
    assert not math_equal("\\boxed{\\frac{1}{2}}", "0.5")  # the fallback compares numbers only


def test_pass_at_k_hand_values():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # k=1 is the plain success rate c/n = 3/10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0  # only one wrong sample: any 2 include a correct one
    exact = 1 - math.comb(150, 50) / math.comb(200, 50)
    assert pass_at_k(200, 50, 50) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_vote():
    assert majority_vote(["7", "7.0", "8"]) == "7"
    assert majority_vote(["1,234", "5", "1234", "5", None]) == "1234"  # tie 2-2: first seen wins
    assert majority_vote([None, "3", None]) == "3"
    assert majority_vote(["2.50", "2.5", "3"]) == "2.5"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
