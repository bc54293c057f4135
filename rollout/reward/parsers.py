"""Answer parsers for model outputs (CS336 assignment 5 semantics).

These are the only answer extractors in the project: rewards and evaluators import them rather than
re-implementing them.

>>> parse_gsm8k_response("48/2 = 24 clips in May, so 48 + 24 = 72 in total.")
'72'
>>> parse_gsm8k_response("She paid $1,250.50.")
'1250.50'
>>> parse_gsm8k_response("no digits here") is None
True
>>> parse_mmlu_response({"options": ["x", "y", "z", "w"]}, "The correct answer is B.")
'B'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["parse_gsm8k_response", "parse_mmlu_response"]

# A number: optional minus (not after a digit, letter or ")" so "3-5" yields 5, not -5), then either
# digits grouped by thousands separators or plain ASCII digits, then an optional decimal part; or a
# decimal part alone (".75", "$.50": not 75 and 50). A decimal point right after a digit starts no number
# ("1.2.3" yields 3). Unicode digits (e.g. "١٨", "１８") are deliberately not numbers: graders compare
# ASCII answers.
_NUMBER = re.compile(
    r"(?<![0-9A-Za-z)\]}])-?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)"
)

_MMLU_LETTER = re.compile(r"[Tt]he correct answer is\s*[:\-]?\s*\(?([ABCD])(?![A-Za-z0-9])")
_MMLU_TEXT = re.compile(r"[Tt]he correct answer is\s*[:\-]?\s*(.+)")


def parse_gsm8k_response(text: str) -> str | None:
    """The last number in `text` as a string with thousands separators removed, or None.

    The sign is kept ("-5"); a trailing sentence period is not part of the number ("18." → "18"); the
    decimal part is returned as written ("2.50" → "2.50").

    >>> parse_gsm8k_response("It costs -5 degrees, then 1,000 more.")
    '1000'
    """
    last: str | None = None
    for match in _NUMBER.finditer(text):
        last = match.group(0)
    return None if last is None else last.replace(",", "")


def parse_mmlu_response(example: Mapping[str, Any], text: str) -> str | None:
    """The chosen option letter "A"–"D" from a response of the form "The correct answer is B…", or None.

    If the phrase is followed by exactly one option's text instead of its letter, that option's letter is
    returned (`example["options"]` holds the four option strings). Anything else ("The correct answer is 10000
    polyomaviruses.") gives None. The last such phrase in the response wins.

    >>> parse_mmlu_response({"options": ["1", "2", "3", "4"]}, "The correct answer is 10000 polyomaviruses.")
    """
    letters = _MMLU_LETTER.findall(text)
    if letters:
        return str(letters[-1])
    options = example.get("options") or []
    phrases = _MMLU_TEXT.findall(text)
    if not phrases:
        return None
    said = _squash(phrases[-1])
    for letter, option in zip("ABCD", options, strict=False):
        if said and said == _squash(str(option)):
            return letter
    return None


def _squash(s: str) -> str:
    return " ".join(s.strip().rstrip(".").lower().split())
