"""``accelerate launch --config_file launch/cpu_2proc.yaml -m trainer train …`` with nothing else set: the
launch file alone gives one 2-rank CPU world (no ``ACCELERATE_USE_CPU``; `trainer.learner.make_accelerator`),
checked on one GRPO step of the tiny Qwen2 with the HF engine and a linear learning-rate schedule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import REPO, launch_env, run_launch

from trainer.tracking import read_metrics

TIMEOUT_S = 240

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 60)]


def test_cpu_launch_file_alone_gives_a_two_rank_world(tiny_qwen2_path: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
        "-m", "trainer", "train", "--config", str(REPO / "configs" / "grpo_tiny_cpu.yaml"),
        f"model.path={tiny_qwen2_path}", f"output_dir={run}", "rollout.engine=hf", "warmstart.steps=0",
        "grpo.n_grpo_steps=1", "grpo.rollout_batch_size=16", "grpo.group_size=4", "grpo.train_batch_size=16",
        "grpo.gradient_accumulation_steps=2", "rollout.max_tokens=8", "eval.max_tokens=8", "eval.limit=4",
        "reward.num_workers=1", "optim.lr_scheduler=linear",
    ]  # fmt: skip
    env = launch_env(cpu_ddp=False)
    assert "ACCELERATE_USE_CPU" not in env
    log = tmp_path / "launch.log"
    rc = run_launch(cmd, env, log, TIMEOUT_S)
    tail = "\n".join(log.read_text().splitlines()[-40:])
    assert rc == 0, f"`accelerate launch --config_file launch/cpu_2proc.yaml` ended with {rc}; log tail:\n{tail}"
    assert "Traceback" not in log.read_text()

    train = [r for r in read_metrics(run) if "train/loss" in r]
    assert [r["step"] for r in train] == [1]
    assert train[0]["rollout/samples"] == 16, "the job total: 8 samples on each of the 2 ranks"
    states = sorted(p.name for p in (run / "checkpoints" / "step_000001" / "state").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]
