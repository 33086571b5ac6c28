"""Answer extraction and checking: binary and graded rewards, pass@k and majority voting.

`extract_answer` reads the final answer of a model's reply. Explicit markers win over the
last number in the text, in this order: the last `\\boxed{...}`, the text after the last
"####", the sentence after the last "answer is" / "answer:"; otherwise the last number.
Numbers are returned without thousands separators, currency signs or trailing periods.

`answers_match` compares numbers exactly (as decimals, never through floats) when the
reference is an integer: 1450001 is wrong for 1450000 however large the numbers, while
1,450,000, $1,450,000.00 and 1450000.0 are right. Only a reference with a fractional part
gets a tolerance, `DECIMAL_REL_TOL` (relative), for binary floating-point noise in a
reply such as 0.30000000000000004 for 0.3.
"""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal

_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
# A number: optional sign not glued to a word ("47-38" is two numbers), digits with or
# without thousands commas, optional decimals ("42." stops before the period).
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)
_LATEX_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")
_CALCULATOR = re.compile(r"<<[^<>]*>>")

# The relative tolerance for references with a fractional part, and only for them (integer
# references match exactly). It absorbs float64 noise in a reply computed in floating point
# (0.1 + 0.2 printed as 0.30000000000000004 is off by ~1.3e-16 relative; float64's epsilon is
# 2.2e-16, so 1e-12 leaves room for thousands of roundings) and nothing a model could state
# on purpose: 1450000.251 for 1450000.25 (7e-10 relative) is wrong.
DECIMAL_REL_TOL = 1e-12


def _clean(text: str) -> str:
    """Unicode minus to '-', drop '$', markdown bold and LaTeX '{,}' separators."""
    text = text.translate(_MINUS).replace("{,}", ",")
    return text.replace("$", "").replace("**", "").replace("__", "")


def _numbers(text: str) -> list[str]:
    return [m.group().replace(",", "").lstrip("+") for m in _NUMBER.finditer(text)]


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces matched; None if there is none."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    depth, begin = 1, starts[-1].end()
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return text[begin:]


def _boxed_answer(content: str) -> str | None:
    """A bare number as a number; LaTeX (\\frac, ^, /) verbatim; else the last number."""
    content = _LATEX_TEXT.sub("", content).replace("\\%", "").strip()
    if _NUMBER.fullmatch(content):
        return _numbers(content)[0]
    if any(ch in content for ch in "\\/^"):
        return content or None
    found = _numbers(content)
    return found[-1] if found else (content or None)


def _after_marker(rest: str, sentence: bool) -> str | None:
    """First number after a marker; within a sentence, the number after its last '='."""
    if sentence:
        rest = re.split(r"\n|\.(?!\d)", rest, maxsplit=1)[0]
        rest = rest.rsplit("=", 1)[-1]
    found = _numbers(rest)
    return found[0] if found else None


def extract_answer(text: str) -> str | None:
    """The final answer of a reply (see the module docstring for the rules); None if none."""
    text = _clean(text)
    boxed = _last_boxed(text)
    if boxed is not None and (answer := _boxed_answer(boxed)):
        return answer
    for marker, sentence in ((_HASHES, False), (_ANSWER_IS, True)):
        hits = list(marker.finditer(text))
        if hits and (answer := _after_marker(text[hits[-1].end() :], sentence)):
            return answer
    found = _numbers(text)
    return found[-1] if found else None


def parse_decimal(s: str | None) -> Decimal | None:
    """The exact value of a string that is one number ("1,234", "$5.50", "-7."); else None."""
    if s is None:
        return None
    text = _clean(s).strip().rstrip(".").strip()
    return Decimal(text.replace(",", "")) if _NUMBER.fullmatch(text) else None


def parse_number(s: str | None) -> float | None:
    """`parse_decimal` as a float (for partial credit and voting, not for deciding a match)."""
    x = parse_decimal(s)
    return None if x is None else float(x)


def _is_integer(x: Decimal) -> bool:
    return x == x.to_integral_value()


def _normalise(s: str) -> str:
    return " ".join(_clean(s).lower().split()).rstrip(".")


