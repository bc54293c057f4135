"""SIGTERM (a cluster's stop: time limit, preemption, `scancel`) ends `reasonrl train` after the step it is in,
with a checkpoint of that step, one line, and exit status 128 + 15; ``--resume`` then finishes the run
(`trainer.stop_signal`, `trainer.learners.loop`). The signal goes to the whole process group, as a cluster's
does: the reward workers get it too. Also under torchrun with 2 ranks, which stop after the same step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, launch_env, session_pids

from trainer.tracking import read_metrics

TINY = REPO / "configs" / "grpo_tiny_cpu.yaml"
STEPS = 8
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def train(model: str, run: Path, launcher: list[str]) -> list[str]:
    return [*launcher, "-m", "trainer", "train", "--config", str(TINY), f"model.path={model}", f"output_dir={run}",
            "rollout.engine=hf", "warmstart.steps=0", f"grpo.n_grpo_steps={STEPS}", "grpo.rollout_batch_size=16",
            "grpo.group_size=4", "grpo.train_batch_size=16", "grpo.gradient_accumulation_steps=2",
            "rollout.max_tokens=8", "eval.every=0", "eval.limit=8", "eval.max_tokens=8", "checkpoint.save_every=0",
            "reward.num_workers=1", "logging.progress=false"]  # fmt: skip


def stop_after_step_2(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd`, SIGTERM its process group once step 2 is logged; its exit status and stderr."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stderr is not None
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if f"grpo step 2/{STEPS}" in line:
                os.killpg(proc.pid, signal.SIGTERM)
                break
        seen.append(proc.communicate(timeout=300)[1])
    finally:
        if session_pids(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, "".join(seen)


@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_checkpoints_the_current_step_and_resume_finishes(tiny_qwen2_path: str, tmp_path: Path,
                                                                  world: int) -> None:
    run = tmp_path / "run"
    launcher = [sys.executable] if world == 1 else TORCHRUN
    env = launch_env(cpu_ddp=world > 1)
    rc, stderr = stop_after_step_2(train(tiny_qwen2_path, run, launcher), env)
    # every rank stops after the same step (two ranks' lines may share one line of the common stderr)
    stops = re.findall(rf"reasonrl: stopped on SIGTERM after step (\d+) of {STEPS}: checkpoint saved", stderr)
    assert len(stops) == world and len(set(stops)) == 1, stderr[-3000:]
    step = int(stops[0])
    ours = [f'File "{REPO / package}' for package in ("trainer", "rollout")]
    assert 2 <= step < STEPS and not any(o in stderr for o in ours), stderr[-3000:]  # no traceback through our code
    if world == 1:  # (torchrun itself ends with its own traceback of the signal it got)
        assert rc == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{step:06d}"]
    resumed = subprocess.run([*launcher, "-m", "trainer", "train", "--resume", str(run)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))
