"""Statistics of a GRPO step's rollout batch taken over every data-parallel rank, so each rank logs (and
normalises by) the numbers of the whole batch, as one process holding it all would: the reward statistics
(`trainer.advantages.reward_metadata`), a mean, the rewards' standard deviation
(``grpo.std_normalization_scope: batch``: group-centred rewards over the batch std, as REINFORCE++ and
ScaleRL normalise), a maximum, and the elementwise sum every learner reduces with (`sum_over_processes`).
On one process each is the plain local value; `accelerator` is accelerate's (only ``num_processes``,
``device``, ``reduce`` are used).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rollout.reward import RewardResult
from trainer.advantages import reward_metadata


def global_reward_metrics(accelerator: Any, scores: list[RewardResult], group_size: int) -> dict[str, float]:
    """`reward_metadata` over every rank's rollouts (gathered; ranks may hold different numbers of whole
    groups under dynamic sampling), so every rank computes the global statistics."""
    keys = ("reward", "format_reward", "answer_reward")
    rows = [(sc.reward, sc.format_reward, sc.answer_reward) for sc in scores]  # (N_rank, 3), in `keys` order
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = [tuple(row) for rank_rows in gather_object([rows]) for row in rank_rows]  # rank-major
    table = torch.tensor(rows, dtype=torch.float32).reshape(-1, len(keys))  # (N, 3)
    meta = reward_metadata([dict(zip(keys, row, strict=True)) for row in rows], table[:, 0], group_size)
    return {f"reward/{k}": float(v) for k, v in meta.items()}


def global_std(accelerator: Any, rewards: torch.Tensor) -> float:
    """The unbiased std of every rank's `rewards` together (0 for fewer than two)."""
    r = rewards.double()
    moments = sum_over_processes(accelerator, torch.stack([torch.tensor(float(len(r)), dtype=torch.float64), r.sum(),
                                                (r * r).sum()]))
    n, total, squares = moments.tolist()
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0


def divide_by_batch_std(centred: torch.Tensor, std: float, eps: float) -> torch.Tensor:
    """Group-centred advantages over the batch's reward std (+ eps); unchanged (all 0) where the std is 0."""
    return centred if std == 0 else centred / (std + eps)


def global_mean(accelerator: Any, values: list[float]) -> float:
    """The mean of `values` over every rank's entries."""
    total = sum_over_processes(accelerator, torch.tensor([sum(values), len(values)], dtype=torch.float64))
    return float(total[0] / total[1])


def global_max(accelerator: Any, value: int) -> int:
    """The largest of every rank's `value`."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), "max"))


def sum_over_processes(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    """`values` summed elementwise over all ranks (every rank must call it), on the CPU; itself on one process."""
    if accelerator.num_processes == 1:
        return values
    summed: torch.Tensor = accelerator.reduce(values.to(accelerator.device), "sum")
    return summed.cpu()
