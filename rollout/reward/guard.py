"""Guards in front of sympy: inputs graded wrong without (further) symbolic work, and why.

sympy evaluates exactly: ``9**9**9``, ``(10^6)!`` or ``\\binom{10^9}{10^8}`` would run for minutes, and
expanding ``(x+1)^{999}`` for one comparison takes seconds, in single C calls or Python loops. Two
checks keep grading within its time limit and make these inputs cheap and deterministic:

- `slow_path_risk(pred)` on the text, before parsing: too long, too deeply nested, malformed (unbalanced
  braces, a ``\\right`` without its delimiter, control characters: math-verify would skip the junk and
  read ``5}}}}}`` or ``5\\x00`` as 5), exponent towers, huge exponents, factorials and binomials, and
  unevaluated integrals (sympy integrates them, and its first numeric check of a definite integral
  computes quadrature nodes in C calls the deadline cannot interrupt: 0.3 s past it was measured).
- `expression_risk(expr)` on the parsed expression, before comparing: numbers of more than
  `MAX_DIGITS` digits (written or implied: ``2^{5000}``, ``(10^6)!``, ``\\Gamma(10^6)``), factorial-like
  functions of arguments over `MAX_FACTORIAL_ARG`, and products of powers of sums whose expansion
  would exceed degree `MAX_EXPANSION_DEGREE`.

What slips past both is stopped by the deadline in `rollout.reward.grading`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

__all__ = ["MAX_SLOW_PATH_CHARS", "expression_risk", "slow_path_risk"]

MAX_SLOW_PATH_CHARS = 1000  # predictions longer than this are never handed to sympy
MAX_DIGITS = 1000  # numbers with more decimal digits are not built
MAX_FACTORIAL_ARG = 10_000  # n!, Gamma(n), binomial(n, k), ... are refused for larger n
MAX_EXPANSION_DEGREE = 100  # (1+x)^{99}(1-x)^{99} (degree 198) is refused; (x+1)^{100} is fine (~0.3 s)
_MAX_NESTING = 24  # brace/paren depth above which sympy is not asked to parse


# --------------------------------------------------------------------------------------------------
# Text

_ESCAPED_BRACE = re.compile(r"\\[{}]")
_RIGHT = re.compile(r"\\right\b")
_LEFT = re.compile(r"\\left\b")
_DANGLING_RIGHT = re.compile(r"\\right\s*$")
_ALLOWED_CONTROL = frozenset("\t\n\r")


def _malformed(pred: str) -> str | None:
    """Why `pred` is not well-formed LaTeX-ish text, or None."""
    if any(ch not in _ALLOWED_CONTROL and unicodedata.category(ch) in ("Cc", "Cs") for ch in pred):
        return "control character"
    depth = 0
    for ch in _ESCAPED_BRACE.sub("", pred):
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            break
    if depth != 0:
        return "unbalanced braces"
    if len(_LEFT.findall(pred)) != len(_RIGHT.findall(pred)) or _DANGLING_RIGHT.search(pred):
        return "unpaired \\left/\\right"
    return None


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
_BIG_FACTORIAL = re.compile(r"[0-9]{4,}[\s)}]*!")
# sympy evaluates these of integer arguments while parsing, in long C calls a time limit cannot stop
_BIG_SPECIAL = re.compile(
    r"(?:\\[dt]?binom|\\Gamma|\\operatorname\s*\{\s*\w+\s*\})\s*[{(][^{}()]*[0-9]{5,}|[0-9]{5,}[^{}]*\}?\s*\\choose"
)


_INTEGRAL = re.compile(r"\\(?:i{1,3}nt|oint)(?![a-zA-Z])")


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
    malformed = _malformed(pred)
    if malformed is not None:
        return malformed
    if _INTEGRAL.search(pred):
        return "integral"
    if _BIG_FACTORIAL.search(pred):
        return "huge factorial"
    if _BIG_SPECIAL.search(pred):
        return "huge binomial or gamma"
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
# Parsed expression (sympy is imported by the caller; these functions only walk its trees)

_LOG10_2 = math.log10(2)
_FACTORIAL_LIKE = frozenset(
    {"factorial", "factorial2", "subfactorial", "gamma", "loggamma", "binomial", "RisingFactorial",
     "FallingFactorial", "fibonacci", "lucas", "bell", "catalan", "harmonic", "primorial", "multigamma"}
)  # fmt: skip


def _digits(expr: Any) -> float | None:
    """An upper estimate of log10 |value| of a numeric `expr` (no evaluation of anything large), or None
    when it holds symbols."""
    if not getattr(expr, "is_number", False):
        return None
    if expr.is_Rational:
        return max(abs(int(expr.p)).bit_length(), int(expr.q).bit_length()) * _LOG10_2
    if expr.is_Atom:
        return 1.0  # a float, pi, E, I, oo, ...
    if expr.is_Pow:
        exponent = _small_value(expr.args[1])
        return math.inf if exponent is None else exponent * (_digits(expr.args[0]) or 0.0)
    name = type(expr).__name__
    if name in _FACTORIAL_LIKE and expr.args:
        n = _small_value(expr.args[0])
        if n is None:
            return math.inf
        return n * _LOG10_2 if name == "binomial" else n * math.log10(max(n, 2.0))
    parts = [_digits(arg) or 0.0 for arg in expr.args]
    if expr.is_Mul:
        return sum(parts)
    return max(parts, default=0.0) + math.log10(max(len(parts), 1))


def _small_value(expr: Any) -> float | None:
    """|value| of a numeric `expr` of at most 6 digits, else None."""
    digits = _digits(expr)
    if digits is None or digits > 6:
        return None
    try:
        return abs(complex(expr))
    except (TypeError, ValueError, OverflowError):
        return None


def _degree(expr: Any) -> int:
    """Degree of `expr` once every power of a sum in it is expanded (a bound on the expansion's size)."""
    if not hasattr(expr, "args") or not expr.args:
        return 1 if getattr(expr, "is_Symbol", False) else 0
    parts = [_degree(arg) for arg in expr.args]
    if getattr(expr, "is_Mul", False):
        return sum(parts)
    if getattr(expr, "is_Pow", False) and expr.args[1].is_Integer and expr.args[0].free_symbols:
        base = expr.args[0]
        return abs(int(expr.args[1])) * parts[0] if any(a.is_Add for a in _walk(base)) else parts[0]
    return max(parts)


def _walk(expr: Any) -> list[Any]:
    out, stack = [], [expr]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(getattr(node, "args", ()))
    return out


def expression_risk(expr: Any) -> str | None:
    """Why comparing the parsed sympy `expr` could take seconds (a short reason), or None.

    >>> import sympy
    >>> x = sympy.Symbol("x")
    >>> expression_risk(sympy.factorial(sympy.Pow(10, 6, evaluate=False), evaluate=False))
    'huge factorial'
    >>> expression_risk((1 + x) ** 99 * (1 - x) ** 99), expression_risk((x + 1) ** 10)
    ('expansion degree 198', None)
    """
    for node in _walk(expr):
        if type(node).__name__ in _FACTORIAL_LIKE and node.args and node.args[0].is_number:
            value = _small_value(node.args[0])
            if value is None or value > MAX_FACTORIAL_ARG:
                return "huge factorial"
        digits = _digits(node)
        if digits is not None and digits > MAX_DIGITS:
            return "huge number"
        if getattr(node, "is_Pow", False) and getattr(node.args[1], "is_number", False):
            coefficient = max((_digits(a) or 0.0 for a in _walk(node.args[0])), default=0.0)
            exponent = _small_value(node.args[1])
            if exponent is None or exponent * coefficient > MAX_DIGITS:
                return "huge power"
    degree = _degree(expr)
    return f"expansion degree {degree}" if degree > MAX_EXPANSION_DEGREE else None
