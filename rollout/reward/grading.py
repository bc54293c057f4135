"""Answer grading: `grade_answer(pred, gold)` decides whether an extracted answer equals the gold one.

1. **Fast path** (pure Python, microseconds). Both sides are unwrapped (``\\boxed{}``, ``$…$``, ``\\$``,
   ``\\text{units}``, a trailing period), and plain-text ``pi`` and ``sqrt(…)`` are written as LaTeX, as
   the reference grader's sympy reads them (``16 pi`` is ``16\\pi``; `_spelled_latex`). Plain numbers
   (``1,000``, ``$18``, ``18 dollars``, ``50%``) and simple fractions are compared exactly as rationals, and
   then the fast path is final (``180`` and ``1.8`` are not ``18``). Words after a number are dropped
   unless they name mathematics (``2 sqrt`` is wrong) or a magnitude (``18 thousand``: left to the later
   steps); see `_word_kind`. Otherwise equal strings (without spaces and ``\\left``/``\\right``) are equal.
2. **Guards** (`rollout.reward.guard`): malformed text (unbalanced braces, control characters) and inputs
   whose symbolic evaluation would take seconds (``9**9**9``, ``(10^6)!``, ``(x+1)^{999}``) are wrong.
3. **Slow path**: ``math_verify.parse`` / ``verify`` (LaTeX, symbolic equality, sets, intervals), within
   `TIME_LIMIT_S` of wall time on any thread (`rollout.reward.deadline`: math-verify's own
   ``signal.alarm`` timeouts work only on the main thread, so they are off). Past it the answer is wrong
   (method "timeout"). The reward pool's per-sample kill stays the backstop for custom reward functions.

>>> grade_answer("1,000", "1000"), grade_answer("180", "18"), grade_answer("9**9**9", "18").method
(Grade(correct=True, method='fast'), Grade(correct=False, method='fast'), 'guard')
>>> is_equivalent("\\\\frac{1}{2}", "0.5")
True
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction
from typing import Any, Literal, NamedTuple

from rollout.reward.deadline import DeadlineExceeded, call_with_deadline
from rollout.reward.guard import MAX_SLOW_PATH_CHARS, expression_risk, slow_path_risk

__all__ = [
    "MAX_SLOW_PATH_CHARS",
    "TIME_LIMIT_S",
    "Grade",
    "extract_boxed",
    "grade_answer",
    "is_equivalent",
    "slow_path_risk",
    "warm_up",
]

TIME_LIMIT_S = 1.5  # wall-clock limit of one answer's symbolic work (parse + compare)
_MAX_NUMBER_DIGITS = 400  # longer digit strings are not turned into Fractions on the fast path

Method = Literal["empty", "fast", "guard", "math_verify", "timeout"]


class Grade(NamedTuple):
    correct: bool
    method: Method  # which path decided: "empty", "fast", "guard", "math_verify" or "timeout"


# --------------------------------------------------------------------------------------------------
# Extraction


_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``, or ``\\boxed 5``) in `text`; nested braces
    are matched. None when there is no box or its braces are unbalanced.

    >>> extract_boxed("so $\\\\boxed{\\\\frac{1}{2}}$ and not \\\\boxed{x")
    >>> extract_boxed("first \\\\boxed{1}, then \\\\boxed{\\\\frac{a}{b}}")
    '\\\\frac{a}{b}'
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + (len("\\fbox") if text.startswith("\\fbox", start) else len("\\boxed"))
    if i < len(text) and text[i] == " ":  # "\boxed 5": the box holds one token
        token = text[i + 1 :].split("$", 1)[0].strip().split()
        return token[0] if token else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


# --------------------------------------------------------------------------------------------------
# Fast path

_DELIMITERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_NOISE = re.compile(r"\\[!,;: ]|\{,\}|\\(?:left|right)\b|\\displaystyle")
_NUMBER = re.compile(
    r"""^(?P<sign>[-+\u2212]?)\s*
    (?P<int>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)?(?:\.(?P<frac>[0-9]+))?\s*
    (?P<pct>\\?%)?\s*
    (?P<unit>\\(?:text|mbox|mathrm|textrm)\{(?P<text>[^{}]*)\}|[A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){0,3})?
    \s*\.?$""",
    re.VERBOSE,
)
_FRACTION = re.compile(
    r"^(?P<sign>[-+\u2212]?)\s*(?:\\[dt]?frac\{\s*(?P<n1>[0-9]+)\s*\}\{\s*(?P<d1>[0-9]+)\s*\}"
    r"|\\[dt]?frac(?P<n2>[0-9])(?P<d2>[0-9])|(?P<n3>[0-9]+)\s*/\s*(?P<d3>[0-9]+))\s*\.?$"
)
_PERCENT_WORDS = {"percent", "per cent", "percentage"}
_MAGNITUDE_WORDS = re.compile(r"\b(?:hundred|thousand|million|billion|trillion|dozen)s?\b", re.IGNORECASE)


def _with_plurals(words: str) -> frozenset[str]:
    """The whitespace-separated `words` and each with an "s" appended."""
    return frozenset(words.split()) | {w + "s" for w in words.split()}


# Unit words after a bare number ("18 dollars", "5 square feet", "60 miles per hour"): money, length,
# area, volume, mass, time, speed, temperature/angle and percentages, singular and plural. They are
# dropped, like any other plain word ("18 cookies"); being listed matters for "squared"/"cubed", which
# after a unit is a unit power ("5 feet squared") rather than a maths word ("3 squared").
_UNIT_WORDS = _with_plurals(
    "dollar cent penny euro pound yen rupee usd"  # money
    " mm cm km millimeter centimeter meter kilometer millimetre centimetre metre kilometre"  # length
    " inch ft foot yd yard mile mi"
    " square sq cubic cu acre hectare"  # area, volume
    " ml milliliter liter millilitre litre gallon quart pint cup tablespoon teaspoon tbsp tsp"
    " mg kg gram milligram kilogram lb ounce oz ton tonne"  # mass
    " sec second min minute hr hour day week month year decade century"  # time
    " per mph kph kmh"  # rates
    " degree deg celsius fahrenheit kelvin radian percent percentage"  # temperature, angles, percentages
) | {"inches", "feet", "pence", "centuries", "lbs", "hrs", "mins", "secs", "old"}
_UNIT_POWERS = frozenset({"squared", "cubed"})  # maths words, except right after a unit
# Words after a number that name an operation, a constant, a variable or a fraction of it: "2 sqrt",
# "3 squared", "2 pi", "2 theta", "5 hundredths" are not 2, 3, 2, 2 and 5. math-verify reads some of
# these (a dangling "sqrt") as the bare number, so the fast path grades them wrong itself.
_MATH_WORDS = re.compile(
    r"\b(?:pi|sqrt|root|squared|cubed|factorial|half|halves|thirds?"
    r"|(?:four|fif|six|seven|eigh|nin|ten|twelf|twentie|hundred|thousand|million|billion)ths?"
    r"|alpha|beta|gamma|delta|epsilon|theta|lambda|mu|sigma|tau|phi|omega|sin|cos|log|ln|exp)\b",
    re.IGNORECASE,
)
# Words that change a number's size or are numbers themselves ("18 thousand", "2 dozen", "18 or twenty"):
# such text is not a plain number, and is left to the later steps.
_NUMBER_WORDS = re.compile(
    r"\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve"
    r"|(?:thir|four|fif|six|seven|eigh|nine)teen|(?:twen|thir|for|fif|six|seven|eigh|nine)ty)\b",
    re.IGNORECASE,
)


# Words after a number (one to four words of two or more letters each, nothing else) are read as follows,
# looking at every word, not just the first:
#
# a. **Maths word** anywhere among them (``pi``, ``sqrt``, ``root``, ``squared``, ``cubed``,
#    ``factorial``, fraction words ``half``/``halves``/``third(s)``/``…th(s)`` such as ``hundredths``,
#    Greek letter names such as ``theta``, and ``sin``/``cos``/``log``/``ln``/``exp``): the text is not
#    that number and is graded **wrong** on the fast path (``3 squared``, ``5 factorial``, ``5 hundredths``,
#    ``2 sqrt``, ``2 theta``, and also ``2 big sqrt``: a maths word is never dropped, whatever comes before
#    it). One exception: ``squared``/``cubed`` directly after a listed unit is a unit power (``5 feet
#    squared``, ``3 cm cubed``) and is dropped with the unit. A plain-text ``pi`` is ``\pi`` by then
#    (`_spelled_latex`), so ``2 pi`` goes on to math-verify, which finds it equal to ``2\pi``, not ``2``.
# b. **Magnitude or number word** (``hundred``, ``thousand``, ``million``, ``dozen``, ``twenty``,
#    ``one``, …): not a plain number; left to the later steps (``18 thousand`` is neither ``18`` nor,
#    here, ``18000``; ``18 or twenty`` is a hedge, not ``18``).
# c. **Listed unit** (money, length, area, volume, mass, time, rates, degrees, ``percent``; see
#    `_UNIT_WORDS`): dropped (``18 dollars``, ``5 square feet``, ``60 miles per hour``); ``percent``
#    marks a percentage.
# d. **Any other plain words** (``cookies``, ``red marbles``, ``years old``): dropped too, so GSM8K's
#    ``18 cookies`` equals ``18`` (and ``17 cookies`` does not). Such words must be separated from the
#    number by a space: written onto it they are not a plain number (``2xy`` is not ``2``, ``18th`` is
#    left to the later steps), while listed units may be (``5kg``, ``60mph``).
#
# ``\text{…}`` after a number (``18 \text{ apples}``) is dropped unless it holds a maths or magnitude
# word.
def _word_kind(words: str, attached: bool) -> Literal["math", "other", "drop"]:
    """How the bare `words` after a number are read: "math" if any names mathematics (graded wrong);
    "other" (not a plain number) if any is a magnitude or number word, or if the first is written onto the
    number without a space and is not a listed unit ("2xy", "18th"; "5kg" is fine); else "drop"."""
    tokens = words.lower().split()
    for i, word in enumerate(tokens):
        if word in _UNIT_POWERS and i > 0 and tokens[i - 1] in _UNIT_WORDS:
            continue  # "5 feet squared": a unit power
        if _MATH_WORDS.fullmatch(word):
            return "math"
    if attached and tokens[0] not in _UNIT_WORDS:
        return "other"
    if _MAGNITUDE_WORDS.search(words) or _NUMBER_WORDS.search(words):
        return "other"
    return "drop"


def _bare_words_kind(m: re.Match[str]) -> Literal["math", "other", "drop"]:
    """`_word_kind` of the bare (not ``\\text{}``) words in `_NUMBER` match `m`."""
    start = m.start("unit")
    return _word_kind(m.group("unit"), attached=not m.string[start - 1].isspace())


def _unwrap(s: str) -> str:
    s = s.strip()
    if "\\boxed" in s or "\\fbox" in s:
        boxed = extract_boxed(s)
        if boxed is not None:
            s = boxed.strip()
    for left, right in _DELIMITERS:
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
            break
    return s


class _Number(NamedTuple):
    value: Fraction
    percent: bool


def _as_number(s: str) -> _Number | None:
    """A plain number or simple fraction as an exact rational, or None."""
    s = _plain(s)
    if len(s) > _MAX_NUMBER_DIGITS + 40:
        return None
    m = _number_match(s)
    if m is not None:
        unit = (m.group("unit") or "").lower()
        if m.group("text") is not None:  # "18 \text{ apples}": any annotation but a magnitude or math word
            if _MAGNITUDE_WORDS.search(unit) or _MATH_WORDS.search(unit):
                return None
        elif unit and _bare_words_kind(m) != "drop":
            return None  # "18 thousand", "2 sqrt", "2 big sqrt": not a number followed by units or nouns
        digits = (m.group("int") or "0").replace(",", "") + "." + (m.group("frac") or "0")
        value = Fraction(digits)
        if m.group("sign") in ("-", "\u2212"):
            value = -value
        return _Number(value, bool(m.group("pct")) or unit in _PERCENT_WORDS)
    f = _FRACTION.match(s)
    if f is not None:
        num = f.group("n1") or f.group("n2") or f.group("n3")
        den = f.group("d1") or f.group("d2") or f.group("d3")
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return _Number(-value if f.group("sign") in ("-", "\u2212") else value, False)
    return None


_SPELLED_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")
_SPELLED_SQRT = re.compile(r"(?<![\\A-Za-z])sqrt\s*\(([^()]*)\)")


def _spelled_latex(s: str) -> str:
    """Plain-text ``pi`` and ``sqrt(…)`` written as LaTeX (``16 pi`` → ``16 \\pi``, ``2 sqrt(3)`` →
    ``2 \\sqrt{3}``), as the reference grader reads them (sympy with ``pi`` the constant); math-verify would
    read ``pi`` as the symbols p·i. Words that merely contain them (``spin``, ``pie``) are left alone.

    >>> _spelled_latex("pi/2 + sqrt(3) - spin")
    '\\\\pi/2 + \\\\sqrt{3} - spin'
    """
    return _SPELLED_SQRT.sub(r"\\sqrt{\1}", _SPELLED_PI.sub(r"\\pi", s))


def _plain(s: str) -> str:
    return _NOISE.sub("", s).replace("\\$", "").replace("$", "").strip()


def _number_match(s: str) -> re.Match[str] | None:
    """`_NUMBER`'s match of `_plain` text `s` when it holds digits; None for long text (not a number)."""
    if len(s) > _MAX_NUMBER_DIGITS + 40:
        return None
    m = _NUMBER.match(s)
    return m if m is not None and (m.group("int") or m.group("frac")) else None


