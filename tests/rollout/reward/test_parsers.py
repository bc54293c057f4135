"""Hand cases for `rollout.reward.parsers` (CS336 assignment 5 adapters: parse_gsm8k_response, parse_mmlu_response)."""

from __future__ import annotations

import pytest

from rollout.reward.parsers import parse_gsm8k_response, parse_mmlu_response

MMLU_EXAMPLE = {
    "subject": "virology",
    "question": "How many human polyomaviruses are known at present?",
    "options": ["100", "1", "10", "unknown"],
    "answer": "A",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # CS336's example: the last number wins.
        ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.", "72"),
        ("So the answer is 72.", "72"),  # trailing sentence period is not a decimal point
        ("It costs $1,250 in total", "1250"),  # thousands separators removed
        ("1,000,000 people", "1000000"),
        ("She paid $2.50 each", "2.50"),  # decimal kept as written
        ("The temperature is -5 degrees", "-5"),
        ("pages 3-5", "5"),  # a hyphen after a digit is not a sign
        ("x-2", "2"),
        ("12,34", "34"),  # not a thousands group: two numbers
        ("first 7 then 8", "8"),
        ("0.5", "0.5"),
        ("Each costs $.75.", ".75"),  # a decimal part alone is that number, not 75
        ("a drop of -.5 degrees", "-.5"),
        ("version 1.2.3", "3"),  # a point after a digit starts no number
        ("answer: 007", "007"),
        ("\\boxed{18}", "18"),
        ("no numbers here", None),
        ("", None),
        ("١٨ and ١٩", None),  # Arabic-Indic digits are not ASCII numbers
    ],
)
def test_parse_gsm8k_response(text: str, expected: str | None) -> None:
    assert parse_gsm8k_response(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The correct answer is B. Polyomaviruses are ...", "B"),  # CS336's example
        ("The correct answer is 10000 polyomaviruses.", None),  # CS336's example: not an option
        ("The correct answer is (C)", "C"),
        ("I think the correct answer is: D", "D"),
        ("The correct answer is A. Wait, no. The correct answer is C.", "C"),  # last statement wins
        ("The correct answer is unknown.", "D"),  # an option's exact text maps to its letter
        ("The correct answer is 10.", "C"),
        ("The correct answer is Beta.", None),  # a word starting with B is not "B"
        ("The answer is B", None),  # the phrase is required
        ("", None),
    ],
)
def test_parse_mmlu_response(text: str, expected: str | None) -> None:
    assert parse_mmlu_response(MMLU_EXAMPLE, text) == expected


def test_parse_mmlu_response_without_options() -> None:
    assert parse_mmlu_response({}, "The correct answer is A") == "A"
    assert parse_mmlu_response({}, "The correct answer is something else") is None
