"""Inputs that used to pass validation and crash late (issue 14, section 2): each is one clear error naming the
field or file (and line), raised before anything is loaded or written, or a counted skip with a threshold.

Data errors are shown to come before the model is loaded by pointing ``model.path`` nowhere: loading it
would fail with another message.

The rest of the fault-and-abuse cases live beside the code they exercise:
- the rollout server's secret on every endpoint, public binds, collective_rpc and reload paths, a failed
  reload, /health of a dead engine (section 1): tests/rollout/test_server_auth.py;
- disk full, file-size limit, read-only run directory, partial checkpoints removed (section 3):
  tests/trainer/test_faults_io.py;
- the grader's own time bound on any thread and the lenient grades, with per-answer timings (section 4):
  tests/rollout/reward/test_rewards_adversarial.py (run with ``-s`` to see the timings).
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from helpers import REPO
from pydantic import BaseModel

from rollout import model_path
from rollout.model_path import local_path_problem
from trainer.config import ConfigError, RunConfig
from trainer.config_io import config_from_dict, load_config
from trainer.data.tasks import DatasetFormatError
from trainer.learners.dpo import train_dpo
from trainer.learners.grpo import train_grpo
from trainer.learners.sft import train_sft
from trainer.tracking import read_metrics

GRPO = REPO / "configs" / "grpo_tiny_cpu.yaml"
SFT = REPO / "configs" / "tiny" / "sft_tiny_cpu.yaml"
DPO = REPO / "configs" / "tiny" / "dpo_tiny_cpu.yaml"
FINITE = "must be a finite number (not .inf or .nan)"


def reasonrl(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WANDB_MODE="disabled", CI="1")
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's single error message (it may span lines: a config lists its problems), no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("reasonrl: error:") == 1, proc.stderr[-3000:]
    return proc.stderr[proc.stderr.index("reasonrl: error:"):].rstrip("\n")


# ---- configuration -------------------------------------------------------------------------------
def float_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> Iterator[tuple[str, bool]]:
    """(dotted name, is a tuple of floats) of every float-typed field in the config tree."""
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from float_fields(kind, f"{prefix}{name}.")
        elif _holds_float(kind):
            yield f"{prefix}{name}", get_origin(kind) is tuple


def _holds_float(kind: Any) -> bool:
    return kind is float or any(_holds_float(arg) for arg in get_args(kind))


def nested(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: nested(rest, value) if rest else value}


def test_every_float_field_refuses_inf_and_nan() -> None:
    """All float fields (found by walking the config types, so a new one is covered too), with .inf and .nan:
    exactly one problem, naming the field (a tuple's element by index)."""
    fields = list(float_fields())
    assert len(fields) > 20 and ("rollout.temperature", False) in fields and ("optim.betas", True) in fields
    for name, is_tuple in fields:
        for bad in (float("inf"), float("nan")):
            raw = {"model": {"path": "m"}} | nested(name, [bad, 0.5] if is_tuple else bad)
            if name.startswith("model."):
                raw = {"model": {"path": "m", name.split(".", 1)[1]: bad}}
            with pytest.raises(ConfigError) as err:
                config_from_dict(raw)
            where = f"{name}.0" if is_tuple else name
            assert err.value.problems == [f"{where}={bad!r}: {FINITE}"], name


def test_non_finite_float_from_the_command_line(tmp_path: Path) -> None:
    proc = reasonrl("train", "--config", str(GRPO), "rollout.temperature=.inf", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert one_error_line(proc) == f"reasonrl: error: {GRPO} has 1 problem(s):\n  - rollout.temperature=inf: {FINITE}"
    assert not (tmp_path / "run").exists()


def test_config_that_is_not_utf8_or_is_a_directory(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"model:\n  path: m\nlogging:\n  run_name: caf\xe9\n")
    proc = reasonrl("train", "--config", str(latin1))
    assert proc.returncode == 2
    assert one_error_line(proc) == (f"reasonrl: error: {latin1} has 1 problem(s):\n  - {latin1}:4: not valid UTF-8 "
                                    "(byte 0xe9 at column 16); re-save the file as UTF-8")
    proc = reasonrl("train", "--config", str(tmp_path))
    assert proc.returncode == 2
    assert one_error_line(proc) == (f"reasonrl: error: {tmp_path} has 1 problem(s):\n  - {tmp_path} is a directory, "
                                    "not a config file: give a YAML file (e.g. configs/*.yaml)")


def test_model_path_that_is_no_model_folder(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """A local model.path that is missing, a file or a folder without config.json is one line naming it
    (transformers took the missing folder for a malformed hub id: 'Repo id must use alphanumeric chars')."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    cases = {
        str(tmp_path / ".tiny" / "tiny-qwen2"): ": no such folder (build the test models with `reasonrl tiny DIR`",
        str(tmp_path / "file"): " is a file: give the model's folder",
        str(tmp_path / "empty"): " holds no config.json: not a model folder",
    }
    for path, message in cases.items():
        proc = reasonrl("train", "--config", str(GRPO), f"model.path={path}", f"output_dir={tmp_path / 'run'}")
        assert proc.returncode != 0 and one_error_line(proc).startswith(
            f"reasonrl: error: model.path={path!r}{message}"), proc.stderr[-800:]
    assert local_path_problem(tiny_qwen2_path, "k") is None and local_path_problem("Qwen/Qwen2.5-Math-1.5B", "k") is None
    assert local_path_problem("./tiny", "k") is not None and local_path_problem("a/b/c", "k") is not None
    assert doctest.testmod(model_path).failed == 0


# ---- data: errors before the model is loaded ----------------------------------------------------
def grpo_on(train: Path, out: Path, *extra: str) -> RunConfig:
    return load_config(GRPO, ["model.path=/nowhere/model", f"output_dir={out}", "data.task=gsm8k",
                              f"data.train_source={train}", f"data.eval_source={train}", *extra])


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "blank-only"])
def test_empty_gsm8k_train_file(tmp_path: Path, content: str) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(content)
    with pytest.raises(DatasetFormatError) as err:
        train_grpo(grpo_on(train, tmp_path / "run"))
    assert str(err.value) == (f'{train}: no records (the file is empty or holds only blank lines); expected one JSON '
                              'object {"question", "answer"} per line')
    assert not (tmp_path / "run").exists()


def test_empty_train_file_from_the_command_line(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("\n\n")
    proc = reasonrl("train", "--config", str(GRPO), "model.path=/nowhere/model", f"output_dir={tmp_path / 'run'}",
                    "data.task=gsm8k", f"data.train_source={train}")
    assert proc.returncode == 2
    assert one_error_line(proc) == (f'reasonrl: error: {train}: no records (the file is empty or holds only blank '
                                    'lines); expected one JSON object {"question", "answer"} per line')
    assert not (tmp_path / "run").exists()


def test_missing_datasets(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError) as err:
        train_grpo(grpo_on(missing, tmp_path / "grpo"))
    assert str(err.value) == f"GSM8K data not found: {missing} (give a .jsonl file or a folder holding train.jsonl)"
    with pytest.raises(FileNotFoundError) as err:
        train_sft(load_config(SFT, ["model.path=/nowhere/model", f"output_dir={tmp_path / 'sft'}",
                                    f"data.sft_path={missing}"]))
    assert str(err.value) == f"data.sft_path={str(missing)!r}: no such file"
    with pytest.raises(FileNotFoundError) as err:
        train_dpo(load_config(DPO, ["model.path=/nowhere/model", f"output_dir={tmp_path / 'dpo'}",
                                    f"data.preference_path={missing}"]))
    assert str(err.value) == f"data.preference_path={str(missing)!r}: no such file"
    assert not [p.name for p in tmp_path.iterdir()]


def test_sft_file_whose_responses_are_all_empty(tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": ""}) + "\n" for i in range(5)))
    with pytest.raises(DatasetFormatError) as err:
        train_sft(load_config(SFT, ["model.path=/nowhere/model", f"output_dir={tmp_path / 'run'}",
                                    f"data.sft_path={data}"]))
    assert str(err.value) == (f"{data}: every 'response' is empty (5 lines, from {data}:1): SFT trains on response "
                              "tokens only, so there is nothing to learn")
    assert not (tmp_path / "run").exists()


# ---- skips with a threshold ---------------------------------------------------------------------
def write_pairs(path: Path, n: int, identical: int) -> None:
    rows = [{"prompt": f"What is {i} + 2?", "chosen": f"{i} + 2 = {i + 2}", "rejected": f"{i} + 2 = {i + 12}"}
            for i in range(n)]
    for row in rows[:identical]:
        row["rejected"] = row["chosen"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_dpo_pairs_with_chosen_equal_to_rejected(tmp_path: Path) -> None:
    """Beyond ``data.max_skipped_fraction`` (default 1%) it is an error before the model is loaded, naming
    the lines; the skip itself is in `test_dpo_identical_pair_is_skipped_and_counted`."""
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, 50, identical=5)
    with pytest.raises(DatasetFormatError) as err:
        train_dpo(load_config(DPO, ["model.path=/nowhere/model", f"output_dir={tmp_path / 'run'}",
                                    f"data.preference_path={data}"]))
    assert str(err.value) == (
        f"{data}: 5 of 50 pairs with chosen == rejected (no preference) ({data}:1, {data}:2, {data}:3, ...): more "
        "than data.max_skipped_fraction=0.01 of the data; fix the data, or raise data.max_skipped_fraction to skip "
        "them")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("n", "identical", "message"), [
    (2, 2, "all 2 pairs with chosen == rejected (no preference) ({data}:1, {data}:2): nothing left to use; fix the "
           "data"),
    (2, 1, "{data}: 1 usable pair(s): DPO needs at least 2 (a share is held out to validate, "
           "dpo.validation_fraction)"),
])  # fmt: skip
def test_dpo_with_too_few_usable_pairs(tmp_path: Path, n: int, identical: int, message: str) -> None:
    """Even where data.max_skipped_fraction allows every pair to be skipped, a run with nothing (or one pair,
    which the held-out split takes) left is one error before loading; they were a ZeroDivisionError and a
    `torch.cat` of nothing deep in training."""
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, n, identical=identical)
    with pytest.raises(DatasetFormatError) as err:
        train_dpo(load_config(DPO, ["model.path=/nowhere/model", f"output_dir={tmp_path / 'run'}",
                                    f"data.preference_path={data}", "data.max_skipped_fraction=1.0"]))
    assert message.format(data=data) in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_dpo_identical_pair_is_skipped_and_counted(tmp_path: Path, tiny_qwen2_path: str) -> None:
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, 120, identical=1)  # 1/120 < 1%: skipped
    cfg = load_config(DPO, [f"model.path={tiny_qwen2_path}", f"output_dir={tmp_path / 'run'}",
                            f"data.preference_path={data}", "dpo.max_steps=1", "dpo.pairs_per_step=8",
                            "eval.every=0", "dpo.validation_fraction=0.05"])
    train_dpo(cfg)
    [rec] = [r for r in read_metrics(tmp_path / "run") if "data/skipped_identical_pairs" in r]
    assert rec["data/skipped_identical_pairs"] == 1.0
    assert rec["data/train_pairs"] + rec["data/heldout_pairs"] == 119.0


def write_gsm8k(path: Path, n: int, long_lines: int, long_chars: int = 10_000_000) -> None:
    """`n` short GSM8K-style lines, then `long_lines` whose question is `long_chars` characters (10 MB)."""
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)]
    rows += [{"question": "7 " * (long_chars // 2), "answer": "#### 7"} for _ in range(long_lines)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def small_grpo(model: str, train: Path, out: Path, *extra: str) -> RunConfig:
    return load_config(GRPO, [
        f"model.path={model}", f"output_dir={out}", "data.task=gsm8k", f"data.train_source={train}",
        f"data.eval_source={train}", "rollout.engine=hf", "warmstart.steps=0", "grpo.n_grpo_steps=1",
        "grpo.rollout_batch_size=8", "grpo.group_size=4", "grpo.train_batch_size=8",
        "grpo.gradient_accumulation_steps=2", "rollout.max_tokens=4", "eval.max_tokens=4", "eval.limit=4",
        "eval.every=0", "reward.num_workers=1", "logging.progress=false", *extra,
    ])


@pytest.mark.slow
def test_prompt_longer_than_the_context_is_skipped(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """A 10 MB question among 150 is skipped before the engine sees it, and counted; more than
    ``data.max_skipped_fraction`` of such prompts is an error naming the file and the limit."""
    train = tmp_path / "train.jsonl"
    write_gsm8k(train, 150, long_lines=1)
    train_grpo(small_grpo(tiny_qwen2_path, train, tmp_path / "run"))
    records = read_metrics(tmp_path / "run")
    [skips] = [r for r in records if "data/skipped_long_prompts" in r]
    assert skips["data/skipped_long_prompts"] == 1.0 and skips["step"] == 0
    assert [r["step"] for r in records if "train/loss" in r] == [1]

    write_gsm8k(train, 20, long_lines=1)
    with pytest.raises(DatasetFormatError) as err:
        train_grpo(small_grpo(tiny_qwen2_path, train, tmp_path / "too_many"))
    assert str(err.value) == (
        f"{train}: 1 of 21 prompts of 2048 tokens or more (the rollout engine's context: no room for a response) "
        "('7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 '): more than data.max_skipped_fraction=0.01 of the data; fix "
        "the data, or raise data.max_skipped_fraction to skip them")


@pytest.mark.slow
@pytest.mark.vllm
def test_prompt_longer_than_the_vllm_context_never_reaches_vllm(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """With vLLM the limit is its ``max_model_len`` (512 here): the 10 MB question is skipped before the engine
    sees it (vLLM would reject the whole batch), and training runs."""
    train = tmp_path / "train.jsonl"
    write_gsm8k(train, 150, long_lines=1)
    train_grpo(small_grpo(tiny_qwen2_path, train, tmp_path / "run", "rollout.engine=vllm"))
    records = read_metrics(tmp_path / "run")
    assert [r["data/skipped_long_prompts"] for r in records if "data/skipped_long_prompts" in r] == [1.0]
    assert [r["step"] for r in records if "train/loss" in r] == [1]
