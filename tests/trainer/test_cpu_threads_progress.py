"""CPU thread counts chosen at start-up (trainer.threads) and progress lines without a terminal: the warm start
logs every tenth of its steps, each evaluation a start and an end line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from trainer.threads import configure_cpu_threads, cpu_threads


def test_half_the_cores_per_local_process() -> None:
    assert [cpu_threads(c, p) for c, p in [(1, 1), (2, 1), (4, 1), (4, 2), (64, 8), (2, 2)]] == [1, 1, 2, 1, 4, 1]


def test_configure_respects_the_user_and_says_what_it_chose(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    chosen: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)  # record, leave this process's pool alone
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(6)))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_cpu_threads() is None and chosen == []  # the user's choice stands
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with caplog.at_level(logging.INFO, logger="reasonrl"):
        assert configure_cpu_threads() == 3
    assert chosen == [3] and os.environ["OMP_NUM_THREADS"] == "3"  # children (reward workers, servers) inherit it
    assert "use 3 intra-op thread(s) per process (half of 6 usable cores over 1 local process(es))" in caplog.text
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert configure_cpu_threads() is None  # a CUDA machine keeps torch's defaults


@pytest.mark.slow
def test_no_terminal_run_logs_threads_warm_start_and_evaluation(tmp_path: Path) -> None:
    """`reasonrl train` without a terminal and without OMP_NUM_THREADS: the thread choice, warm-start progress
    (10 steps: a line each) and each evaluation's start and end lines are in the log."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"WANDB_MODE": "disabled", "CI": "1"}
    subprocess.run([sys.executable, "-m", "trainer", "tiny", ".tiny"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=600)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--config", str(REPO / "configs/tiny/ei_tiny_cpu.yaml"),
         f"output_dir={tmp_path / 'run'}", "warmstart.steps=10", "ei.n_ei_steps=1", "ei.questions_per_step=8",
         "data.eval_limit=8"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))
    assert f"CPU threads: torch and the in-process vLLM engine use {cpu_threads(cores, 1)} intra-op thread(s)" in proc.stderr
    assert [f"warm start (SFT) step {n}/10" in proc.stderr for n in range(1, 11)] == [True] * 10
    assert proc.stderr.count("evaluation: 8 questions (generate, score, entropy) ...") == 2  # before and after
    assert proc.stderr.count("evaluation: accuracy ") == 2
