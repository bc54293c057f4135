"""Tasks: lists of `Example` (question, normalised gold answer, optional worked solution).

- ``gsm8k``, ``math``, ``custom``: records from a hub id or a local JSONL / JSON / Parquet file or folder
  (`trainer.data.sources`), whose question and gold answer are in named columns (`Columns`). The presets:
  GSM8K reads ``question`` and ``answer``, the gold being the text after ``####`` with commas, ``$`` and
  spaces removed (default source ``openai/gsm8k``, configuration ``main``); MATH reads ``problem`` and
  ``answer``, or, where a record has no ``answer``, the last ``\\boxed{}`` of ``solution`` (nested braces
  handled); ``custom`` reads ``question`` and ``answer`` as they are. `columns_for` applies a config's
  column names and answer parser (``gsm8k``, ``boxed``, ``plain``) over a preset.
- ``arithmetic`` / ``arithmetic:<level>``: small exact-answer arithmetic built in code (`make_arithmetic`)
  for the CPU demo and learning tests. ``arithmetic:<level>:heldout`` splits the problems themselves: about
  a quarter (a fixed hash of the expression) are test/validation-only and training never draws them.

File order is kept; ``limit`` takes the first examples. ``seed`` only affects generated tasks.

>>> make_arithmetic(2, seed=0, level=1)[0].question
'What is 0 + 8?'
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from rollout.reward.grading import extract_boxed
from trainer.data.jsonl import DatasetFormatError
from trainer.data.sources import DatasetUnavailableError, read_records

__all__ = [
    "ARITHMETIC_LEVELS",
    "PRESETS",
    "AnswerParser",
    "Columns",
    "DatasetFormatError",
    "DatasetUnavailableError",
    "Example",
    "columns_for",
    "load_gsm8k",
    "load_math",
    "load_records",
    "load_task",
    "make_arithmetic",
    "normalize_gsm8k_answer",
    "parse_answer",
]

GSM8K_HUB_ID = "openai/gsm8k"
AnswerParser = Literal["gsm8k", "boxed", "plain"]


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # normalised gold answer, compared by `rollout.reward.grading.grade_answer`
    solution: str = ""  # worked solution when the source has one (used by SFT)


@dataclass(frozen=True)
class Columns:
    """Where a record holds the question and the gold, and how the gold is read. `answers` are (column,
    parser) pairs: the first column the record has (not null) gives the gold. `solution` names the column kept as the
    worked solution (default: the answer column's text when its parser extracts the gold from it).
    `hub_config`: the hub dataset's configuration name (`datasets.load_dataset`'s ``name``)."""

    question: str = "question"
    answers: tuple[tuple[str, AnswerParser], ...] = (("answer", "plain"),)
    solution: str | None = None
    hub_config: str | None = None
    what: str = "custom"  # the task's name in messages


PRESETS: dict[str, Columns] = {
    "gsm8k": Columns("question", (("answer", "gsm8k"),), "answer", what="GSM8K"),
    "math": Columns("problem", (("answer", "plain"), ("solution", "boxed")), "solution", what="MATH"),
    "custom": Columns(),
}


def columns_for(task: str, question: str | None = None, answer: str | None = None,
                parser: AnswerParser | None = None, hub_config: str | None = None) -> Columns:
    """The `PRESETS` entry of `task` with the given column names, answer parser and hub configuration in
    place of the preset's (None keeps the preset's). A named answer column or parser replaces the preset's
    answer rule by that one column: `parser` defaults to the preset's parser for that column, else plain.

    >>> columns_for("gsm8k", question="prompt", answer="target", parser="plain").answers
    (('target', 'plain'),)
    """
    if task not in PRESETS:
        raise ValueError(f"task {task!r} has no column preset; known: {sorted(PRESETS)}")
    base = PRESETS[task]
    cols = replace(base, question=question or base.question, hub_config=hub_config or base.hub_config)
    if answer is None and parser is None:
        return cols
    column = answer or base.answers[0][0]
    chosen: AnswerParser = parser or dict(base.answers).get(column, "plain")
    return replace(cols, answers=((column, chosen),), solution=base.solution if base.solution == column else None)


# --------------------------------------------------------------------------------------------------
# Answer parsers


def normalize_gsm8k_answer(text: str) -> str:
    """The GSM8K gold: text after the last ``####``, without commas, ``$`` and spaces.

    >>> normalize_gsm8k_answer("48 + 24 = 72\\n#### $1,080")
    '1080'
    """
    if "####" not in text:
        raise ValueError("no '####' before the final answer")
    gold = text.rsplit("####", 1)[1]
    for junk in (",", "$", " ", "\t", "\n"):
        gold = gold.replace(junk, "")
    if not gold:
        raise ValueError("empty final answer after '####'")
    return gold


def parse_answer(text: str, parser: AnswerParser) -> str:
    """The gold answer in `text`: ``gsm8k`` after the last ``####``; ``boxed`` the last complete
    ``\\boxed{}``; ``plain`` the text itself. Raises ValueError when there is none.

    >>> [parse_answer(t, p) for t, p in [("so #### 1,2", "gsm8k"), ("$\\\\boxed{\\\\frac{1}{2}}$", "boxed"), (" 7 ", "plain")]]
    ['12', '\\\\frac{1}{2}', '7']
    """
    if parser == "gsm8k":
        return normalize_gsm8k_answer(text)
    gold = extract_boxed(text) if parser == "boxed" else text
    if gold is None or not gold.strip():
        raise ValueError("no complete \\boxed{...}" if parser == "boxed" else "empty answer")
    return gold.strip()


# --------------------------------------------------------------------------------------------------
# Loading records


def _text(record: dict[str, Any], key: str, where: str, numbers: bool = False) -> str:
    """The non-empty string in `record[key]` (a number too, as its ``str``, where `numbers`)."""
    value = record.get(key)
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise DatasetFormatError(f"{where}: field {key!r} is {value}, not a finite number")
        return str(value)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in record else f"{type(value).__name__} {value!r:.60}"
        raise DatasetFormatError(
            f"{where}: field {key!r} must be a non-empty string ({got}); keys: {sorted(record)} "
            "(data.question_column / data.answer_column name the columns)"
        )
    return value


def _example(record: dict[str, Any], cols: Columns, where: str) -> Example:
    question = _text(record, cols.question, where)
    present = [(c, p) for c, p in cols.answers if record.get(c) is not None]  # a null cell (Parquet) is absent
    if not present and len(cols.answers) > 1:
        names = " or a ".join(repr(c) for c, _ in cols.answers)
        raise DatasetFormatError(f"{where}: needs a {names} field; keys: {sorted(record)}")
    column, parser = (present or list(cols.answers))[0]
    text = _text(record, column, where, numbers=parser == "plain")
    try:
        gold = parse_answer(text, parser)
    except ValueError as err:
        if parser == "gsm8k":
            raise DatasetFormatError(f"{where}: field {column!r} is not GSM8K-style: {err}") from None
        missing = "".join(f"no {c!r} field and " for c, _ in cols.answers[: cols.answers.index((column, parser))])
        raise DatasetFormatError(f"{where}: {missing}{err} in {column!r}") from None
    solution = (record.get(cols.solution) or "") if cols.solution else (text if parser != "plain" else "")
    if not isinstance(solution, str):
        raise DatasetFormatError(f"{where}: field {cols.solution!r} must be a string, got {type(solution).__name__}")
    return Example(question=question.strip(), answer=gold, solution=solution.strip())


def load_records(source: str | Path, cols: Columns, split: str = "train", limit: int | None = None) -> list[Example]:
    """The examples of `split` of `source` (a hub id or a local file or folder), read with `cols`."""
    name, records = read_records(source, split, limit, cols.hub_config, cols.what)
    examples = [_example(record, cols, where) for where, record in records]
    if not examples and limit != 0:
        fields = ", ".join(f'"{c}"' for c, _ in cols.answers[:1]) + "".join(f' or "{c}"' for c, _ in cols.answers[1:])
        raise DatasetFormatError(f"{name}: no records (the file is empty or holds only blank lines); "
                                 f'expected one JSON object {{"{cols.question}", {fields}}} per line')
    return examples


def load_gsm8k(
    source: str | Path | None = None, split: str = "train", limit: int | None = None
) -> list[Example]:
    """GSM8K from a local file, a folder with ``{split}.jsonl`` (``.json``, ``.parquet``), or a hub id
    (default ``openai/gsm8k``)."""
    return load_records(GSM8K_HUB_ID if source is None else source, PRESETS["gsm8k"], split, limit)


def load_math(source: str | Path, split: str = "train", limit: int | None = None) -> list[Example]:
    """MATH-style records: ``{"problem", "answer"}``, or ``{"problem", "solution"}`` whose last
    ``\\boxed{}`` is the gold. The solution is kept when present."""
    return load_records(source, PRESETS["math"], split, limit)


# --------------------------------------------------------------------------------------------------
# Synthetic arithmetic


def _level1(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} + {b}", a + b


def _level2(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"{a} + {b}", a + b
    a, b = max(a, b), min(a, b)
    return f"{a} - {b}", a - b


def _level3(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 99)
        return f"{a} * {b}", a * b
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return (f"{a} + {b}", a + b) if op == "+" else (f"{a} - {b}", a - b)


def _level4(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    form = rng.randrange(3)
    if form == 0:
        return f"({a} + {b}) * {c}", (a + b) * c
    if form == 1:
        return f"{a} * {c} - {b}", a * c - b
    return f"({a} - {b}) * {c}", (a - b) * c


def _level5(rng: random.Random) -> tuple[str, int]:
    q, d, c = rng.randint(2, 50), rng.randint(2, 12), rng.randint(1, 99)
    if rng.random() < 0.5:
        return f"{q * d} / {d} + {c}", q + c
    return f"({q * d} - {c * d}) / {d}", q - c


ARITHMETIC_LEVELS: dict[int, tuple[str, Callable[[random.Random], tuple[str, int]]]] = {
    1: ("single-digit addition", _level1),
    2: ("two-digit addition and subtraction (non-negative results)", _level2),
    3: ("up to three-digit +/- (negative results possible) and small multiplication", _level3),
    4: ("two-step expressions with parentheses and multiplication", _level4),
    5: ("two-step expressions with exact division", _level5),
}


def is_heldout_problem(expr: str) -> bool:
    """Whether `expr` belongs to the held-out quarter of the problems (``arithmetic:<level>:heldout``).

    >>> [is_heldout_problem(e) for e in ("2 + 1", "2 + 2")]
    [True, False]
    """
    return zlib.crc32(expr.encode()) % 4 == 0


def make_arithmetic(n: int, seed: int = 0, level: int = 2, part: str | None = None) -> list[Example]:
    """`n` questions "What is <expr>?" with exact integer answers; the same (n, seed, level) gives the
    same list, and a longer list starts with the shorter one. Levels: see `ARITHMETIC_LEVELS`. `part`
    ``"heldout"`` / ``"train"`` draws only problems that are / are not `is_heldout_problem`.

    >>> [(e.question, e.answer, e.solution) for e in make_arithmetic(1, seed=3, level=3)]
    [('What is 12 * 81?', '972', '12 * 81 = 972')]
    """
    if level not in ARITHMETIC_LEVELS:
        raise ValueError(f"arithmetic level must be one of {sorted(ARITHMETIC_LEVELS)}, got {level}")
    if n < 0:
        raise ValueError(f"make_arithmetic n must be >= 0, got {n}")
    rng = random.Random(f"arithmetic-{level}-{seed}")
    make = ARITHMETIC_LEVELS[level][1]
    out: list[Example] = []
    while len(out) < n:
        expr, value = make(rng)
        if part is not None and is_heldout_problem(expr) != (part == "heldout"):
            continue
        out.append(Example(question=f"What is {expr}?", answer=str(value), solution=f"{expr} = {value}"))
    return out


# --------------------------------------------------------------------------------------------------
# Dispatcher

ARITHMETIC_SIZES = {"train": 2000, "test": 200, "validation": 200}
_SPLITS = ("train", "test", "validation")


def load_task(
    name: str, source: str | Path | None = None, split: str = "train", limit: int | None = None, seed: int = 0,
    columns: Columns | None = None,
) -> list[Example]:
    """Load task `name`: ``gsm8k`` (source: a hub id or a local file or folder; default ``openai/gsm8k``),
    ``math`` or ``custom`` (source required), read with `columns` (default: the task's `PRESETS` entry);
    or ``arithmetic`` / ``arithmetic:<level>`` (generated; default level 2; `limit` examples, default 2000
    for train and 200 for test/validation; each (split, seed) pair has its own random stream). Generated
    splits are independent draws, not disjoint sets: level 1 has only 100 distinct questions, so its test
    questions all occur in a 2000-example train split (level 2: 28 of 200, level 3: 38 of 200);
    ``arithmetic:<level>:heldout`` makes them disjoint (`is_heldout_problem`), so evaluation is on
    questions training never saw.

    >>> [e.question for e in load_task("arithmetic:1", split="test", limit=2)]
    ['What is 2 + 1?', 'What is 3 + 9?']
    """
    if limit is not None and limit < 0:
        raise ValueError(f"load_task limit must be >= 0 or None, got {limit}")
    base, _, arg = name.partition(":")
    if base in PRESETS and not arg:
        if source is None and base != "gsm8k":
            raise ValueError(f"task {base!r} needs a source: a hub dataset id, or a local .jsonl, .json or .parquet "
                             "file (or a folder holding {split}.jsonl)")
        return load_records(GSM8K_HUB_ID if source is None else source, columns or PRESETS[base], split, limit)
    if base == "arithmetic":
        return _load_arithmetic(name, arg, source, split, limit, seed)
    raise ValueError(f"unknown task {name!r}; known: 'gsm8k', 'math', 'custom', 'arithmetic', "
                     "'arithmetic:<level 1-5>', 'arithmetic:<level>:heldout'")


def _load_arithmetic(name: str, arg: str, source: str | Path | None, split: str, limit: int | None,
                     seed: int) -> list[Example]:
    if source is not None:
        raise ValueError(f"task 'arithmetic' is generated in code and takes no source (got {source!r})")
    level_text, _, variant = arg.partition(":")
    try:
        level = int(level_text) if level_text else 2
    except ValueError:
        raise ValueError(f"task {name!r}: level after ':' must be an integer, e.g. 'arithmetic:3'") from None
    if variant not in ("", "heldout"):
        raise ValueError(f"task {name!r}: the only variant is ':heldout', e.g. 'arithmetic:1:heldout'")
    if split not in _SPLITS:
        raise ValueError(f"task 'arithmetic' has splits {_SPLITS}, got {split!r}")
    n = limit if limit is not None else ARITHMETIC_SIZES[split]
    part = ("train" if split == "train" else "heldout") if variant else None
    return make_arithmetic(n, seed=seed * len(_SPLITS) + _SPLITS.index(split), level=level, part=part)
