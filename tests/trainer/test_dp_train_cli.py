"""The product under 2 data-parallel ranks: `reasonrl train` (``python -m trainer train``) launched by
``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2``, as the README tells CPU users, run end to end.

`test_data_parallel.py` checks the numerics of one step through the library; this runs the whole loop:
warm-start-free GRPO on the tiny Qwen2 with the HF engine, an evaluation every step (the ranks evaluate
a share each; when rank 0 alone evaluated, the ranks' metric sets differed, which once crashed the metric
all-reduce with gloo's "Received data size doesn't match"), a checkpoint every step, and a normal
interpreter exit (no ``os._exit``): the launch must end by itself within the timeout and leave no process
behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, launch_env, session_pids

from trainer.tracking import read_metrics

TIMEOUT_S = 300

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 60)]


def test_two_rank_train_runs_logs_and_exits(tiny_qwen2_path: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "trainer", "train", "--config", str(REPO / "configs" / "grpo_tiny_cpu.yaml"),
        f"model.path={tiny_qwen2_path}", f"output_dir={run}", "rollout.engine=hf", "warmstart.steps=0",
        "grpo.n_grpo_steps=2", "grpo.rollout_batch_size=16", "grpo.group_size=4", "grpo.train_batch_size=16",
        "grpo.gradient_accumulation_steps=2", "rollout.max_tokens=8", "eval.max_tokens=8", "eval.limit=8",
        "eval.every=1", "checkpoint.save_every=1", "checkpoint.keep_last=2", "reward.num_workers=1",
    ]  # fmt: skip
    log = tmp_path / "launch.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(cpu_ddp=True), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"2-rank `reasonrl train` did not exit within {TIMEOUT_S} s; log tail:\n{_tail(log)}")
    finally:
        if session_pids(proc.pid):
            time.sleep(2)  # reward workers exit within ~1 s of their parent
        leftover = session_pids(proc.pid)
        if leftover:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert rc == 0, f"2-rank `reasonrl train` exited {rc}; log tail:\n{_tail(log)}"
    assert not leftover, f"the launch left processes behind: {leftover}"

    records = read_metrics(run)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2], "rank 0 alone logs each step once"
    for r in train:
        assert r["rollout/samples"] == 16, "sample counts are job totals (8 per rank, summed)"
        assert r["time/eval"] > 0, "the evaluation time survives the reduction"
        assert r["time/save"] > 0
    evals = [r["step"] for r in records if "eval/accuracy" in r]
    assert evals == [0, 1, 2]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_000001", "step_000002"]
    states = sorted(p.name for p in (run / "checkpoints" / "step_000002" / "state").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"], "every rank saved its RNG state"


def _tail(log: Path) -> str:
    return "\n".join(log.read_text().splitlines()[-40:])
