"""`rollout.reward.grading`: box extraction, the fast numeric path, the guards (`rollout.reward.guard`), the
math-verify slow path and its own time limit (`rollout.reward.deadline`)."""

from __future__ import annotations

import contextlib
import functools
import threading
import time

import pytest

from rollout.reward import deadline
from rollout.reward.deadline import DeadlineExceeded, call_with_deadline
from rollout.reward.grading import (
    MAX_SLOW_PATH_CHARS,
    _slow_path,
    extract_boxed,
    grade_answer,
    is_equivalent,
    slow_path_risk,
    warm_up,
)
from rollout.reward.guard import expression_risk


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{18}", "18"),
        ("a \\boxed{1} b \\boxed{2} c", "2"),  # the last box
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{{{x}}}", "{{x}}"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),  # "\boxed 5" holds one token
        ("\\boxed{}", ""),
        ("\\boxed{\\frac{1}{2}", None),  # unbalanced
        ("\\boxed", None),
        ("\\boxed x", "x"),
        ("no box", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "correct"),
    [
        # GSM8K numeric forms the issue lists: accept ...
        ("1,000", "1000", True),
        ("1000.0", "1000", True),
        ("$18", "18", True),
        ("\\$18", "18", True),
        ("18 dollars", "18", True),
        ("\\boxed{18}", "18", True),
        ("18.", "18", True),
        ("18", "18.0", True),
        ("+18", "18", True),
        ("\u221218", "-18", True),  # unicode minus sign
        ("72\\,000", "72000", True),  # LaTeX thin space as thousands separator
        ("72{,}000", "72000", True),
        ("18 \\text{ cm}", "18", True),
        # ... and reject
        ("180", "18", False),
        ("1.8", "18", False),
        ("", "18", False),
        ("18", "", False),
        ("-18", "18", False),
        ("18.5", "18", False),
        ("12,34", "1234", False),  # not a thousands grouping
        ("18 thousand", "18", False),
        ("18 thousand", "18000", False),  # magnitude words are not units; not parsed further either
        ("18 or 20", "20", False),  # hedging over two answers
        ("18, 20", "20", False),
        # words after a number: units and other plain words are dropped ...
        ("5 dollars", "5", True),
        ("5 square feet", "5", True),
        ("60 miles per hour", "60", True),
        ("5kg", "5", True),  # a listed unit may be written onto the number
        ("3 years old", "3", True),
        ("18 cookies", "18", True),  # GSM8K: math-verify alone rejects plain nouns
        ("18 eggs", "18", True),
        ("18 books", "18", True),
        ("18 people", "18", True),
        ("7 red marbles", "7", True),
        ("18 \\text{ cookies}", "18", True),
        ("17 cookies", "18", False),  # the number still has to match
        ("18 cookies", "17", False),
        ("18 cookies", "18 eggs", True),  # both plain numbers: the nouns are not compared
        ("5 feet squared", "5", True),  # "squared"/"cubed" after a listed unit is a unit power
        ("3 cm cubed", "3", True),
        # ... but a maths word anywhere among them makes the answer wrong
        ("2 pi", "2", False),
        ("3 squared", "3", False),
        ("5 factorial", "5", False),
        ("5 hundredths", "5", False),
        ("2 sqrt", "2", False),  # math-verify alone would drop the dangling "sqrt" and read 2
        ("3 cubed", "3", False),
        ("1 third", "1", False),
        ("2 theta", "2", False),
        ("2pi", "2", False),
        ("2 big pi", "2", False),  # a maths word is never dropped, whatever words come before it
        ("3 red squared", "3", False),  # not a unit power: "red" is not a listed unit
        ("3 squared cm", "3", False),
        ("5 \\text{ hundredths}", "5", False),
        # ... and magnitude/number words, or a non-unit word written onto the number, make it not a number
        ("18 or twenty", "18", False),  # a hedge
        ("2 dozen", "2", False),
        ("2xy", "2", False),
        ("2xy", "2yz", False),  # not both "2" with a dropped word
        # plain-text pi and sqrt(...) are the constant and the root, as the reference grader (sympy) reads
        # them; math-verify alone reads "pi" as the symbols p*i
        ("2 pi", "2\\pi", True),
        ("16 pi", "16\\pi", True),
        ("2pi", "2\\pi", True),
        ("16*pi", "16\\pi", True),
        ("pi/2", "\\frac{\\pi}{2}", True),
        ("4 pi/3", "\\frac{4\\pi}{3}", True),
        ("1/(2pi)", "\\frac{1}{2\\pi}", True),
        ("\\boxed{8 pi - 4}", "8\\pi-4", True),
        ("pi", "\\pi", True),
        ("2 sqrt(3)", "2\\sqrt{3}", True),
        ("sqrt(2)/2", "\\frac{\\sqrt{2}}{2}", True),
        ("16 pi", "16", False),  # still not the number before it
        ("16 pi", "17\\pi", False),
        ("pi", "3.14", False),
        ("2 big pi", "2\\pi", False),
        ("sqrt(2)", "2", False),
        ("2 pie", "2\\pi", False),  # a word that merely contains "pi" stays a word
        ("2 spin", "2\\pi", False),
        ("2\\pi", "2\\pi", True),
        ("2 \u03c0", "2\\pi", True),
        # fractions, percentages
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "0.5", True),
        ("\\frac12", "0.5", True),
        ("-\\frac{3}{2}", "-1.5", True),
        ("50%", "50", True),
        ("50\\%", "0.5", True),
        ("50 percent", "50", True),
        ("5%", "50", False),
        # LaTeX / symbolic (math-verify)
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
        ("(x+1)^2", "x^2+2x+1", True),
        ("2^{10}", "1024", True),
        ("x = 18", "18", True),
        ("\\pi", "\\pi", True),
        ("3.14", "\\pi", False),
        ("3x", "3", False),
        ("\\{1, 2\\}", "\\{2, 1\\}", True),
        ("A", "A", True),
        ("B", "A", False),
        # malformed around a right answer: math-verify alone reads each of these as 5
        ("5}}}}}", "5", False),
        ("}{\\left( 5 \\right", "5", False),
        ("\\left( 5 \\right", "5", False),
        ("5\x00\x00", "5", False),
        ("\\left\\{ 5 \\right\\}", "\\{5\\}", True),  # escaped braces and paired \left/\right are fine
        # bombs (seconds of sympy work when called directly) are wrong at once
        ("(x+1)^{999}", "\\frac{1}{2}", False),
        ("(1+x)^{99}(1-x)^{99}", "18", False),
        ("(x+1)^{10}", "x^{10}+10x^9+45x^8+120x^7+210x^6+252x^5+210x^4+120x^3+45x^2+10x+1", True),
        ("x^{2023}", "x^{2023}", True),
        ("1234567^2", "1524155677489", True),  # a big base to a small power is not a huge number
    ],
)
def test_grade_answer(pred: str, gold: str, correct: bool) -> None:
    assert grade_answer(pred, gold).correct is correct