def _names_math(s: str) -> bool:
    """Whether `s` is a number followed by words that name an operation or constant (``2 sqrt``,
    ``2 big pi``, ``5 \\text{ hundredths}``; not ``5 feet squared``)."""
    m = _number_match(_plain(s))
    if m is None or m.group("unit") is None:
        return False
    if m.group("text") is not None:
        return _MATH_WORDS.search(m.group("text")) is not None
    return _bare_words_kind(m) == "math"


def _numbers_equal(a: _Number, b: _Number) -> bool:
    """Exact equality; a percentage also matches its value over 100 (``50%`` = ``50`` = ``0.5``)."""
    left = {a.value} | ({a.value / 100} if a.percent else set())
    right = {b.value} | ({b.value / 100} if b.percent else set())
    return bool(left & right)


def _squash(s: str) -> str:
    s = _NOISE.sub("", s)
    return re.sub(r"\s+", "", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


# --------------------------------------------------------------------------------------------------
# Slow path


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns once per process that its alarm timeout is off; we turn it off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


@functools.cache
def _math_verify() -> tuple[Any, Any]:
    from math_verify import parse, verify

    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logging.getLogger(name).addFilter(_DropTimeoutWarning())
    return parse, verify


def _delimited(s: str) -> str:
    if "$" in s or "\\(" in s or "\\[" in s or "\\boxed" in s:
        return s
    return f"${s}$"


@functools.lru_cache(maxsize=8192)
def _parse_gold(gold: str) -> list[Any]:
    parse, _ = _math_verify()
    return list(parse(_delimited(gold), parsing_timeout=None))


def _math_verify_grade(pred: str, gold: str) -> Grade:
    parse, verify = _math_verify()
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return Grade(False, "math_verify")
    pred_parsed = parse(_delimited(pred), parsing_timeout=None)
    if not pred_parsed and _delimited(pred) != pred:
        pred_parsed = parse(pred, parsing_timeout=None)
    if any(expression_risk(expr) is not None for expr in pred_parsed):
        return Grade(False, "guard")
    return Grade(
        bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed, timeout_seconds=None)), "math_verify"
    )


