"""Asynchronous GRPO on several learner ranks: rank 0's producer samples the whole batch, `share_batch` hands it
to every rank and `rank_share` gives each its whole groups; `evaluate_everywhere` runs on rank 0's producer thread
and the other ranks' learner threads; a producer failure reaches every rank as one `RolloutProducerError`, in a
step or before an evaluation. Two real gloo ranks against one process (`tests/share_worker.py`). Whole runs on two
ranks through a rollout server: `tests/trainer/test_deepspeed_runs.py::test_zero3_ranks_share_one_rollout_server`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, launch_worlds

from rollout.engines.protocol import Sample
from trainer.learners.async_ranks import rank_share
from trainer.learners.async_rollouts import ProducedBatch

WORKER = REPO / "tests" / "share_worker.py"


def test_rank_share_by_hand() -> None:
    """6 rows (3 groups of 2) over 3 ranks: rows 0-1, 2-3, 4-5; the batch's metrics go with every share."""
    samples = [Sample(i // 2, [1], [2], "", [0.0], "stop", 0) for i in range(6)]
    batch = ProducedBatch(4, samples, torch.arange(6.0), torch.arange(6.0) - 2.5, {"reward/reward_mean": 2.5})
    shares = [rank_share(batch, rank, 3) for rank in range(3)]
    assert [[x.prompt_index for x in s.samples] for s in shares] == [[0, 0], [1, 1], [2, 2]]
    assert [s.rewards.tolist() for s in shares] == [[0, 1], [2, 3], [4, 5]]
    assert [s.advantages.tolist() for s in shares] == [[-2.5, -1.5], [-0.5, 0.5], [1.5, 2.5]]
    assert all(s.step == 4 and s.metrics == {"reward/reward_mean": 2.5} for s in shares)


@pytest.mark.slow
def test_every_rank_gets_rank_0s_batch_and_its_error(tmp_path: Path) -> None:
    """World 2 against world 1: both ranks receive the batch one process samples (8 rows, the same questions and
    rewards), rank 0 keeps rows 0-3 and rank 1 rows 4-7, and the failed batch of step 2 raises on both ranks:
    rank 0's own error, rank 1 the same cause named as rank 0's producer's. An evaluation after that failure
    raises on both ranks too (rank 1 waited in a barrier for ever before), and with a working producer it runs on
    rank 0's producer thread and on rank 1's main thread."""
    for world in (1, 2):
        (tmp_path / f"w{world}").mkdir()
    launch_worlds(WORKER, lambda world: [str(tmp_path / f"w{world}")], tmp_path, timeout_s=240)
    one = json.loads((tmp_path / "w1" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "w2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(one["whole"]) == 8 and [r for _, r in one["whole"]] == list(range(8))
    assert [q for q, _ in one["whole"]][::2] == [q for q, _ in one["whole"]][1::2]  # groups of 2
    assert one["mine"] == one["whole"] and one["metrics"] == 3.5
    assert all(rank["whole"] == one["whole"] and rank["metrics"] == 3.5 for rank in ranks)
    assert ranks[0]["mine"] == one["whole"][:4] and ranks[1]["mine"] == one["whole"][4:]
    for rank in (one, *ranks):
        assert "generating the rollouts of step 2" in rank["error"]
        assert "ConnectionError: the rollout server is gone" in rank["error"]
    assert ranks[1]["error"].startswith("rank 0's rollout producer failed: the rollout producer failed while")
    assert one["error"] == ranks[0]["error"]
    for rank in (one, *ranks):
        assert "running a call (evaluation)" in rank["eval_error"] and "ConnectionError" in rank["eval_error"]
    assert ranks[1]["eval_error"].startswith("rank 0's rollout producer failed: ")
    assert one["eval_error"] == ranks[0]["eval_error"]
    assert one["evaluated"] == [0, False] and [r["evaluated"] for r in ranks] == [[0, False], [1, True]]
