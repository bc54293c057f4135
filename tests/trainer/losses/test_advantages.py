"""Group-normalised advantages: hand values, naive per-group loop, metadata, errors."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
import torch
from cs336_adapters import compute_group_normalized_rewards

from trainer.advantages import group_normalize, reward_metadata


def fake_reward_fn(response: str, ground_truth: str) -> dict[str, float]:
    """answer reward 1 if the response equals the ground truth; format reward 1 if it is non-empty."""
    answer = float(response == ground_truth)
    return {"reward": answer, "format_reward": float(bool(response)), "answer_reward": answer}


def test_group_normalize_hand_values() -> None:
    """rewards [1, 0, 0, 1 | 1, 1, 1, 1], G = 4, eps = 0:
    group 1: mean 0.5, unbiased std = sqrt(4·0.25/3) = 0.577350 → A = ±0.5/0.577350 = ±0.866025;
    group 2: all equal → A = 0 (std 0, numerator 0). Without std: [0.5, −0.5, −0.5, 0.5, 0, 0, 0, 0]."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = 0.866025
    torch.testing.assert_close(
        group_normalize(r, 4, 0.0, True),
        torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]),
        rtol=1e-6,
        atol=1e-6,
    )
    torch.testing.assert_close(
        group_normalize(r, 4, 1e-6, False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    )


def test_group_normalize_eps_in_denominator() -> None:
    """rewards [0, 2], eps = 1: mean 1, unbiased std = sqrt(2) → A = ±1/(sqrt 2 + 1) = ±0.414214."""
    got = group_normalize(torch.tensor([0.0, 2.0]), 2, 1.0, True)
    want = 1.0 / (math.sqrt(2.0) + 1.0)
    torch.testing.assert_close(got, torch.tensor([-want, want]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalize_by_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_group_normalize_matches_naive_loop(group_size: int, normalize_by_std: bool) -> None:
    gen = torch.Generator().manual_seed(group_size)
    r = torch.rand(5 * group_size, generator=gen)
    got = group_normalize(r, group_size, 1e-6, normalize_by_std)
    want = []
    values = r.tolist()
    for k in range(0, len(values), group_size):
        group = values[k : k + group_size]
        mean = statistics.fmean(group)
        for v in group:
            want.append((v - mean) / (statistics.stdev(group) + 1e-6) if normalize_by_std else v - mean)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_group_normalize_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by group_size 4"):
        group_normalize(torch.zeros(6), 4, 1e-6, True)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_normalize(torch.zeros(3), 1, 1e-6, True)
    with pytest.raises(ValueError, match="1-D"):
        group_normalize(torch.zeros(2, 2), 2, 1e-6, True)
    torch.testing.assert_close(group_normalize(torch.tensor([3.0, 1.0]), 1, 1e-6, False), torch.zeros(2))


def test_compute_group_normalized_rewards_hand_case() -> None:
    """G = 2, answers ["4", "5" | "", "7"] vs truths ["4", "4" | "7", "7"]:
    rewards [1, 0, 0, 1]; A = (r − 0.5)/(std + eps) with std = sqrt(0.5) → ±0.707107 (eps 0);
    format rate 3/4 (one empty response), answer rate 2/4, reward mean 0.5, unbiased std over all four
    = sqrt(1/3) = 0.577350, min 0, max 1; no group has zero std."""
    adv, raw, meta = compute_group_normalized_rewards(
        fake_reward_fn, ["4", "5", "", "7"], ["4", "4", "7", "7"], 2, 0.0, True
    )
    torch.testing.assert_close(raw, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    a = 0.707107
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a]), rtol=1e-6, atol=1e-6)
    assert raw.shape == adv.shape == (4,)
    assert meta["format_reward_rate"] == 0.75
    assert meta["answer_reward_rate"] == 0.5
    assert meta["reward_mean"] == 0.5
    assert abs(meta["reward_std"] - math.sqrt(1.0 / 3.0)) < 1e-9
    assert (meta["reward_min"], meta["reward_max"]) == (0.0, 1.0)
    assert meta["frac_zero_std_groups"] == 0.0


def test_compute_group_normalized_rewards_matches_split_parts() -> None:
    responses = ["1", "2", "3", "3", "3", "3", "9", "1", "1"]
    truths = ["1"] * 3 + ["3"] * 3 + ["1"] * 3
    adv, raw, meta = compute_group_normalized_rewards(fake_reward_fn, responses, truths, 3, 1e-6, False)
    scores = [fake_reward_fn(r, t) for r, t in zip(responses, truths, strict=True)]
    torch.testing.assert_close(adv, group_normalize(raw, 3, 1e-6, False))
    assert meta == reward_metadata(scores, raw, 3)
    assert meta["frac_zero_std_groups"] == pytest.approx(1.0 / 3.0)  # the "3, 3, 3" group


def test_compute_group_normalized_rewards_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by group_size"):
        compute_group_normalized_rewards(fake_reward_fn, ["a"] * 5, ["a"] * 5, 2, 1e-6, True)
    with pytest.raises(ValueError, match="ground truths"):
        compute_group_normalized_rewards(fake_reward_fn, ["a"] * 4, ["a"] * 2, 2, 1e-6, True)


def test_reward_metadata_single_reward_std_zero() -> None:
    meta = reward_metadata([{"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}], torch.ones(1), 1)
    assert meta["reward_std"] == 0.0
    assert meta["frac_zero_std_groups"] == 1.0


def test_batch_std_scope_by_hand() -> None:
    """Groups [1, 0] and [1, 1]: centred [0.5, −0.5, 0, 0]; the batch [1, 0, 1, 1] has unbiased std 0.5
    (mean 0.75, squares 0.75 / 3), so the advantages are [1, −1, 0, 0]; a batch of equal rewards stays 0."""
    from types import SimpleNamespace

    from trainer.batch_stats import divide_by_batch_std, global_std

    one_process: Any = SimpleNamespace(num_processes=1)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    centred = group_normalize(rewards, 2, 0.0, normalize_by_std=False)
    assert global_std(one_process, rewards) == pytest.approx(0.5, abs=1e-12)
    assert divide_by_batch_std(centred, 0.5, 0.0).tolist() == [1.0, -1.0, 0.0, 0.0]
    flat = torch.ones(4)
    assert global_std(one_process, flat) == 0.0
    assert divide_by_batch_std(group_normalize(flat, 2, 0.0, False), 0.0, 0.0).tolist() == [0.0] * 4
