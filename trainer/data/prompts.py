"""Prompt templates as data. Each template is a `str.format` string with named fields.

- ``r1_zero``: the DeepSeek-R1-Zero prompt used by CS336 assignment 5 (the response continues after
  ``<think>``; the reward expects ``... </think> <answer> ... </answer>``).
- ``question_only``: the bare question.
- ``alpaca``: the Alpaca instruction template used for SFT and DPO (fields ``instruction``, ``response``).
- ``chat`` / ``chat:<name>``: the model's own chat template (``tokenizer.apply_chat_template`` with
  ``add_generation_prompt=True``) around a user message; `register_chat_template` renders it once per
  run into a format string like the others. ``chat`` and ``chat:question_only`` send the bare question
  (reward ``question_only``: the last number or ``\\boxed{}`` is graded, so an instruct model scores
  zero-shot); ``chat:r1_zero`` puts the R1-Zero instructions in the system message and starts the
  assistant turn with ``<think>`` (reward ``r1_zero``); ``chat:pair`` is the DPO/SFT form (user
  ``{instruction}``, assistant ``{response}``, e.g. ``dpo.template: chat:pair``); ``chat:<other>`` sends
  template ``<other>`` as the user message, with the model's default system message.

Users add their own through the config (`register_template`).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

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

BUILT_IN: Mapping[str, str] = MappingProxyType({"r1_zero": R1_ZERO, "question_only": QUESTION_ONLY, "alpaca": ALPACA})
TEMPLATES: dict[str, str] = dict(BUILT_IN)  # grows as sessions register user and chat templates

CHAT_PREFIX = "chat"
R1_ZERO_SYSTEM = R1_ZERO.split("\nUser:")[0]
# chat template name -> (system message or None for the model's default, user message, assistant prefix)
CHAT_PARTS: dict[str, tuple[str | None, str, str]] = {
    "chat": (None, QUESTION_ONLY, ""),
    "chat:question_only": (None, QUESTION_ONLY, ""),
    "chat:r1_zero": (R1_ZERO_SYSTEM, QUESTION_ONLY, "<think>"),
    "chat:pair": (None, "{instruction}", "{response}"),  # SFT/DPO pairs (fields of `ALPACA`)
}
QUESTION_FIELDS = frozenset({"question"})  # what GRPO, EI, the warm start and evaluation fill
PAIR_FIELDS = frozenset({"instruction", "response"})  # what SFT and DPO pairs fill
_SLOT = "\u241fUSER\u241f"  # stands for the user message while the chat template renders


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


def template_fields(template: str) -> set[str]:
    """The named fields of a format string, e.g. ``{"question"}``; `ValueError` if it is not one (an unmatched
    brace) or uses a positional field (``{}``, ``{0}``), which no caller fills."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as err:
        raise ValueError(f"{err}: write a literal brace as {{{{ or }}}}") from None
    names = {field.split(".")[0].split("[")[0] for field in fields}
    if any(not name or name.isdigit() for name in names):
        raise ValueError("a positional field ({} or {0}) is never filled: name it, e.g. {question}")
    return names


def template_problems(key: str, name: str, fields: frozenset[str], user: Mapping[str, str]) -> list[str]:
    """Why template `name` (a config value at `key`) cannot be filled with exactly `fields`, given the user
    templates `user` (``data.templates``): an unknown name, or other fields than its use provides. Checked
    when the config loads, so a typo is a config error before any model loads. Messages hold no "; "."""
    known = {**BUILT_IN, **user}  # not TEMPLATES: what earlier runs in this process registered is no choice
    choices = f"built in: {', '.join(sorted(BUILT_IN))}, chat, chat:<template>, or a name under data.templates"
    inner = name.partition(":")[2] if is_chat_template(name) else name
    if name in CHAT_PARTS:
        text = CHAT_PARTS[name][1] + CHAT_PARTS[name][2]
    elif inner in known:
        text = known[inner]
    else:
        return [f"{key}={name!r}: no prompt template {inner!r} ({choices})"]
    try:
        used = template_fields(text)
    except ValueError:
        return []  # reported under data.templates
    if used != fields:
        return [f"{key}={name!r} has the fields {sorted(used)}, but it is filled with {sorted(fields)}: "
                "choose a template with exactly those"]
    return []


def is_chat_template(name: str) -> bool:
    return name == CHAT_PREFIX or name.startswith(CHAT_PREFIX + ":")


def register_chat_template(name: str, tokenizer: Any) -> str:
    """Render `tokenizer`'s chat template for template `name` (``chat`` or ``chat:<name>``) into a format
    string, register it under `name` and return it. Other names are left alone (returned unchanged).

    The user message is a placeholder while the template renders, so whatever the chat template adds
    (special tokens, a default system message) is kept verbatim and only the message stays a field.
    """
    if not is_chat_template(name):
        return get_template(name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt template {name!r} uses the model's chat template, but its tokenizer has "
                         "none: choose a plain template (e.g. r1_zero or question_only)")
    inner = name.partition(":")[2] or "question_only"
    system, user, prefix = CHAT_PARTS[name] if name in CHAT_PARTS else (None, get_template(inner), "")
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": _SLOT})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str) or rendered.count(_SLOT) != 1:
        raise ValueError(f"prompt template {name!r}: the tokenizer's chat template did not render the user "
                         "message exactly once")
    before, after = (part.replace("{", "{{").replace("}", "}}") for part in rendered.split(_SLOT))
    template = before + user + after + prefix
    register_template(name, template)
    return template


class _AnyFields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""