def _slow_path(pred: str, gold: str, time_limit_s: float | None) -> Grade:
    """`_math_verify_grade` within `time_limit_s` of wall time (None: no limit), on any thread."""
    if time_limit_s is None:
        return _math_verify_grade(pred, gold)
    warm_up()  # once per process, outside the limit: first-use costs are not the answer's
    try:
        return call_with_deadline(lambda: _math_verify_grade(pred, gold), time_limit_s)
    except DeadlineExceeded:
        return Grade(False, "timeout")


# --------------------------------------------------------------------------------------------------
# Public API


def grade_answer(pred: str, gold: str, *, time_limit_s: float | None = TIME_LIMIT_S) -> Grade:
    """Whether the extracted answer `pred` is mathematically equal to `gold`, and which path decided.

    The symbolic work is bounded by `time_limit_s` seconds of wall time (module docstring), on any thread.

    >>> grade_answer("$18.", "18"), grade_answer("1.8", "18").correct, grade_answer("", "18").method
    (Grade(correct=True, method='fast'), False, 'empty')
    """
    pred, gold = _spelled_latex(pred), _spelled_latex(gold)  # the fast and the slow path read the same text
    p, g = _unwrap(pred), _unwrap(gold)
    if not p or not g:
        return Grade(False, "empty")
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return Grade(_numbers_equal(pn, gn), "fast")
    if _squash(p) == _squash(g):
        return Grade(True, "fast")
    if _names_math(p):  # "2 sqrt", "3 squared": not the number, and math-verify may read "2 sqrt" as 2
        return Grade(False, "fast")
    if slow_path_risk(pred) is not None:
        return Grade(False, "guard")
    return _slow_path(pred.strip(), gold.strip(), time_limit_s)


@functools.cache
def warm_up() -> None:
    """Pay math-verify's and sympy's first-use costs (imports, LaTeX parser and simplifier set-up, about
    0.4 s) once per process, with no time limit; reward workers call it before taking samples, and the
    first time-limited comparison calls it before its clock starts."""
    for pred, gold in [("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("(x+1)^2", "x^2+2x+1"), ("x = 1", "1")]:
        grade_answer(pred, gold, time_limit_s=None)
    grade_answer("\\{1,2\\}", "(1, 2]", time_limit_s=None)


def is_equivalent(pred: str, gold: str) -> bool:
    """`grade_answer(pred, gold).correct`."""
    return grade_answer(pred, gold).correct