@pytest.mark.parametrize(
    ("pred", "gold", "method"),
    [
        ("1,000", "1000", "fast"),
        ("180", "18", "fast"),  # both numbers: the fast path is final, no math-verify
        ("\\frac{3}{4}", "0.75", "fast"),
        ("\\left( 1, 2 \\right)", "(1,2)", "fast"),  # identical after squashing
        ("", "18", "empty"),
        ("\\boxed{}", "18", "empty"),
        ("9**9**9", "18", "guard"),
        ("x" * (MAX_SLOW_PATH_CHARS + 1), "18", "guard"),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", "math_verify"),
        ("2 sqrt", "2", "fast"),  # a number followed by a math word is graded wrong without math-verify
        ("18 apples", "18", "fast"),  # plain words after a number are dropped like units
        ("2 big sqrt", "2", "fast"),  # a maths word among them: wrong without math-verify
        ("16 pi", "16\\pi", "fast"),  # equal once "pi" is written \pi
        ("18 thousand", "18", "math_verify"),  # a magnitude word: not a plain number
        ("2xy", "2yz", "math_verify"),  # a non-unit word written onto the number
        ("5}}}}}", "5", "guard"),
        ("(10^6)!", "18", "guard"),  # parsed (unevaluated), then refused by the expression guard
        ("\\Gamma(10^{6})", "18", "guard"),
        ("(x+1)^{999}", "\\frac{1}{2}", "guard"),
        ("2^{5000}", "18", "guard"),  # a 1506-digit number
    ],
)
def test_grade_answer_method(pred: str, gold: str, method: str) -> None:
    assert grade_answer(pred, gold).method == method


