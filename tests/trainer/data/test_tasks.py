"""Task loaders (GSM8K, MATH-style JSONL, synthetic arithmetic) and the `load_task` dispatcher."""

from __future__ import annotations

import dataclasses
import gzip
import re
import sys
from pathlib import Path
from typing import IO

import pytest
from helpers import FIXTURES

from rollout.reward import r1_zero_reward
from trainer.data.jsonl import read_jsonl
from trainer.data.tasks import (
    ARITHMETIC_LEVELS,
    DatasetFormatError,
    Example,
    load_gsm8k,
    load_math,
    load_task,
    make_arithmetic,
    normalize_gsm8k_answer,
)


def test_example_is_frozen() -> None:
    ex = Example(question="q", answer="1")
    assert ex.solution == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.answer = "2"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "gold"),
    [("so 7\n#### 7", "7"), ("#### $130,000", "130000"), ("####  -5 ", "-5"), ("a #### 1 #### 2", "2")],
)
def test_normalize_gsm8k_answer(text: str, gold: str) -> None:
    assert normalize_gsm8k_answer(text) == gold


def test_gsm8k_fixture() -> None:
    examples = load_gsm8k(FIXTURES / "gsm8k_tiny.jsonl")
    assert [e.answer for e in examples] == ["7", "130000", "-5"]  # blank line skipped
    assert examples[0] == Example(
        question="Tom has 3 apples and buys 4 more. How many apples does he have?",
        answer="7",
        solution="3 + 4 = <<3+4=7>>7\n#### 7",
    )
    assert load_gsm8k(FIXTURES / "gsm8k_tiny.jsonl", limit=2) == examples[:2]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gsm8k_bad_json.jsonl", r"gsm8k_bad_json\.jsonl:2: invalid JSON"),
        ("gsm8k_no_marker.jsonl", r"gsm8k_no_marker\.jsonl:2: field 'answer' is not GSM8K-style: no '####'"),
        (
            "gsm8k_empty_question.jsonl",
            r"gsm8k_empty_question\.jsonl:2: field 'question' must be a non-empty string",
        ),
    ],
)
def test_gsm8k_bad_lines(name: str, message: str) -> None:
    with pytest.raises(DatasetFormatError, match=message):
        load_gsm8k(FIXTURES / name)


