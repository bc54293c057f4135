"""Config checks that need the launched cluster: GRPO batch and EI question sharding over the learner ranks and the
rollout engine's placement against the learner devices of this node. Run once the process group exists
(`Session`); the checks that need no cluster run when the config loads (`trainer.config`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from trainer.config import CUDA_DEVICE, ConfigError, RunConfig

if TYPE_CHECKING:
    import torch


def validate_for_cluster(config: RunConfig, world_size: int, devices: Sequence[str | torch.device], *,
                         cuda_devices: int | None = None) -> None:
    """Checks that need the launched cluster: batch sharding over `world_size` ranks and engine placement.

    `devices` holds the learner device of every rank on this node (`trainer.engines.node_learner_devices`;
    a bare ``cuda`` is this process's current device, `normalize_device`); `cuda_devices` the CUDA devices
    visible on this node (None: ``torch.cuda.device_count()``).
    """
    problems = []
    if config.mode == "grpo":
        grpo = config.grpo
        micro = grpo.train_batch_size // grpo.gradient_accumulation_steps
        if micro % world_size:
            problems.append(
                f"micro-batch size train_batch_size/gradient_accumulation_steps={micro} is not divisible "
                f"by world size {world_size}: lower grpo.gradient_accumulation_steps"
            )
        if (grpo.rollout_batch_size // grpo.group_size) % world_size:
            problems.append(
                f"rollout_batch_size/group_size={grpo.rollout_batch_size // grpo.group_size} questions "
                f"cannot be split whole-group across {world_size} ranks"
            )
        if grpo.dynamic_sampling and world_size > 100:
            problems.append(
                f"grpo.dynamic_sampling with world size {world_size}: generation seeds are seed + 1000·step + "
                "100·round + rank, so ranks beyond 100 would reuse another round's seeds; turn dynamic "
                "sampling off or use at most 100 ranks"
            )
    if config.mode == "ei" and config.ei.questions_per_step % world_size:
        problems.append(
            f"ei.questions_per_step={config.ei.questions_per_step} cannot be split evenly across {world_size} "
            "ranks: each rank generates for an equal share (a rank with none had nothing to average, and "
            f"under ZeRO-3 unequal shares run unequal collective forwards). Use a multiple of {world_size}"
        )
    rollout = config.rollout
    if rollout.placement == "dedicated" and rollout.device is not None and CUDA_DEVICE.fullmatch(rollout.device):
        problems += _dedicated_problems(rollout.device, world_size, devices, cuda_devices)
    if rollout.placement == "remote" and world_size > 1 and rollout.sleep_between_rollouts:
        problems.append(
            f"rollout.sleep_between_rollouts=true with rollout.placement=remote and world size {world_size}: "
            "the ranks share one rollout server, and the first rank done with its rollouts would put it to "
            "sleep while the others still generate. Set rollout.sleep_between_rollouts=false"
        )
    if problems:
        raise ConfigError(problems, "config (cluster checks)")


def _dedicated_problems(device: str, world_size: int, learner_devices: Sequence[str | torch.device],
                        cuda_devices: int | None) -> list[str]:
    import torch

    from rollout.engines.protocol import normalize_device  # here: importing the config stays torch-free

    problems = []
    engine = normalize_device(device)
    if world_size > 1:
        problems.append(
            f"rollout.placement=dedicated with world size {world_size}: rollout.device={device} names one "
            f"GPU, and each of the {world_size} learner ranks would start its own engine there. Use "
            "rollout.placement=colocated (an engine per rank on the rank's GPU) or rollout.placement=remote "
            "(one `reasonrl rollout-server` for all ranks), or launch a single learner process"
        )
    learners = sorted({str(normalize_device(d)) for d in learner_devices})
    if str(engine) in learners:
        problems.append(
            f"rollout.device={device}{'' if str(engine) == device else f' (= {engine})'} is also a learner "
            f"device (learners on {', '.join(learners)}): "
            "give the engine a GPU of its own, or use rollout.placement=colocated (sleep/wake)"
        )
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    assert engine.index is not None
    if engine.index >= count:
        problems.append(
            f"rollout.device={device}: this node has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            if count else
            f"rollout.device={device}: this node has no CUDA device, and a dedicated engine needs a GPU of its "
            "own: use rollout.placement=colocated"
        )
    return problems