@pytest.mark.parametrize(
    ("pred", "risk"),
    [
        ("9**9**9", "exponent tower"),
        ("10^{10^{10}}", "exponent tower"),
        ("2**(3**4)", "exponent tower"),
        ("2^2^2", "exponent tower"),
        ("{10}^{10}^{10}", "exponent tower"),
        ("x^y^z", None),  # symbolic towers are harmless: sympy does not evaluate them
        ("e^{-x^2}", None),
        ("10^{100000}", "huge exponent"),
        ("2^{5!}", "huge exponent"),
        ("12345!", "huge factorial"),
        ("{" * 30 + "}" * 30, "too deeply nested"),
        ("1" * (MAX_SLOW_PATH_CHARS + 1), "too long"),
        ("2^{10} + x^2 + y^{3}", None),
        ("e^{i\\pi}", None),
        ("\\frac{2^{10}}{3}", None),
        ("100!", None),
        ("2**10 + 3**4", None),
        ("(10000)!", "huge factorial"),
        ("\\binom{100000}{50000}", "huge binomial or gamma"),  # sympy evaluates it while parsing
        ("\\dbinom{1000000000}{100000000}", "huge binomial or gamma"),
        ("\\Gamma(1000000)", "huge binomial or gamma"),
        ("\\binom{10}{5}", None),
        ("\\int_0^\\infty e^{-x^2} dx", "integral"),
        ("\\iint_D x \\, dA", "integral"),
        ("\\interior", None),  # not an integral sign
        ("5}}}}}", "unbalanced braces"),
        ("}{5", "unbalanced braces"),
        ("\\left( 5 \\right", "unpaired \\left/\\right"),
        ("\\left( 5", "unpaired \\left/\\right"),
        ("5\x00", "control character"),
        ("\ud800 18", "control character"),  # a lone surrogate
        ("\\{1, 2\\}", None),
        ("\\left\\{ x \\right.", None),
        ("\\left( 1, 2 \\right]", None),
    ],
)
def test_slow_path_risk(pred: str, risk: str | None) -> None:
    assert slow_path_risk(pred) == risk


