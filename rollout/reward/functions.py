"""Reward functions: ``(response, ground_truth) -> RewardResult``.

They find the answer with `rollout.reward.parsers` / `rollout.reward.grading.extract_boxed` and compare it
with `rollout.reward.grading.grade_answer`; see those modules for what counts as equal. The result is a
typed `RewardResult` (format, answer and total reward), not a dict of string keys, so a misspelt field is
an error where it is written rather than a silent zero where it is read.

>>> r1_zero_reward("2 + 3 = 5 </think> <answer> 5 </answer>", "5")
RewardResult(format_reward=1.0, answer_reward=1.0, reward=1.0)
>>> r1_zero_reward("2 + 3 = 5 </think> <answer> 6 </answer>", "5").reward
0.0
>>> question_only_reward("The sum is \\\\boxed{5}.", "5").reward
1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from rollout.reward.grading import extract_boxed, grade_answer
from rollout.reward.parsers import parse_gsm8k_response

__all__ = [
    "REWARD_FNS",
    "RewardFn",
    "RewardResult",
    "check_result",
    "get_reward_fn",
    "question_only_reward",
    "r1_zero_answer",
    "r1_zero_reward",
]


@dataclass(frozen=True)
class RewardResult:
    """One response's scores: `format_reward` (the answer could be found), `answer_reward` (it is right)
    and `reward` (what the learner optimises). All finite floats."""

    format_reward: float
    answer_reward: float
    reward: float

    def __post_init__(self) -> None:
        for name in ("format_reward", "answer_reward", "reward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"RewardResult.{name} must be a finite float, got {value!r}")

    @classmethod
    def graded(cls, formatted: bool, correct: bool) -> RewardResult:
        """Binary scores: reward = answer reward = formatted and correct (no partial format credit)."""
        answer = float(formatted and correct)
        return cls(format_reward=float(formatted), answer_reward=answer, reward=answer)

    def as_dict(self) -> dict[str, float]:
        """The fields by name, for per-sample records (JSON)."""
        return asdict(self)


RewardFn = Callable[[str, str], RewardResult]


def check_result(out: object) -> RewardResult:
    """`out` if it is a `RewardResult` (its fields are checked finite when it is built), else TypeError."""
    if not isinstance(out, RewardResult):
        raise TypeError(
            f"reward fn must return a RewardResult (from rollout.reward import RewardResult), got "
            f"{type(out).__name__}: {out!r:.200}"
        )
    return out

_THINK_ANSWER = "</think> <answer>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def r1_zero_answer(response: str) -> str | None:
    """The answer of an R1-Zero-formatted response, or None if the response is not formatted.

    `response` is what the model wrote after the prompt's trailing ``<think>``. It is formatted iff it
    contains ``</think> <answer>`` (exactly as in CS336's ``r1_zero_reward_fn``) and its last ``<answer>``
    is closed by a later ``</answer>``; the answer is the text between them, or the content of its last
    ``\\boxed{}`` when it has one ("" when that box is not closed).

    >>> r1_zero_answer("think </think> <answer> the total is \\\\boxed{18} </answer>")
    '18'
    >>> r1_zero_answer("think </think><answer> 18 </answer>") is None
    True
    """
    if _THINK_ANSWER not in response:
        return None
    start = response.rfind("<answer>") + len("<answer>")
    end = response.find("</answer>", start)
    if end < 0:
        return None
    answer = response[start:end]
    if any(cmd in answer for cmd in _BOX_COMMANDS):
        return extract_boxed(answer) or ""
    return answer


def r1_zero_reward(response: str, ground_truth: str) -> RewardResult:
    """CS336 ``r1_zero_reward_fn``: format 1 iff `r1_zero_answer` finds the ``</think> <answer> …
    </answer>`` structure; answer 1 iff it is formatted and its answer equals `ground_truth`
    (`rollout.reward.grading.grade_answer`); reward = answer reward. A formatted wrong answer earns nothing
    (no partial format credit, which models learn to farm); an unformatted response scores all zeros
    even if its answer is right.
    """
    answer = r1_zero_answer(response)
    if answer is None:
        return RewardResult.graded(False, False)
    return RewardResult.graded(True, grade_answer(answer, ground_truth).correct)


def question_only_reward(response: str, ground_truth: str) -> RewardResult:
    """Grade the content of the last ``\\boxed{}`` (or, with no box, the last number) in `response`
    against `ground_truth`. Format 1 iff some answer was found; reward = answer reward. A response whose
    last box is not closed (``\\boxed{5``) has no answer: the box was its answer and it is malformed.

    >>> question_only_reward("48 + 24 = 72 clips.", "72")
    RewardResult(format_reward=1.0, answer_reward=1.0, reward=1.0)
    >>> question_only_reward("so \\\\boxed{72", "72").format_reward
    0.0
    """
    if any(cmd in response for cmd in _BOX_COMMANDS):
        answer = extract_boxed(response)
    else:
        answer = parse_gsm8k_response(response)
    if answer is None:
        return RewardResult.graded(False, False)
    return RewardResult.graded(True, grade_answer(answer, ground_truth).correct)


REWARD_FNS: dict[str, RewardFn] = {"r1_zero": r1_zero_reward, "question_only": question_only_reward}


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as `name` in `REWARD_FNS`."""
    if name not in REWARD_FNS:
        raise KeyError(
            f"unknown reward function {name!r}; known: {sorted(REWARD_FNS)}, or write 'package.module:function'"
        )
    return REWARD_FNS[name]