def answers_match(pred: str | None, gold: str, tol: float = DECIMAL_REL_TOL) -> bool:
    """Whether a predicted answer matches the reference `gold`.

    Numbers are compared as exact decimals. An integer reference (1450000, or 1450000.0)
    needs a prediction of exactly that value: 1450000.00 matches, 1450001 does not. A
    reference with a fractional part matches within `tol` relative to |gold| (default
    `DECIMAL_REL_TOL`, 1e-12: float noise only). Non-numbers: equal normalised strings.
    """
    if pred is None:
        return False
    a, b = parse_decimal(pred), parse_decimal(gold)
    if a is not None and b is not None:
        if _is_integer(b):
            return a == b
        return abs(a - b) <= Decimal(repr(tol)) * abs(b)
    return _normalise(pred) == _normalise(gold)


def gsm8k_split(answer_field: str) -> tuple[str, str]:
    """GSM8K's answer field as (rationale without <<calculator>> notes, final answer)."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####' final-answer marker: {answer_field[-80:]!r}")
    rationale, final = answer_field.rsplit("####", 1)
    return _CALCULATOR.sub("", rationale).strip(), final.strip().replace(",", "")


def gsm8k_final_answer(answer_field: str) -> str:
    """The text after GSM8K's '####', commas removed."""
    return gsm8k_split(answer_field)[1]


def verify(response: str, answer: str) -> float:
    """Binary reward: 1.0 if the extracted answer matches, else 0.0."""
    return 1.0 if answers_match(extract_answer(response), answer) else 0.0


def graded(response: str, answer: str) -> float:
    """Reward in [0, 1]: 1 if correct; else 0.5 * max(0, 1 - |p - g| / max(|g|, 1)).

    A wrong number earns at most 0.5, falling linearly to 0 at a relative error of 100%.
    No number, or a non-numeric mismatch, earns 0.
    """
    pred = extract_answer(response)
    if answers_match(pred, answer):
        return 1.0
    p, g = parse_number(pred), parse_number(answer)
    if p is None or g is None:
        return 0.0
    return 0.5 * max(0.0, 1.0 - abs(p - g) / max(abs(g), 1.0))


def _exact_floats(parsed: list) -> list:
    """math-verify's parse with every sympy Float replaced by its exact decimal value."""
    import sympy

    def exact(expr):
        if not isinstance(expr, sympy.Basic):
            return expr
        return expr.xreplace({f: sympy.Rational(str(f)) for f in expr.atoms(sympy.Float)})

    return [exact(e) for e in parsed]


def math_equal(response: str, answer: str) -> bool:
    """Mathematical equivalence via `math-verify` when installed, else `answers_match`.

    A reply whose extracted answer is a plain number, against a numeric reference, is decided
    by `answers_match` (integers exactly). For LaTeX replies (\\frac, ^...) math-verify decides;
    against an integer reference its floats are first made exact decimals, so its float
    rounding (6 decimal places) cannot accept 1450000.0000001 for 1450000. Against a decimal
    reference that rounding is math-verify's own tolerance.
    """
    pred_answer, gold_value = extract_answer(response), parse_decimal(answer)
    if gold_value is not None and parse_decimal(pred_answer) is not None:
        return answers_match(pred_answer, answer)
    try:
        from math_verify import parse
        from math_verify import verify as mv_verify
    except ImportError:
        parse = None
    if parse is not None:
        gold = parse(answer) or parse(f"${answer}$")
        pred = parse(response)
        if gold and pred:
            if gold_value is not None and _is_integer(gold_value):
                gold, pred = _exact_floats(gold), _exact_floats(pred)
            return bool(mv_verify(gold, pred))
    return answers_match(pred_answer, answer)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k / i), which never forms large binomials.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _vote_key(answer: str) -> str:
    x = parse_decimal(answer)
    if x is None:
        return _normalise(answer)
    return str(int(x)) if _is_integer(x) else format(float(x), ".12g")


def majority_vote(answers: list[str | None]) -> str | None:
    """The most common answer (numbers normalised, None ignored); ties go to the first seen."""
    counts = Counter(_vote_key(a) for a in answers if a is not None)
    return max(counts, key=counts.__getitem__) if counts else None