def test_math_verify_off_the_main_thread() -> None:
    """math-verify's default signal.alarm timeouts raise off the main thread (the classic all-zero reward
    bug); grading disables them, so the slow path gives the right answer from a worker thread."""
    results: list[bool] = []
    thread = threading.Thread(
        target=lambda: results.extend(
            [
                is_equivalent("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
                is_equivalent("\\dfrac{2}{4} + x", "x + 0.5"),
            ]
        )
    )
    thread.start()
    thread.join(timeout=30)
    assert results == [True, True]


@pytest.mark.parametrize(
    ("latex", "risk"),
    [
        ("(10^6)!", "huge factorial"),
        ("\\Gamma(10^{6})", "huge factorial"),
        ("2^{5000}", "huge number"),
        ("(2x)^{100000}", "huge power"),
        ("(x+1)^{999}", "expansion degree 999"),
        ("(1+x)^{99}(1-x)^{99}", "expansion degree 198"),
        ("(x+1)^{100}", None),
        ("x^{2023}", None),  # a power of a symbol is not expanded
        ("2^{10} + 100!", None),
        ("\\frac{\\sqrt{2}}{2}", None),
        ("\\{1, 2\\}", None),
    ],
)
def test_expression_risk(latex: str, risk: str | None) -> None:
    """The guard on math-verify's parse of `latex` (which leaves factorials and gamma unevaluated)."""
    from math_verify import parse

    parsed = parse(f"${latex}$", parsing_timeout=None)
    assert parsed
    assert expression_risk(parsed[0]) == risk


def test_slow_answer_stops_at_the_time_limit_on_a_thread() -> None:
    """A right answer that sympy needs seconds to verify (an integral: 1.9-2.0 s measured on a 2-core EPYC
    after the warm-up) is graded wrong ("timeout") after a 0.5 s limit, off the main thread, where
    signal-based timeouts cannot work. The slow path is called directly: `grade_answer`'s text guard now
    refuses integrals before any symbolic work. The warm-up (first-use costs, ~0.9 s) is paid before the
    clock starts, as a reward worker pays it before its first sample; the limit is 4x below sympy's time,
    so a faster CPU still times out (at `TIME_LIMIT_S` = 1.5 s a CPU 25% faster finished the integral)."""
    limit = 0.5
    grades: list[tuple[object, float]] = []

    def run() -> None:
        start = time.perf_counter()
        grade = _slow_path("\\int_0^\\infty e^{-x^2} dx", "\\frac{\\sqrt{\\pi}}{2}", limit)
        grades.append((grade, time.perf_counter() - start))

    assert grade_answer("\\int_0^\\infty e^{-x^2} dx", "\\frac{\\sqrt{\\pi}}{2}") == (False, "guard")
    warm_up()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    ((grade, seconds),) = grades
    assert grade == (False, "timeout")
    assert limit <= seconds < limit + 0.5


def test_deadline_interrupts_a_python_loop_and_never_fires_late() -> None:
    """`call_with_deadline` stops a busy pure-Python loop on a worker thread, and a call that returns in
    time leaves no exception pending to surface later in unrelated code."""
    outcome: list[object] = []

    def spin() -> int:
        n = 0
        while True:
            n += 1

    def run() -> None:
        start = time.perf_counter()
        try:
            call_with_deadline(spin, 0.2)
        except DeadlineExceeded:
            outcome.append(time.perf_counter() - start)
        for i in range(300):  # limits of 1 ms around calls that finish about then: a late fire would escape
            with contextlib.suppress(DeadlineExceeded):
                call_with_deadline(functools.partial(sum, range(2_000 * (i % 5))), 0.001)
        end = time.perf_counter() + 0.1
        while time.perf_counter() < end:
            sum(range(100))
        outcome.append("clean")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert len(outcome) == 2 and outcome[1] == "clean", outcome
    assert 0.2 <= outcome[0] < 1.0  # type: ignore[operator]


def test_deadlines_landing_as_calls_return_never_leave_the_watchdog_locked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits of 1 ms around calls that end about then put the exception everywhere in `disarm`, including
    just after it took the watchdog's lock. It must not leave with the lock held: another thread's deadline
    then never fired and every later `arm` hung (seen within the first thousand calls; the pool's reward
    workers each run one grading thread)."""

    def busy(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def hammer() -> None:
        for i in range(1_500):
            with contextlib.suppress(DeadlineExceeded):
                call_with_deadline(functools.partial(busy, 0.0005 * (i % 5)), 0.001)

    def probe(outcome: list[str]) -> None:
        try:
            call_with_deadline(functools.partial(busy, 5.0), 0.05)
        except DeadlineExceeded:
            outcome.append("fired")

    for _ in range(3):  # a fresh watchdog each round, as a forked reward worker starts one
        monkeypatch.setattr(deadline, "_watchdog", deadline._Watchdog())
        late = threading.Thread(target=hammer, daemon=True)
        late.start()
        late.join(timeout=30)
        outcome: list[str] = []
        other = threading.Thread(target=probe, args=(outcome,), daemon=True)
        other.start()
        other.join(timeout=3)
        assert not late.is_alive() and outcome == ["fired"], "a deadline on another thread never fired"
