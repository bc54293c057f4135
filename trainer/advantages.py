"""Group-normalised advantages for GRPO (CS336 §7, eq. 28 of the handout / DeepSeekMath eq. 3).

For the ``G`` responses ``o^(1..G)`` sampled for one question with rewards ``r^(j)``:

    A^(j) = (r^(j) − mean(r^(1..G))) / (std(r^(1..G)) + ε)      (normalize_by_std=True)
    A^(j) =  r^(j) − mean(r^(1..G))                              (normalize_by_std=False, Dr. GRPO)

``std`` is the unbiased sample standard deviation (``torch.std`` default). Responses are laid out
group-contiguously: rows ``[k·G, (k+1)·G)`` belong to question ``k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def group_normalize(
    raw_rewards: torch.Tensor,
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> torch.Tensor:
    """Advantages ``A = (r − mean_group) / (std_group + eps)`` (or ``r − mean_group``), per group of rows.

    Args:
        raw_rewards: (N,) with ``N = n_groups · group_size``, group-contiguous.
    Returns:
        (N,) advantages, float32 (float64 for float64 input). A group whose rewards are all equal gets
        advantages 0 (what the formula gives for any eps > 0; also for eps = 0, where it would be NaN).
    Raises:
        ValueError if ``N`` is not divisible by ``group_size``, or if ``normalize_by_std`` is asked for
        groups of one (the unbiased std of one sample is undefined).
    """
    if raw_rewards.dim() != 1:
        raise ValueError(f"raw_rewards must be 1-D (N,); got shape {tuple(raw_rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1; got {group_size}")
    n = raw_rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(f"number of rewards {n} is not divisible by group_size {group_size}")
    if normalize_by_std and group_size < 2:
        raise ValueError(
            "normalize_by_std=True needs group_size >= 2 (std of a single sample is undefined); "
            "set normalize_by_std=False or raise group_size"
        )
    dtype = torch.float64 if raw_rewards.dtype == torch.float64 else torch.float32
    grouped = raw_rewards.to(dtype).view(-1, group_size)  # (n_groups, group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)  # (n_groups, group_size)
    if normalize_by_std:
        std = grouped.std(dim=-1, keepdim=True)  # (n_groups, 1)
        # A group with std 0 has a zero numerator; keep its advantages 0 even when eps = 0 (not 0/0 = NaN).
        centred = torch.where(std > 0, centred / (std + advantage_eps), centred)
    return centred.reshape(-1)  # (N,)


def reward_metadata(
    scores: Sequence[Mapping[str, float]],
    raw_rewards: torch.Tensor,
    group_size: int,
) -> dict[str, float]:
    """Batch statistics of the rewards, for logging.

    Args:
        scores: the N reward dicts (``reward``, ``format_reward``, ``answer_reward``).
        raw_rewards: (N,) the ``reward`` entries as a tensor.
    Returns:
        ``reward_mean``, ``reward_std`` (unbiased; 0 for N = 1), ``reward_min``, ``reward_max``,
        ``format_reward_rate`` and ``answer_reward_rate`` (means of those entries), and
        ``frac_zero_std_groups`` (groups whose rewards are all equal, so GRPO gets no signal from them).
    """
    n = raw_rewards.shape[0]
    if n == 0:
        raise ValueError("reward_metadata needs at least one reward")
    if len(scores) != n:
        raise ValueError(f"got {len(scores)} score dicts for {n} rewards")
    if n % group_size != 0:
        raise ValueError(f"number of rewards {n} is not divisible by group_size {group_size}")
    r = raw_rewards.double()
    grouped = r.view(-1, group_size)  # (n_groups, group_size)
    zero_std = (grouped.max(dim=-1).values == grouped.min(dim=-1).values).double()  # (n_groups,)
    return {
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()) if n > 1 else 0.0,
        "reward_min": float(r.min()),
        "reward_max": float(r.max()),
        "format_reward_rate": sum(float(s["format_reward"]) for s in scores) / n,
        "answer_reward_rate": sum(float(s["answer_reward"]) for s in scores) / n,
        "frac_zero_std_groups": float(zero_std.mean()),
    }

