"""Learning-rate schedules (`trainer.learner.LRSchedule`, through ``transformers.get_scheduler``).

Hand-worked factors for W = 2 warm-up steps and T = 5 updates (transformers gets T + 1 = 6 steps, read at
step k for update k):

- constant: min(1, k/2)                               → 0.5, 1, 1, 1, 1
- linear:   k/2, then (6 - k)/(6 - 2)                  → 0.5, 1, 0.75, 0.5, 0.25
- cosine:   k/2, then ½(1 + cos(π (k - 2)/4))          → 0.5, 1, ½ + √2/4, 0.5, ½ - √2/4

With W = 0 and T = 4, linear gives (5 - k)/5 → 0.8, 0.6, 0.4, 0.2. The default (constant) equals the hand
-written schedule it replaced bit for bit, and a checkpoint (accelerate's ``save_state``) keeps the schedule.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from trainer.config import ConfigError, ModelConfig, OptimConfig, RunConfig
from trainer.config_io import config_from_dict
from trainer.learner import Learner, LRSchedule, optimizer_steps

LR = 0.5


def _lrs(name: str, warmup: int, total: int | None, steps: int) -> list[float]:
    """Learning rate of each of `steps` updates, divided by the base rate."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    schedule = LRSchedule(optimizer, OptimConfig(learning_rate=LR, warmup_steps=warmup, lr_scheduler=name))
    schedule.plan(total)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"] / LR)
        assert schedule.get_last_lr() == [optimizer.param_groups[0]["lr"]]
        optimizer.step()
        schedule.step()
    return out


@pytest.mark.parametrize(("name", "warmup", "total", "want"), [
    ("constant", 2, 5, [0.5, 1, 1, 1, 1]),
    ("constant", 0, 5, [1, 1, 1, 1, 1]),
    ("linear", 2, 5, [0.5, 1, 0.75, 0.5, 0.25]),
    ("linear", 0, 4, [0.8, 0.6, 0.4, 0.2]),
    ("cosine", 2, 5, [0.5, 1, 0.5 + math.sqrt(2) / 4, 0.5, 0.5 - math.sqrt(2) / 4]),
])  # fmt: skip
def test_hand_worked_factors(name: str, warmup: int, total: int, want: list[float]) -> None:
    assert _lrs(name, warmup, total, len(want)) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("warmup", [0, 1, 3, 7])
def test_default_is_the_replaced_schedule_bit_for_bit(warmup: int) -> None:
    """The replaced `build_scheduler`: LambdaLR with min(1, (step + 1)/W), 1 without warm-up."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    old = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    want = []
    for _ in range(12):
        want.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        old.step()
    got = [lr * LR for lr in _lrs("constant", warmup, None, 12)]
    assert got == want  # exact: same divisions, same product


def test_linear_and_cosine_need_the_number_of_steps() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    schedule = LRSchedule(optimizer, OptimConfig(lr_scheduler="cosine"))
    with pytest.raises(RuntimeError, match="before `plan`"):
        schedule.step()
    with pytest.raises(ConfigError, match=r"optim\.lr_scheduler=cosine needs the run's number of optimizer steps"):
        schedule.plan(None)


def test_optimizer_steps_per_mode() -> None:
    def cfg(mode: str, **extra: object) -> RunConfig:
        return config_from_dict({"mode": mode, "model": {"path": "m"}, **extra})

    grpo = {"n_grpo_steps": 3, "rollout_batch_size": 16, "group_size": 4, "train_batch_size": 8,
            "gradient_accumulation_steps": 2, "epochs_per_rollout_batch": 2}  # fmt: skip
    assert optimizer_steps(cfg("grpo", grpo=grpo), 3) == 3 * 2 * (16 // 8)
    assert optimizer_steps(cfg("sft"), 40) == 40
    assert optimizer_steps(cfg("dpo"), 7) == 7
    assert optimizer_steps(cfg("ei"), 5) is None
    with pytest.raises(ConfigError, match=r"optim\.lr_scheduler=linear with mode=ei"):
        cfg("ei", optim={"lr_scheduler": "linear"})


def test_checkpoint_keeps_the_schedule(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """Linear decay over 6 updates, checkpointed after 2 (accelerate's ``save_state``), resumed by a new
    learner whose schedule is planned only after the state is loaded (as the run loop does): updates 3-6
    get the uninterrupted run's rates, in the optimizer itself."""
    model, optim = ModelConfig(path=tiny_qwen2_path, dtype="float32"), OptimConfig(
        learning_rate=LR, warmup_steps=2, lr_scheduler="linear")

    def run(learner: Learner, steps: int) -> list[float]:
        lrs = []
        for _ in range(steps):
            lrs.append(learner.optimizer.param_groups[0]["lr"])
            learner.step()
        return lrs

    straight = Learner(model, optim, Accelerator())
    straight.scheduler.plan(6)
    want = run(straight, 6)
    assert want == pytest.approx([LR * f for f in (0.5, 1, 0.8, 0.6, 0.4, 0.2)], abs=1e-12)

    first = Learner(model, optim, Accelerator())
    first.scheduler.plan(6)
    assert run(first, 2) == want[:2]
    first.accelerator.save_state(str(tmp_path / "state"))

    resumed = Learner(model, optim, Accelerator())
    resumed.accelerator.load_state(str(tmp_path / "state"))
    resumed.scheduler.plan(6)
    assert run(resumed, 4) == want[2:]


@pytest.mark.slow
def test_resumed_grpo_run_continues_the_schedule(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """Through the run loop (the schedule planned after the checkpoint is loaded): 4 GRPO steps of linear
    decay (W = 1, T = 4, one optimizer step per step), straight, or as 2 steps (T = 2) resumed to 4; steps 3-4
    log the straight run's rates. Logged ``train/lr`` is the rate after the step, the next update's:
    (5 - k - 1)/4 → 0.75, 0.5, 0.25, 0 of the peak."""
    from trainer.learners.grpo import train_grpo
    from trainer.tracking import read_metrics

    def config(out: Path, steps: int) -> RunConfig:
        return config_from_dict({
            "output_dir": str(out), "model": {"path": tiny_qwen2_path, "dtype": "float32"},
            "data": {"task": "arithmetic", "arithmetic_level": 1},
            "rollout": {"engine": "hf", "max_tokens": 8, "sleep_between_rollouts": False},
            "reward": {"num_workers": 1}, "optim": {"learning_rate": LR, "warmup_steps": 1, "lr_scheduler": "linear"},
            "grpo": {"n_grpo_steps": steps, "rollout_batch_size": 16, "group_size": 4, "train_batch_size": 16,
                     "gradient_accumulation_steps": 2},
            "eval": {"max_tokens": 8, "limit": 4, "every": 0}, "checkpoint": {"save_every": 2},
            "logging": {"progress": False, "wandb_mode": "disabled"},
        })  # fmt: skip

    def lrs(run: Path) -> list[float]:
        return [r["train/lr"] / LR for r in read_metrics(run) if "train/lr" in r]

    train_grpo(config(tmp_path / "straight", 4))
    assert lrs(tmp_path / "straight") == pytest.approx([0.75, 0.5, 0.25, 0.0], abs=1e-12)
    train_grpo(config(tmp_path / "halves", 2))
    assert lrs(tmp_path / "halves") == pytest.approx([0.5, 0.0], abs=1e-12)  # T = 2: (3 - k - 1)/2
    train_grpo(config(tmp_path / "halves", 4), resume=True)
    assert lrs(tmp_path / "halves")[2:] == pytest.approx([0.25, 0.0], abs=1e-12)
