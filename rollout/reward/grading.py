"""Answer extraction and mathematical equivalence.

`grade_answer(pred, gold)` decides whether an extracted answer equals the gold answer:

1. **Fast path** (pure Python, microseconds). Both sides are unwrapped (``\\boxed{}``, ``$…$``, ``\\$``,
   ``\\text{units}``, a trailing period) and, where they are plain numbers (``1,000``, ``1000.0``, ``$18``,
   ``18 dollars``, ``-3``, ``50%``) or simple fractions (``3/4``, ``\\frac{3}{4}``), compared exactly as
   rationals. When both sides are numbers the fast path is final: ``180`` and ``1.8`` are not ``18``.
   Otherwise, identical strings (after removing spaces and ``\\left``/``\\right``) are equal.

   Words after a number (one to four words of two or more letters each, nothing else) are read as follows,
   looking at every word, not just the first:

   a. **Maths word** anywhere among them (``pi``, ``sqrt``, ``root``, ``squared``, ``cubed``,
      ``factorial``, fraction words ``half``/``halves``/``third(s)``/``…th(s)`` such as ``hundredths``,
      Greek letter names such as ``theta``, and ``sin``/``cos``/``log``/``ln``/``exp``): the text is not
      that number and is graded **wrong** on the fast path (``2 pi``, ``3 squared``, ``5 factorial``,
      ``5 hundredths``, ``2 sqrt``, and also ``2 big pi``: a maths word is never dropped, whatever comes
      before it). One exception: ``squared``/``cubed`` directly after a listed unit is a unit power
      (``5 feet squared``, ``3 cm cubed``) and is dropped with the unit.
   b. **Magnitude or number word** (``hundred``, ``thousand``, ``million``, ``dozen``, ``twenty``,
      ``one``, …): not a plain number; left to the later steps (``18 thousand`` is neither ``18`` nor,
      here, ``18000``; ``18 or twenty`` is a hedge, not ``18``).
   c. **Listed unit** (money, length, area, volume, mass, time, rates, degrees, ``percent``; see
      `_UNIT_WORDS`): dropped (``18 dollars``, ``5 square feet``, ``60 miles per hour``); ``percent``
      marks a percentage.
   d. **Any other plain words** (``cookies``, ``red marbles``, ``years old``): dropped too, so GSM8K's
      ``18 cookies`` equals ``18`` (and ``17 cookies`` does not). Such words must be separated from the
      number by a space: written onto it they are not a plain number (``2xy`` is not ``2``, ``18th`` is
      left to the later steps), while listed units may be (``5kg``, ``60mph``).

   ``\\text{…}`` after a number (``18 \\text{ apples}``) is dropped unless it holds a maths or magnitude
   word.
2. **Guard.** A prediction that is too long, too deeply nested, or holds an exponent tower / huge
   exponent / huge factorial (``9**9**9``, ``10^{10^{10}}``, ``99999!``) is graded wrong without being
   parsed: sympy would try to evaluate it. The process-pool timeout in `rollout.reward.pool` is the real
   backstop; the guard only keeps the common bombs cheap.
3. **Slow path**: ``math_verify.parse`` / ``math_verify.verify`` (LaTeX, symbolic equality, sets,
   intervals, percentages). Their ``signal.alarm`` timeouts are disabled (``parsing_timeout=None``,
   ``timeout_seconds=None``) because alarms only work on the main thread; isolation and time limits are
   the job of the reward pool.

>>> grade_answer("1,000", "1000")
Grade(correct=True, method='fast')
>>> grade_answer("180", "18")
Grade(correct=False, method='fast')
>>> grade_answer("9**9**9", "18")
Grade(correct=False, method='guard')
>>> is_equivalent("\\\\frac{1}{2}", "0.5")
True
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction
from typing import Any, Literal, NamedTuple

__all__ = [
    "MAX_SLOW_PATH_CHARS",
    "Grade",
    "extract_boxed",
    "grade_answer",
    "is_equivalent",
    "slow_path_risk",
    "warm_up",
]

MAX_SLOW_PATH_CHARS = 1000  # predictions longer than this are never handed to sympy
_MAX_NESTING = 24  # brace/paren depth above which sympy is not asked to parse
_MAX_NUMBER_DIGITS = 400  # longer digit strings are not turned into Fractions on the fast path

Method = Literal["empty", "fast", "guard", "math_verify"]


class Grade(NamedTuple):
    correct: bool
    method: Method  # which path decided: "empty", "fast", "guard" or "math_verify"


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
            return None  # "18 thousand", "2 pi", "2 big pi": not a number followed by units or nouns
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
# Guard


def _group_end(s: str, i: int) -> int:
    """Index just past the balanced group opening at s[i] ('{' or '('), or len(s) if unbalanced."""
    opening, closing = s[i], "}" if s[i] == "{" else ")"
    depth = 0
    for j in range(i, len(s)):
        if s[j] == opening:
            depth += 1
        elif s[j] == closing:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


_POWER = re.compile(r"\^|\*\*")
_TOKEN = re.compile(r"\s*[-+]?[\w.]+")
_NUMERIC_POWER = re.compile(r"[0-9][)}\s]*(?:\^|\*\*)")  # a number raised to something
_BIG_DIGITS = re.compile(r"[0-9]{5,}")
_DIGIT = re.compile(r"[0-9]")
_BIG_FACTORIAL = re.compile(r"[0-9]{4,}\s*!")


def slow_path_risk(pred: str) -> str | None:
    """Why `pred` should not be handed to sympy (a short reason), or None if it looks safe.

    >>> slow_path_risk("10^{10^{10}}")
    'exponent tower'
    >>> slow_path_risk("2^{10} + x^2") is None
    True
    """
    if len(pred) > MAX_SLOW_PATH_CHARS:
        return "too long"
    depth = worst = 0
    for ch in pred:
        if ch in "{([":
            depth += 1
            worst = max(worst, depth)
        elif ch in "})]":
            depth -= 1
    if worst > _MAX_NESTING:
        return "too deeply nested"
    if _BIG_FACTORIAL.search(pred):
        return "huge factorial"
    for m in _POWER.finditer(pred):
        i = m.end()
        while i < len(pred) and pred[i] == " ":
            i += 1
        if i < len(pred) and pred[i] in "{(":
            end = _group_end(pred, i)
        else:
            tok = _TOKEN.match(pred, i)
            end = tok.end() if tok else i
        exponent = pred[i:end]
        # numeric towers are evaluated exactly by sympy; symbolic ones (e^{-x^2}, x^y^z) are harmless
        chained = _POWER.match(pred[end:].lstrip()) is not None  # a^b^c
        if _NUMERIC_POWER.search(exponent) or (chained and _DIGIT.search(exponent)):
            return "exponent tower"
        if _BIG_DIGITS.search(exponent) or "!" in exponent:
            return "huge exponent"
    return None


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


def _math_verify_equal(pred: str, gold: str) -> bool:
    parse, verify = _math_verify()
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return False
    pred_parsed = parse(_delimited(pred), parsing_timeout=None)
    if not pred_parsed and _delimited(pred) != pred:
        pred_parsed = parse(pred, parsing_timeout=None)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


# --------------------------------------------------------------------------------------------------
# Public API


def grade_answer(pred: str, gold: str) -> Grade:
    """Whether the extracted answer `pred` is mathematically equal to `gold`, and which path decided.

    >>> grade_answer("$18.", "18"), grade_answer("1.8", "18").correct, grade_answer("", "18").method
    (Grade(correct=True, method='fast'), False, 'empty')
    """
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
    return Grade(_math_verify_equal(pred.strip(), gold.strip()), "math_verify")


def warm_up() -> None:
    """Pay math-verify's and sympy's first-use costs (imports, LaTeX parser and simplifier set-up, about
    0.4 s) now; reward workers call this before taking samples, so no sample's time limit includes it."""
    for pred, gold in [("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("(x+1)^2", "x^2+2x+1"), ("x = 1", "1")]:
        grade_answer(pred, gold)
    grade_answer("\\{1,2\\}", "(1, 2]")


def is_equivalent(pred: str, gold: str) -> bool:
    """`grade_answer(pred, gold).correct`."""
    return grade_answer(pred, gold).correct
