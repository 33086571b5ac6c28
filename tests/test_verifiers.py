from __future__ import annotations

import math
import sys

import pytest

from alignkit.rewards.verifiers import (
    DECIMAL_REL_TOL,
    answers_match,
    extract_answer,
    graded,
    gsm8k_final_answer,
    gsm8k_split,
    majority_vote,
    math_equal,
    parse_decimal,
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
    assert not answers_match("0.3333333", "0.33333333")  # a rounded decimal is not float noise
    assert not answers_match("0.33", "0.34")
    assert answers_match("Paris.", "paris")  # non-numeric: normalised strings


NEAR_MISSES = [  # (reply, reference): one unit off at large magnitudes, 1e-6 relative or less
    ("#### 1450001", "1450000"),
    ("The answer is 1,450,001.", "1450000"),
    ("\\boxed{1450001}", "1450000"),
    ("#### 1449999", "1450000"),
    ("#### 999999999", "1000000000"),
    ("#### 1000000001", "1000000000"),
    ("#### -1450001", "-1450000"),
    ("#### 1450000.5", "1450000"),
    ("#### 1450000.0000001", "1450000"),
    ("#### 1450001", "1450000.0"),  # an integer written with decimals is still an integer
    ("#### 9007199254740993", "9007199254740992"),  # equal as float64s, so not compared as floats
]


@pytest.mark.parametrize("reply,reference", NEAR_MISSES)
def test_integer_near_misses_are_wrong(reply, reference):
    # relative error <= 1e-6: the old tolerance (1e-6 * max(1, |gold|)) accepted every one of these
    assert verify(reply, reference) == 0.0
    assert not answers_match(extract_answer(reply), reference)


RIGHT_FORMS = [
    "#### 1450000",
    "#### 1,450,000",
    "She has $1,450,000.00 now.",
    "#### 1450000.0",
    "#### 1450000.00",
    "\\boxed{1450000}",
    "$\\boxed{1{,}450{,}000}$",
    "The answer is 1450000.",
    "The answer is **1,450,000**.",
]


@pytest.mark.parametrize("reply", RIGHT_FORMS)
def test_integer_answer_forms_are_right(reply):
    assert verify(reply, "1450000") == 1.0
    assert verify(reply, "1,450,000") == 1.0  # the reference may carry separators too
    assert verify(reply, "1450001") == 0.0  # and the same form is still checked by value


def test_negative_integers():
    assert verify("It drops to -1,450,000.", "-1450000") == 1.0
    assert verify("#### \u22121450000.00", "-1450000") == 1.0
    assert verify("#### 1450000", "-1450000") == 0.0
    assert verify("#### -999999999", "-1000000000") == 0.0


def test_decimal_reference_tolerance():
    assert DECIMAL_REL_TOL == 1e-12
    assert verify("#### 0.30000000000000004", "0.3") == 1.0  # 0.1 + 0.2 in float64
    assert verify("#### 0.3", "0.30000000000000004") == 1.0
    assert verify("#### 0.30", "0.3") == 1.0
    assert verify("#### 0.3000001", "0.3") == 0.0  # 3e-7 relative: a different answer
    assert verify("#### 1450000.251", "1450000.25") == 0.0  # 7e-10 relative
    assert verify("#### 1450001", "1450000.5") == 0.0
    assert verify("#### -2.5", "2.5") == 0.0
    assert answers_match("1.5000001", "1.5", tol=1e-6)  # an explicit tolerance still applies...
    assert not answers_match("1450001", "1450000", tol=1e-6)  # ...to decimals only


def test_parse_decimal_is_exact():
    assert parse_decimal("9007199254740993") != parse_decimal("9007199254740992")
    assert parse_decimal("$1,450,000.00") == 1450000
    assert parse_decimal("-7.") == -7
    assert parse_decimal("4 apples") is None


def test_graded_keeps_near_misses_below_full_credit():
    near = graded("#### 1450001", "1450000")
    assert near == pytest.approx(0.5 * (1 - 1 / 1450000))
    assert near < 0.5  # a near miss is partial credit, never a correct answer
    assert graded("#### 1,450,000.00", "1450000") == 1.0
    assert graded("#### 0.30000000000000004", "0.3") == 1.0


def test_math_equal_is_exact_for_integer_references():
    pytest.importorskip("math_verify")
    from math_verify import parse
    from math_verify import verify as mv_verify

    assert not math_equal("\\boxed{1450001}", "1450000")
    assert not math_equal("So the result is $1,450,001$", "1450000")
    assert not math_equal("\\boxed{1.450001 \\times 10^6}", "1450000")
    assert math_equal("\\boxed{1.45 \\times 10^6}", "1450000")
    assert math_equal("\\boxed{\\frac{2900000}{2}}", "1450000.0")
    # math-verify alone rounds floats to 6 decimals, so with the reference written "1450000.0"
    # it accepts a LaTeX reply 1e-7 off; math_equal makes the floats exact first.
    for reply in ("\\boxed{1450000.0000001 \\cdot 1}", "\\boxed{x = 1450000.0000001}"):
        assert mv_verify(parse("1450000.0"), parse(reply))
        assert not math_equal(reply, "1450000.0")
        assert not math_equal(reply, "1450000")


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
    assert majority_vote(["1000000000000001", "1000000000000002", "1000000000000002"]) == "1000000000000002"
