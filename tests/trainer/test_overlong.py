"""DAPO's overlong reward shaping and overlong filtering (`trainer.overlong`): the penalty against eq. 13 of
the paper written out case by case, the shaped scores, the config check, the masked rows' contribution to the
gradient (none: exactly the batch without them under token normalisation), and a GRPO run that logs the shaped
reward as task reward + penalty."""

from __future__ import annotations

import doctest
import math
import random
from pathlib import Path

import pytest
import torch
from grpo_setups import random_rollout_batch, small_config
from helpers import capture_grads_at_step

from rollout.engines.protocol import Sample
from rollout.reward import RewardResult
from trainer import overlong
from trainer.config import ConfigError
from trainer.learner import Learner
from trainer.learners.grpo import RolloutBatch, micro_step, train_grpo
from trainer.overlong import mask_truncated, overlong_penalty, shape_overlong
from trainer.tracking import read_metrics


def dapo_eq13(length: int, l_max: int, l_cache: int) -> float:
    """R_length of DAPO (arXiv 2503.14476) eq. 13, case by case as printed."""
    if length <= l_max - l_cache:
        return 0.0
    if l_max - l_cache < length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


def test_penalty_is_dapo_eq13_times_the_factor() -> None:
    rng = random.Random(0)
    for _ in range(500):
        l_max = rng.randint(2, 300)
        l_cache, length, factor = rng.randint(1, l_max - 1), rng.randint(0, l_max + 5), rng.uniform(0.1, 3.0)
        expected = factor * dapo_eq13(length, l_max, l_cache)
        assert overlong_penalty(length, l_max, l_cache, factor) == pytest.approx(expected, abs=1e-12)
    assert overlong_penalty(16, 20, 4) == 0.0 and overlong_penalty(17, 20, 4) == -0.25  # by hand
    assert overlong_penalty(20, 20, 4, factor=0.5) == -0.5
    assert doctest.testmod(overlong).failed == 0


@pytest.mark.parametrize("buffer", [0, 20, 21])
def test_a_buffer_outside_the_length_is_refused(buffer: int, tiny_qwen2_path: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"overlong buffer must be in 1\.\.19"):
        overlong_penalty(5, 20, buffer)
    if buffer:
        with pytest.raises(ConfigError, match=f"grpo.overlong_buffer={buffer} >= rollout.max_tokens=20"):
            small_config(tiny_qwen2_path, tmp_path, "rollout.max_tokens=20", f"grpo.overlong_buffer={buffer}")


def _sample(length: int, finish: str) -> Sample:
    return Sample(0, [5, 6], list(range(7, 7 + length)), "x", [-1.0] * length, finish, 0)  # type: ignore[arg-type]


def test_shaping_moves_only_the_reward() -> None:
    samples = [_sample(n, "length" if n == 10 else "stop") for n in (3, 8, 10)]
    scores = [RewardResult(1.0, 1.0, 1.0), RewardResult(1.0, 0.0, 0.0), RewardResult(0.0, 0.0, 0.0)]
    shaped = shape_overlong(samples, scores, max_tokens=10, buffer=4, factor=1.0)
    assert shaped == [RewardResult(1.0, 1.0, 1.0), RewardResult(1.0, 0.0, -0.5), RewardResult(0.0, 0.0, -1.0)]
    assert [x.extra["overlong_penalty"] for x in samples] == [0.0, -0.5, -1.0]


def _grads(tiny_qwen2_path: str, tmp_path: Path, mode: str, batch: RolloutBatch, rows: list[int]) -> torch.Tensor:
    """The gradient of one micro-step over `rows` of `batch` (token count: their response tokens)."""
    cfg = small_config(tiny_qwen2_path, tmp_path, "grpo.loss_type=grpo_clip", "model.dtype=float32",
                       f"grpo.length_normalization={mode}", "grpo.gradient_accumulation_steps=1")
    learner = Learner(cfg.model, cfg.optim)
    captured = capture_grads_at_step(learner)
    index = torch.tensor(rows)
    count = max(float(batch.tokens.response_mask[index].sum()), 1.0)
    micro_step(learner, cfg, batch, index, count, None)
    learner.step()
    return torch.cat([g.flatten() for g in captured.values()])


@pytest.mark.parametrize("mode", ["token", "sequence_mean", "constant"])
def test_truncated_rows_add_nothing_to_the_gradient(tiny_qwen2_path: str, tmp_path: Path, mode: str) -> None:
    """Rows 1 and 3 stopped at the limit: with their masks emptied, the step over all 4 rows takes the gradient
    of rows 0 and 2 alone, exactly under token normalisation, × 2/4 (rows kept / rows) under the per-row means."""
    batch = random_rollout_batch()
    samples = [_sample(1, finish) for finish in ("stop", "length", "stop", "length")]
    masked = RolloutBatch(random_rollout_batch().tokens, batch.raw_rewards, batch.advantages,
                          batch.rollout_log_probs, batch.old_log_probs)
    assert mask_truncated(masked.tokens, samples) == 2
    assert masked.tokens.response_mask[[1, 3]].sum() == 0
    assert torch.equal(masked.tokens.response_mask[[0, 2]], batch.tokens.response_mask[[0, 2]])
    all_rows = _grads(tiny_qwen2_path, tmp_path, mode, masked, [0, 1, 2, 3])
    kept_rows = _grads(tiny_qwen2_path, tmp_path, mode, batch, [0, 2])
    scale = 1.0 if mode == "token" else 2 / 4
    assert float(kept_rows.norm()) > 0
    assert float((all_rows - scale * kept_rows).norm()) <= 1e-5 * float(kept_rows.norm())
    only_truncated = _grads(tiny_qwen2_path, tmp_path, mode, masked, [1, 3])  # no response token at all
    assert float(only_truncated.abs().max()) == 0.0


@pytest.mark.slow
def test_a_run_logs_the_shaped_reward(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """Two GRPO steps with 8-token responses, the last 4 of them an overlong buffer (factor 0.5), truncated
    responses masked: the logged reward is the task reward (r1_zero: the answer reward) plus the mean penalty,
    which a random tiny policy, running into the limit, makes negative."""
    cfg = small_config(tiny_qwen2_path, tmp_path / "run", "grpo.n_grpo_steps=2", "grpo.overlong_buffer=4",
                       "grpo.overlong_penalty=0.5", "grpo.mask_truncated=true",
                       "grpo.length_normalization=token")
    train_grpo(cfg)
    records = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert len(records) == 2
    for rec in records:
        penalty = rec["reward/overlong_penalty_mean"]
        assert -0.5 <= penalty < 0 and rec["rollout/finish_length"] > 0
        assert rec["reward/reward_mean"] == pytest.approx(rec["reward/answer_reward_rate"] + penalty, abs=1e-6)
        assert math.isfinite(rec["train/loss"]) and math.isfinite(rec["train/grad_norm"])
