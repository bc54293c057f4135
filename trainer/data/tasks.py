"""Tasks: lists of `Example` (question, normalised gold answer, optional worked solution).

- ``gsm8k``: a local JSONL file ``{"question", "answer"}`` (or a folder holding ``{split}.jsonl``), or a
  Hugging Face hub id (default ``openai/gsm8k``, config ``main``; needs the optional ``datasets``
  package). The gold is the text after ``####`` with commas, ``$`` and spaces removed.
- ``math``: MATH-style JSONL ``{"problem", "answer"}`` or ``{"problem", "solution"}`` (gold = the last
  ``\\boxed{}`` of the solution, nested braces handled); same file/folder rules as GSM8K.
- ``arithmetic`` / ``arithmetic:<level>``: small exact-answer arithmetic built in code (`make_arithmetic`)
  for the CPU demo and learning tests. ``arithmetic:<level>:heldout`` splits the problems themselves: about
  a quarter (a fixed hash of the expression) are test/validation-only and training never draws them.

File order is kept; ``limit`` takes the first examples. ``seed`` only affects generated tasks.

>>> make_arithmetic(2, seed=0, level=1)[0].question
'What is 0 + 8?'
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout.reward.grading import extract_boxed
from trainer.data.jsonl import DatasetFormatError, read_jsonl

__all__ = [
    "ARITHMETIC_LEVELS",
    "DatasetFormatError",
    "Example",
    "load_gsm8k",
    "load_math",
    "load_task",
    "make_arithmetic",
    "normalize_gsm8k_answer",
]

GSM8K_HUB_ID = "openai/gsm8k"


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # normalised gold answer, compared by `rollout.reward.grading.grade_answer`
    solution: str = ""  # worked solution when the source has one (used by SFT)


# --------------------------------------------------------------------------------------------------
# Local JSONL reading


def _resolve_file(source: str | Path, split: str, task: str) -> Path:
    path = Path(source)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{task} data not found: {path} (give a .jsonl file or a folder holding {split}.jsonl)"
        )
    return path


def _field(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in record else f"{type(value).__name__} {value!r:.60}"
        raise DatasetFormatError(
            f"{where}: field {key!r} must be a non-empty string ({got}); keys: {sorted(record)}"
        )
    return value


def _not_empty(examples: list[Example], path: Path, limit: int | None, fields: str) -> list[Example]:
    """`examples`, or a `DatasetFormatError` naming the file when it held no record at all (an empty or
    blank-only file), which would otherwise surface far from the file (an empty question sampler)."""
    if not examples and limit != 0:
        raise DatasetFormatError(f"{path}: no records (the file is empty or holds only blank lines); "
                                 f"expected one JSON object {fields} per line")
    return examples


# --------------------------------------------------------------------------------------------------
# GSM8K


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


def _gsm8k_example(question: str, answer: str, where: str) -> Example:
    try:
        gold = normalize_gsm8k_answer(answer)
    except ValueError as err:
        raise DatasetFormatError(f"{where}: field 'answer' is not GSM8K-style: {err}") from None
    return Example(question=question.strip(), answer=gold, solution=answer.strip())


def load_gsm8k(
    source: str | Path | None = None, split: str = "train", limit: int | None = None
) -> list[Example]:
    """GSM8K from a JSONL file, a folder with ``{split}.jsonl``, or a hub id (default ``openai/gsm8k``)."""
    source = GSM8K_HUB_ID if source is None else source
    if Path(source).exists() or str(source).endswith(".jsonl"):
        path = _resolve_file(source, split, "GSM8K")
        examples = [
            _gsm8k_example(
                _field(r, "question", f"{path}:{n}"), _field(r, "answer", f"{path}:{n}"), f"{path}:{n}"
            )
            for n, r in read_jsonl(path, limit=limit)
        ]
        return _not_empty(examples, path, limit, '{"question", "answer"}')
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"loading GSM8K from the hub ({source!r}) needs the optional 'datasets' package "
            "(pip install datasets), or pass a local JSONL file or folder as the source"
        ) from None
    rows = datasets.load_dataset(str(source), "main", split=split)
    out = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        where = f"{source}[{split}]:{i}"
        out.append(_gsm8k_example(_field(row, "question", where), _field(row, "answer", where), where))
    return out


# --------------------------------------------------------------------------------------------------
# MATH


def load_math(source: str | Path, split: str = "train", limit: int | None = None) -> list[Example]:
    """MATH-style JSONL: ``{"problem", "answer"}``, or ``{"problem", "solution"}`` whose last ``\\boxed{}``
    is the gold. The solution is kept when present."""
    path = _resolve_file(source, split, "MATH")
    out = []
    for n, record in read_jsonl(path, limit=limit):
        where = f"{path}:{n}"
        problem = _field(record, "problem", where)
        solution = record.get("solution", "")
        if not isinstance(solution, str):
            raise DatasetFormatError(
                f"{where}: field 'solution' must be a string, got {type(solution).__name__}"
            )
        if "answer" in record:
            gold = _field(record, "answer", where).strip()
        elif solution:
            boxed = extract_boxed(solution)
            if boxed is None or not boxed.strip():
                raise DatasetFormatError(
                    f"{where}: no 'answer' field and no complete \\boxed{{...}} in 'solution'"
                )
            gold = boxed.strip()
        else:
            raise DatasetFormatError(
                f"{where}: needs an 'answer' or a 'solution' field; keys: {sorted(record)}"
            )
        out.append(Example(question=problem.strip(), answer=gold, solution=solution.strip()))
    return _not_empty(out, path, limit, '{"problem", "answer" or "solution"}')


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
    name: str, source: str | Path | None = None, split: str = "train", limit: int | None = None, seed: int = 0
) -> list[Example]:
    """Load task `name`: ``gsm8k`` (source: JSONL file, folder or hub id; default ``openai/gsm8k``),
    ``math`` (source: JSONL file or folder, required), or ``arithmetic`` / ``arithmetic:<level>``
    (generated; default level 2; `limit` examples, default 2000 for train and 200 for test/validation;
    each (split, seed) pair has its own random stream). Generated splits are independent draws, not
    disjoint sets: level 1 has only 100 distinct questions, so its test questions all occur in a 2000-
    example train split (level 2: 28 of 200, level 3: 38 of 200); ``arithmetic:<level>:heldout`` makes
    them disjoint (`is_heldout_problem`), so evaluation is on questions training never saw.

    >>> [e.question for e in load_task("arithmetic:1", split="test", limit=2)]
    ['What is 2 + 1?', 'What is 3 + 9?']
    """
    if limit is not None and limit < 0:
        raise ValueError(f"load_task limit must be >= 0 or None, got {limit}")
    base, _, arg = name.partition(":")
    if base == "gsm8k" and not arg:
        return load_gsm8k(source, split=split, limit=limit)
    if base == "math" and not arg:
        if source is None:
            raise ValueError(
                "task 'math' needs a source: a MATH-style .jsonl file or a folder holding {split}.jsonl"
            )
        return load_math(source, split=split, limit=limit)
    if base == "arithmetic":
        if source is not None:
            raise ValueError(f"task 'arithmetic' is generated in code and takes no source (got {source!r})")
        level_text, _, variant = arg.partition(":")
        try:
            level = int(level_text) if level_text else 2
        except ValueError:
            raise ValueError(
                f"task {name!r}: level after ':' must be an integer, e.g. 'arithmetic:3'"
            ) from None
        if variant not in ("", "heldout"):
            raise ValueError(f"task {name!r}: the only variant is ':heldout', e.g. 'arithmetic:1:heldout'")
        if split not in _SPLITS:
            raise ValueError(f"task 'arithmetic' has splits {_SPLITS}, got {split!r}")
        n = limit if limit is not None else ARITHMETIC_SIZES[split]
        part = ("train" if split == "train" else "heldout") if variant else None
        return make_arithmetic(n, seed=seed * len(_SPLITS) + _SPLITS.index(split), level=level, part=part)
    raise ValueError(f"unknown task {name!r}; known: 'gsm8k', 'math', 'arithmetic', 'arithmetic:<level 1-5>', "
                     "'arithmetic:<level>:heldout'")
