"""The benchmarks still run: each script, in a real subprocess, on a tiny workload, prints its table.

The GPU procedure (`benchmarks/gpu/run_all.sh`) runs these scripts on a GPU machine whose time is costly; a script that
broke since it was last run would waste it, so CI runs each one small. Its wheel list is checked here too.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import REPO, run_script
from packaging.utils import canonicalize_name


@pytest.mark.slow
def test_learner_step_prints_every_layout(tiny_qwen2_path: str) -> None:
    out = run_script("learner_step.py", "--model", tiny_qwen2_path, "--num-seqs", "16", "--max-response", "40",
                     "--repeats", "1", "--peak-tflops", "1.0")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert {"padded", "trimmed", "sorted", "response", "packed"} <= rows.keys(), out
    assert rows["packed"][2] == "0.0%", out  # packing computes no padding
    assert rows["padded"][-1] == "1.00x" and rows["sorted"][6].endswith("%"), out  # speed-up base; MFU shown


@pytest.mark.slow
@pytest.mark.vllm
def test_rollout_benchmark_small() -> None:
    out = run_script("rollout.py", "--small", "--num-seqs", "16", "--prompt-len", "16", "--max-new-tokens", "8",
                     "--repeats", "1", "--enforce-eager")  # compiled: tests/rollout/engines/test_vllm_compiled.py
    for row in ("raw vllm.LLM.generate (logprobs=0)", "VLLMEngine.generate", "HFEngine.generate",
                "VLLMEngine.update_weights"):
        assert row in out, out


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_step_benchmark() -> None:
    out = run_script("grpo_step.py", "--steps", "2", "grpo.rollout_batch_size=16", "grpo.train_batch_size=16",
                     "rollout.max_tokens=8", "logging.peak_tflops=1.0")
    assert "generate" in out and "sync" in out and "MFU" in out, out


@pytest.mark.slow
@pytest.mark.vllm
def test_remote_sync_benchmark_compares_both_transports() -> None:
    """benchmarks/remote_sync.py: one row per transport, the same bytes moved, and the server serving the
    learner's weights after each (the probe's largest log-prob difference)."""
    out = run_script("remote_sync.py", "--repeats", "1")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    fs, gloo = rows["filesystem"], rows["gloo"]
    assert fs[1] == gloo[1] and float(fs[1]) > 0, out  # MB per push
    assert fs[5] == "1.00" and float(gloo[5]) > 0, out  # vs the filesystem transfer
    assert float(fs[6]) < 1e-4 and float(gloo[6]) < 1e-4, out


def test_gpu_wheel_lists_pin_each_package_once() -> None:
    """benchmarks/gpu/wheels-*.txt are installed together with ``--no-deps`` from one folder: every line an exact
    pin, and no package twice across both (two versions of one name stop the whole install there)."""
    pins = []
    for name in ("learner", "vllm"):
        lines = (REPO / "benchmarks" / "gpu" / f"wheels-{name}.txt").read_text().splitlines()
        pins += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", pin) for pin in pins), pins
    names = [canonicalize_name(pin.split("==")[0]) for pin in pins]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert {"vllm", "uvicorn", "pydantic", "math-verify", "pytest"} <= set(names)


def test_every_gpu_test_runs_in_a_gpu_stage() -> None:
    """Each module holding `gpu`-marked tests is named by a stage of benchmarks/gpu/run_all.sh, so the GPU
    procedure runs them all (a new one is not left out)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests")], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    modules = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert len(modules) >= 5, proc.stdout[-2000:] + proc.stderr[-2000:]
    stages = (REPO / "benchmarks" / "gpu" / "run_all.sh").read_text()
    assert sorted(m for m in modules if m not in stages) == []
