"""`combine_rank_metrics`: what rank 0 logs from every rank's metrics, by hand."""

from __future__ import annotations

import pytest

from trainer.rank_metrics import combine_rank_metrics


def test_each_kind_of_metric_by_hand() -> None:
    """Two ranks. Means: loss (1 + 3) / 2 = 2; eval time only on rank 0 → 4 (not 4 / 2); totals: samples
    8 + 8 = 16, tokens/s 100 + 300 = 400; maxima: response_len_max max(7, 9) = 9, policy_lag max(0, 1) = 1;
    the already-global reward mean is rank 0's (the same on every rank)."""
    ranks = [
        {"train/loss": 1.0, "time/eval": 4.0, "rollout/samples": 8.0, "rollout/output_tokens_per_s": 100.0,
         "rollout/response_len_max": 7.0, "rollout/policy_lag": 0.0, "reward/reward_mean": 0.25},
        {"train/loss": 3.0, "rollout/samples": 8.0, "rollout/output_tokens_per_s": 300.0,
         "rollout/response_len_max": 9.0, "rollout/policy_lag": 1.0, "reward/reward_mean": 0.25},
    ]  # fmt: skip
    got = combine_rank_metrics(ranks, already_global={"reward/reward_mean"})
    assert got == {
        "train/loss": 2.0, "time/eval": 4.0, "rollout/samples": 16.0, "rollout/output_tokens_per_s": 400.0,
        "rollout/response_len_max": 9.0, "rollout/policy_lag": 1.0, "reward/reward_mean": 0.25,
    }  # fmt: skip


@pytest.mark.parametrize(
    "key",
    ["train/learner_tokens_per_s", "train/model_tflops_per_s", "rollout/prompt_tokens", "rollout/output_tokens",
     "rollout/finish_stop", "rollout/finish_length", "rollout/dropped_zero_std_groups", "reward/timeouts",
     "reward/errors", "reward/worker_restarts", "reward/samples"],
)  # fmt: skip
def test_job_totals_are_summed(key: str) -> None:
    assert combine_rank_metrics([{key: 2.0}, {key: 5.0}])[key] == 7.0


@pytest.mark.parametrize("key", ["train/mfu", "train/grad_norm", "rollout/sync_s", "reward/latency_p99_ms",
                                 "rollout/response_len_mean", "time/step"])  # fmt: skip
def test_rates_and_per_rank_quantities_are_averaged(key: str) -> None:
    assert combine_rank_metrics([{key: 2.0}, {key: 5.0}])[key] == 3.5


def test_one_rank_is_returned_unchanged() -> None:
    one = {"train/loss": 0.5, "rollout/samples": 4.0, "time/save": 1.5}
    assert combine_rank_metrics([one]) == one
