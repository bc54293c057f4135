"""Adversarial model outputs, graded directly (the reward function called on a worker thread, no pool) and
through the real `RewardScorer` pool: every one is scored in under 2 s, with no hang and no crash. Most
are nonsense and must score 0; a few are valid answers buried in junk and must still score 1. Run with
``-s`` to see the direct per-answer timings."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from rollout.reward import RewardScorer, r1_zero_reward
from rollout.reward.grading import warm_up

MB = 1 << 20


def A(answer: str) -> str:
    return f"reasoning </think> <answer>{answer}</answer>"


# (name, response, gold, expected reward)
CORPUS: list[tuple[str, str, str, float]] = [
    # exponent / factorial bombs: sympy would evaluate them
    ("python power tower", A("9**9**9"), "18", 0.0),
    ("latex power tower", A("10^{10^{10}}"), "18", 0.0),
    ("deep latex tower", A("9^{9^{9^{9}}}"), "18", 0.0),
    ("parenthesised tower", A("2**(2**(2**(2**20)))"), "18", 0.0),
    ("huge exponent", A("10^{100000000}"), "18", 0.0),
    ("huge exponent, python", A("7**123456789"), "18", 0.0),
    ("huge factorial", A("99999999!"), "18", 0.0),
    ("boxed tower", A("\\boxed{2^{2^{2^{2^{2^{2}}}}}}"), "18", 0.0),
    ("sum to a tower", A("\\sum_{n=1}^{10^{10}} n"), "18", 0.0),
    ("division by zero", A("\\frac{1}{0}"), "18", 0.0),
    ("huge binomial", A("\\binom{1000000000}{100000000}"), "18", 0.0),
    # seconds of sympy work when called directly, before the parsed-expression guard
    ("huge power of a sum", A("(x+1)^{999}"), "\\frac{1}{2}", 0.0),
    ("huge factorial of a power", A("(10^6)!"), "18", 0.0),
    ("gamma of a power", A("\\Gamma(10^{6})"), "18", 0.0),
    ("central binomial", A("\\binom{100000}{50000}"), "18", 0.0),
    ("product of powers of sums", A("(1+x)^{99}(1-x)^{99}"), "18", 0.0),
    # size
    ("1 MB of digits as the answer", A("9" * MB), "18", 0.0),
    ("1 MB of prose then a good answer", "blah " * (MB // 5) + A("18"), "18", 1.0),
    ("1 MB inside the answer tags", A("x + " * (MB // 4)), "18", 0.0),
    ("1 MB without tags", "7" * MB, "18", 0.0),
    ("5000-digit answer equal to the gold", A("1" * 5000), "1" * 5000, 1.0),
    ("100k-digit decimal", A("0." + "0" * 100_000 + "1"), "0", 0.0),
    # nesting and unbalanced LaTeX
    ("deeply nested fractions", A("\\frac{" * 500 + "1" + "}{2}" * 500), "18", 0.0),
    (
        "gold inside 10k braces (too deep: guarded)",
        A("\\boxed{" + "{" * 10_000 + "18" + "}" * 10_001),
        "18",
        0.0,
    ),
    ("nested sqrt", A("\\sqrt{" * 1000 + "2" + "}" * 1000), "18", 0.0),
    ("10k parentheses", A("(" * 5000 + "1" + ")" * 5000), "18", 0.0),
    ("huge gamma", A("\\Gamma(1000000)"), "18", 0.0),
    ("unbalanced box", A("\\boxed{\\frac{1}{2}"), "0.5", 0.0),
    ("unbalanced braces", A("}}}}{{{{"), "18", 0.0),
    # malformed around a right answer: math-verify alone would skip the junk and read 5
    ("trailing closing braces", A("5}}}}}"), "5", 0.0),
    ("stray braces and an open \\left", A("}{\\left( 5 \\right"), "5", 0.0),
    ("trailing NUL bytes", A("5\x00\x00"), "5", 0.0),
    ("10k open boxes", A("\\boxed{" * 10_000), "18", 0.0),
    ("matrix bomb", A("\\begin{pmatrix}" + "1&" * 5000 + "1\\end{pmatrix}"), "18", 0.0),
    ("fraction chain", A("1/" * 10_000 + "1"), "18", 0.0),
    ("dollar storm", A("$" * 100_000), "18", 0.0),
    ("backslash storm", A("\\" * 100_000), "18", 0.0),
    # odd characters and numbers
    ("arabic-indic digits", A("١٨"), "18", 0.0),
    ("fullwidth digits", A("１８"), "18", 0.0),
    ("zero-width space in a number", A("1\u200b8"), "18", 0.0),
    ("NUL bytes", A("\x00" * 1000), "18", 0.0),
    ("lone surrogate", A("\ud800 18"), "18", 0.0),  # junk around a number, like the NUL bytes
    ("NaN", A("NaN"), "18", 0.0),
    ("factorial chain", A("10!!!!!!"), "18", 0.0),
    ("inf", A("inf"), "18", 0.0),
    ("-inf", A("-\\infty"), "18", 0.0),
    ("float overflow", A("1e309"), "18", 0.0),
    # right, but sympy needs ~3 s to integrate it, partly in C calls past the grader's deadline: guarded, 0
    ("gaussian integral", A("\\int_0^\\infty e^{-x^2} dx"), "\\frac{\\sqrt{\\pi}}{2}", 0.0),
    # tag floods
    ("5000 <answer> tags", "x </think> " + "<answer>" * 5000, "18", 0.0),
    ("5000 formatted prefixes", "</think> <answer>" * 5000 + "18</answer>", "18", 1.0),
    ("5000 closed answers", "x </think> " + "<answer>17</answer>" * 4999 + "<answer>18</answer>", "18", 1.0),
    ("5000 </answer> tags", A("18") + "</answer>" * 5000, "18", 1.0),
]


TIMEOUTS: set[str] = set()  # every answer is bounded before the pool's 1 s limit (its timeouts: test_rewards)


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 30
    assert TIMEOUTS.issubset(name for name, _, _, _ in CORPUS)


def test_graded_directly_on_a_thread_within_two_seconds() -> None:
    """Each answer graded by calling `r1_zero_reward` itself on a worker thread (no pool to kill it, and no
    signals off the main thread): the graders bound their own work, so each takes at most 2 s."""
    warm_up()  # first-use costs (imports) are paid once per process, not by one answer
    results: list[tuple[str, float, float]] = []

    def grade_all() -> None:
        for name, response, gold, _ in CORPUS:
            start = time.perf_counter()
            reward = r1_zero_reward(response, gold).reward
            results.append((name, reward, time.perf_counter() - start))

    thread = threading.Thread(target=grade_all)
    thread.start()
    thread.join(timeout=len(CORPUS) * 2.0)
    assert not thread.is_alive()
    for name, reward, seconds in results:
        print(f"{seconds:7.3f} s  reward {reward}  {name}")
    _check(results)


@pytest.fixture(scope="module")
def scorer() -> Iterator[RewardScorer]:
    with RewardScorer("r1_zero", timeout_s=1.0, num_workers=2) as s:
        s.score(["warm </think> <answer> 1 </answer>"] * 8, ["1"] * 8)  # start-up is not part of the timings
        yield s


def _score_each(scorer: RewardScorer) -> list[tuple[str, float, float]]:
    """(name, reward, seconds) for each corpus entry, scored one call at a time."""
    out = []
    for name, response, gold, _ in CORPUS:
        start = time.monotonic()
        (scores,) = scorer.score([response], [gold])
        out.append((name, scores.reward, time.monotonic() - start))
    return out


def _check(results: list[tuple[str, float, float]]) -> None:
    assert [(name, reward) for name, reward, _ in results] == [(name, exp) for name, _, _, exp in CORPUS]
    slow = [(name, round(seconds, 2)) for name, _, seconds in results if seconds >= 2.0]
    assert slow == []


def test_adversarial_corpus_main_thread(scorer: RewardScorer) -> None:
    scorer.metrics()  # reset
    _check(_score_each(scorer))
    m = scorer.metrics()
    assert m["reward/samples"] == len(CORPUS)
    assert m["reward/timeouts"] == len(TIMEOUTS)
    assert m["reward/errors"] == 0  # bombs are guarded or time out; nothing crashes a worker


def test_adversarial_corpus_worker_thread(scorer: RewardScorer) -> None:
    scorer.metrics()  # reset
    results: list[tuple[str, float, float]] = []
    thread = threading.Thread(target=lambda: results.extend(_score_each(scorer)))
    thread.start()
    thread.join(timeout=len(CORPUS) * 2.0)
    assert not thread.is_alive()
    _check(results)
    assert scorer.metrics()["reward/timeouts"] == len(TIMEOUTS)


def test_adversarial_corpus_as_one_batch(scorer: RewardScorer) -> None:
    """The whole corpus in one call, as a learner would send it: the same scores and timeouts, and the
    call takes at most the timeouts one after another (1 s each) plus a few seconds of real work."""
    scorer.metrics()
    start = time.monotonic()
    out = scorer.score([r for _, r, _, _ in CORPUS], [g for _, _, g, _ in CORPUS])
    elapsed = time.monotonic() - start
    metrics = scorer.metrics()
    got = [(name, s.reward) for (name, _, _, _), s in zip(CORPUS, out, strict=True)]
    assert got == [(name, exp) for name, _, _, exp in CORPUS], metrics
    assert metrics["reward/timeouts"] == len(TIMEOUTS), metrics
    assert elapsed < len(TIMEOUTS) * 1.0 + 6.0, (elapsed, metrics)
