"""Prompt templates as data. Each template is a `str.format` string with named fields.

- ``r1_zero``: the DeepSeek-R1-Zero prompt used by CS336 assignment 5 (the response continues after
  ``<think>``; the reward expects ``... </think> <answer> ... </answer>``).
- ``question_only``: the bare question.
- ``alpaca``: the Alpaca instruction template used for SFT and DPO (fields ``instruction``, ``response``).

Users add their own through the config (`register_template`).
"""

from __future__ import annotations

R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>.\nUser: {question}\nAssistant: <think>"
)
QUESTION_ONLY = "{question}"
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}"
)

TEMPLATES: dict[str, str] = {"r1_zero": R1_ZERO, "question_only": QUESTION_ONLY, "alpaca": ALPACA}


def register_template(name: str, template: str) -> None:
    """Add a user template; it must be a valid format string."""
    try:
        template.format_map(_AnyFields())
    except (ValueError, IndexError) as err:
        raise ValueError(f"prompt template {name!r} is not a valid format string: {err}") from err
    TEMPLATES[name] = template


def get_template(name: str) -> str:
    if name not in TEMPLATES:
        raise KeyError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def format_prompt(name: str, **fields: str) -> str:
    """Fill template `name`, e.g. ``format_prompt("r1_zero", question="What is 2 + 3?")``."""
    template = get_template(name)
    try:
        return template.format(**fields)
    except KeyError as err:
        raise KeyError(f"prompt template {name!r} needs field {err.args[0]!r}; got {sorted(fields)}") from None


class _AnyFields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""