def test_non_utf8_byte_names_file_line_and_column(tmp_path: Path) -> None:
    """A Latin-1 byte (here an 'é', 0xe9) is a DatasetFormatError naming file, line and column, not a
    bare UnicodeDecodeError; for the default reader and for text openers (plain and gzip alike)."""
    path = tmp_path / "latin1.jsonl"
    good = '{"question": "q", "answer": "#### 1"}\n'
    path.write_bytes(good.encode() + '{"question": "caf\u00e9", "answer": "#### 2"}\n'.encode("latin-1"))
    message = r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 18\); re-save the file as UTF-8"
    with pytest.raises(DatasetFormatError, match=message):
        load_gsm8k(path)
    assert len(load_gsm8k(path, limit=1)) == 1  # lines past the limit are never decoded
    with pytest.raises(DatasetFormatError, match=message):
        list(read_jsonl(path, opener=lambda p: p.open(encoding="utf-8")))

    def gzip_text(p: Path) -> IO[str]:
        return gzip.open(p, "rt", encoding="utf-8")

    gz = tmp_path / "latin1.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(DatasetFormatError, match=r"latin1\.jsonl\.gz:2: not valid UTF-8 \(byte 0xe9"):
        list(read_jsonl(gz, opener=gzip_text))


def test_real_gsm8k(gsm8k_dir: Path) -> None:
    train = load_gsm8k(gsm8k_dir, split="train")
    test = load_gsm8k(gsm8k_dir / "test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0].answer == "72" and train[0].question.startswith("Natalia sold clips to 48")
    assert test[0].answer == "18" and test[0].question.startswith("Janet")
    assert all(re.fullmatch(r"-?[0-9]+", e.answer) for e in train + test)  # commas removed (e.g. "1,080")
    assert sum(e.answer.startswith("-") for e in train + test) == 5
    assert load_task("gsm8k", source=gsm8k_dir, split="test", limit=5) == test[:5]


def test_gsm8k_hub_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` is a dependency; an installation without it still says what is missing."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the package were not installed
    with pytest.raises(ImportError, match="needs the 'datasets' package"):
        load_gsm8k("openai/gsm8k")
    with pytest.raises(ImportError, match="'datasets'"):
        load_task("gsm8k")  # the default source is the hub


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="GSM8K data not found"):
        load_gsm8k(FIXTURES / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"validation\.jsonl"):
        load_gsm8k(FIXTURES, split="validation")


def test_math_fixture() -> None:
    examples = load_math(FIXTURES / "math_tiny.jsonl")
    assert [e.answer for e in examples] == [
        "\\frac{3}{4}",
        "2\\sqrt{2}",  # from the solution's box
        "\\frac{\\sqrt{3}}{2}",  # the last box, nested braces kept
        "\\{1, 2\\}",  # an explicit answer wins over the solution's box
    ]
    assert examples[1].solution == "We have $\\sqrt{8} = \\boxed{2\\sqrt{2}}$."
    assert load_task("math", source=FIXTURES / "math_tiny.jsonl", limit=1) == examples[:1]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("math_no_answer.jsonl", r"math_no_answer\.jsonl:2: no 'answer' field and no complete \\boxed"),
        ("math_not_object.jsonl", r"math_not_object\.jsonl:2: expected a JSON object, got list"),
        ("gsm8k_tiny.jsonl", r"gsm8k_tiny\.jsonl:1: field 'problem' must be a non-empty string \(missing\)"),
    ],
)
def test_math_bad_lines(name: str, message: str) -> None:
    with pytest.raises(DatasetFormatError, match=message):
        load_math(FIXTURES / name)


@pytest.mark.parametrize("level", sorted(ARITHMETIC_LEVELS))
def test_make_arithmetic_is_correct_and_deterministic(level: int) -> None:
    examples = make_arithmetic(300, seed=7, level=level)
    assert examples == make_arithmetic(300, seed=7, level=level)
    assert make_arithmetic(50, seed=7, level=level) == examples[:50]
    assert make_arithmetic(300, seed=8, level=level) != examples
    for ex in examples:
        expr = re.fullmatch(r"What is (.+)\?", ex.question)
        assert expr is not None
        value = eval(expr.group(1), {"__builtins__": {}})  # the expressions are plain integer arithmetic
        assert value == int(value) and str(int(value)) == ex.answer
        assert ex.solution == f"{expr.group(1)} = {ex.answer}"
        assert (
            r1_zero_reward(f"{ex.solution} </think> <answer> {ex.answer} </answer>", ex.answer).reward == 1
        )


def test_arithmetic_levels() -> None:
    """Level 1: single digits added; level 2: two-digit +/- with non-negative results; level 3 adds
    multiplication (and negative results); level 4 parenthesised two-step; level 5 exact division."""
    ops = {level: "".join(sorted({c for e in make_arithmetic(300, 0, level) for c in e.question if c in "+-*/()"}))
           for level in ARITHMETIC_LEVELS}  # fmt: skip
    assert ops == {1: "+", 2: "+-", 3: "*+-", 4: "()*+-", 5: "()+-/"}
    assert all(re.fullmatch(r"What is [0-9] \+ [0-9]\?", e.question) for e in make_arithmetic(100, 0, 1))
    assert all(int(e.answer) >= 0 for e in make_arithmetic(300, 0, 2))
    assert any(int(e.answer) < 0 for e in make_arithmetic(300, 0, 3))
    with pytest.raises(ValueError, match="level must be one of"):
        make_arithmetic(1, 0, level=9)


def test_load_task_arithmetic() -> None:
    train = load_task("arithmetic")
    test = load_task("arithmetic", split="test")
    assert (len(train), len(test)) == (2000, 200)
    assert train != load_task("arithmetic", seed=1)
    assert test[:20] != train[:20]  # each split has its own stream
    assert load_task("arithmetic:1", limit=5, seed=3) == load_task("arithmetic:1", limit=5, seed=3)
    assert all("+" in e.question for e in load_task("arithmetic:1", limit=20))
    assert load_task("arithmetic", limit=0) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "nope"}, ValueError, "unknown task 'nope'"),
        ({"name": "math"}, ValueError, "task 'math' needs a source"),
        ({"name": "arithmetic:x"}, ValueError, "level after ':' must be an integer"),
        ({"name": "arithmetic", "source": "x.jsonl"}, ValueError, "takes no source"),
        ({"name": "arithmetic", "split": "dev"}, ValueError, "has splits"),
        ({"name": "arithmetic", "limit": -1}, ValueError, "limit must be >= 0"),
    ],
)
def test_load_task_errors(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_task(**kwargs)  # type: ignore[arg-type]


def test_byte_order_mark_null_solution_and_non_finite_answers(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark (what some editors write first) is not part of the first record; a null
    ``solution`` is an absent one (as a null ``answer`` is); ``NaN`` / ``Infinity`` golds are refused with
    file and line, where they would have become the answers "nan" and "inf"."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"question": "q", "answer": "#### 1,234"}\n')
    assert [e.answer for e in load_gsm8k(bom)] == ["1234"]
    null = tmp_path / "null.jsonl"
    null.write_text('{"problem": "p", "answer": "5", "solution": null}\n')
    assert load_math(null) == [Example(question="p", answer="5", solution="")]
    for constant in ("NaN", "Infinity", "-Infinity"):
        bad = tmp_path / "custom.jsonl"
        bad.write_text(f'{{"question": "q", "answer": 3}}\n{{"question": "q", "answer": {constant}}}\n')
        value = float(constant)
        with pytest.raises(DatasetFormatError, match=rf"custom\.jsonl:2: field 'answer' is {value}, not a finite"):
            load_task("custom", source=bad)
