"""Datasets from any source (trainer.data.sources, trainer.data.tasks): local JSONL, JSON and Parquet files with
the question and answer columns named in the config, the GSM8K and MATH presets and their answer parsers, and a
hub id that cannot be reached offline (one clear error naming the id and the local-file alternative)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO

from trainer.config import ConfigError
from trainer.config_io import load_config
from trainer.data.checks import check_data, task_columns
from trainer.data.tasks import (
    Columns,
    DatasetFormatError,
    Example,
    columns_for,
    load_records,
    load_task,
    parse_answer,
)

FLAGSHIP = REPO / "configs" / "grpo_qwen2.5_math_1.5b_gsm8k.yaml"
ROWS = [{"prompt": "What is 2 + 3?", "target": 5, "id": 0}, {"prompt": "What is 7 - 4?", "target": 3, "id": 1}]
EXPECTED = [Example("What is 2 + 3?", "5"), Example("What is 7 - 4?", "3")]


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    """`rows` as JSONL, a JSON list or Parquet, by `path`'s suffix."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_local_files_with_named_columns(tmp_path: Path, suffix: str) -> None:
    """Custom columns ("prompt", "target") and a numeric plain answer read the same from all three formats,
    from the file or from a folder holding {split}<suffix>; `limit` takes the first records."""
    path = write(tmp_path / f"train{suffix}", ROWS)
    cols = columns_for("custom", question="prompt", answer="target")
    assert load_records(path, cols) == EXPECTED
    assert load_task("custom", tmp_path, "train", columns=cols) == EXPECTED
    assert load_task("custom", path, "train", limit=1, columns=cols) == EXPECTED[:1]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_missing_column_names_the_record_and_the_config_keys(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"train{suffix}", ROWS)
    where = f"{path}:1" if suffix == ".jsonl" else f"{path}[0]"
    with pytest.raises(DatasetFormatError) as err:
        load_records(path, columns_for("custom"))  # default columns: question, answer
    assert str(err.value) == (f"{where}: field 'question' must be a non-empty string (missing); keys: ['id', "
                              "'prompt', 'target'] (data.question_column / data.answer_column name the columns)")


def test_gsm8k_and_math_presets_from_parquet(tmp_path: Path) -> None:
    """The presets' parsers: GSM8K's gold after '####' (commas, '$' dropped); MATH's 'answer' column, else
    the last \\boxed{} of 'solution' (nested braces kept); the worked solution is kept for SFT."""
    gsm = write(tmp_path / "gsm.parquet", [{"question": "Q1", "answer": "3 * 400 = 1200\n#### $1,200"}])
    assert load_task("gsm8k", gsm) == [Example("Q1", "1200", "3 * 400 = 1200\n#### $1,200")]
    math = write(tmp_path / "math.parquet", [
        {"problem": "P1", "solution": r"so $\boxed{\frac{\sqrt{3}}{2}}$", "answer": None},
        {"problem": "P2", "solution": r"\boxed{4}", "answer": "5"},
    ])
    got = load_task("math", math)
    assert got == [Example("P1", r"\frac{\sqrt{3}}{2}", r"so $\boxed{\frac{\sqrt{3}}{2}}$"), Example("P2", "5", r"\boxed{4}")]


def test_parsers_and_named_parser_over_a_preset(tmp_path: Path) -> None:
    assert parse_answer("48 / 2 = 24\n#### 24", "gsm8k") == "24"
    assert parse_answer(r"first \boxed{1}, then \boxed{x^{2}}", "boxed") == "x^{2}"
    assert parse_answer("  -7 ", "plain") == "-7"
    for text, parser, message in [("24", "gsm8k", "no '####'"), (r"\boxed{1", "boxed", "no complete"),
                                  (" ", "plain", "empty answer")]:
        with pytest.raises(ValueError, match=message):
            parse_answer(text, parser)  # type: ignore[arg-type]
    # a MATH-style file read with the MATH preset's question column but the boxed parser on "output"
    path = write(tmp_path / "x.jsonl", [{"problem": "P", "output": r"it is \boxed{9}"}])
    cols = columns_for("math", answer="output", parser="boxed")
    assert cols == Columns("problem", (("output", "boxed"),), None, None, "MATH")
    assert load_records(path, cols) == [Example("P", "9", r"it is \boxed{9}")]
    bad = write(tmp_path / "bad.jsonl", [{"problem": "P", "output": "nine"}])
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl:1: no complete \\boxed\{...\} in 'output'"):
        load_records(bad, cols)


def test_empty_and_malformed_files(tmp_path: Path) -> None:
    for name, text in [("empty.json", "[]"), ("empty.parquet", None)]:
        path = tmp_path / name
        if text is None:
            pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
        else:
            path.write_text(text)
        with pytest.raises(DatasetFormatError, match=re.escape(f"{path}: no records")):
            load_task("gsm8k", path)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetFormatError, match=re.escape(f"{broken}: cannot be read as PARQUET")):
        load_task("gsm8k", broken)
    with pytest.raises(FileNotFoundError, match=re.escape(f"GSM8K data not found: {tmp_path / 'nope.parquet'}")):
        load_task("gsm8k", tmp_path / "nope.parquet")  # a missing local file is never looked up on the hub


def test_config_names_the_columns(tmp_path: Path) -> None:
    """data.question_column / answer_column / answer_parser reach the loader through the run's data check."""
    train = write(tmp_path / "train.parquet", ROWS)
    test = write(tmp_path / "test.json", ROWS[:1])
    cfg = load_config(FLAGSHIP, ["model.path=/nowhere", "data.task=custom", f"data.train_source={train}",
                                 f"data.eval_source={test}", "data.question_column=prompt",
                                 "data.answer_column=target", "data.answer_parser=plain"])
    assert task_columns(cfg) == Columns("prompt", (("target", "plain"),))
    check_data(cfg)
    with pytest.raises(ConfigError, match=re.escape("data.train_source is unset: data.task=math needs it")):
        load_config(FLAGSHIP, ["model.path=/nowhere", "data.task=math", "data.train_source=null",
                                f"data.eval_source={test}"])
    with pytest.raises(ConfigError, match=re.escape("data.answer_parser='latex'")):
        load_config(FLAGSHIP, ["model.path=/nowhere", "data.answer_parser=latex"])


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_flagship_config_offline_is_one_clear_error(tmp_path: Path, flag: str) -> None:
    """The flagship config reads openai/gsm8k from the hub. Offline and not cached (an empty HF_HOME), training
    stops with one error line naming the id and the local-file alternative, before any model or engine is
    loaded and before the run directory is written."""
    env = dict(os.environ, WANDB_MODE="disabled", CI="1", HF_HOME=str(tmp_path / "hf"), **{flag: "1"})
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(FLAGSHIP), f"output_dir={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("reasonrl: error:")]
    assert line.startswith("reasonrl: error: GSM8K dataset 'openai/gsm8k' (split 'train', configuration 'main') "
                           "cannot be loaded from the Hugging Face hub: ")
    assert "give a local .jsonl, .json or .parquet file" in line and "data.train_source" in line
    assert not out.exists()
    vllm_lines = re.findall(r"^.*\[[\w.]+\.py:\d+\].*$", proc.stderr, flags=re.M)  # vLLM's "[file.py:line]"
    assert vllm_lines == [] and "Resolved architecture" not in proc.stderr  # no engine was started
