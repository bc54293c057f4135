"""Held-out evaluation split over data-parallel ranks (`Session.evaluate`, `trainer.evaluate.eval_share`):
two ranks with engines of their own each sample a contiguous share of the questions (with all of each
question's samples), seeded as one process would seed them, and rank 0 logs what one process logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from eval_worker import QUESTIONS
from helpers import REPO, launch_worlds

from trainer.tracking import read_metrics

WORKER = REPO / "tests" / "eval_worker.py"
TIMEOUT_S = 300


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
@pytest.mark.parametrize("n", [1, 3])
def test_two_ranks_evaluate_a_share_each_and_log_what_one_process_logs(n: int, tiny_qwen2_path: str,
                                                                       tmp_path: Path) -> None:
    """Samples, grades and metrics (pass@k too, with n = 3 samples per question) equal world 1's; entropies
    to 1e-5 (each rank scores its share in its own padded batches: float32 sums in another order, measured
    ~1e-7)."""
    launch_worlds(WORKER, lambda world: [tiny_qwen2_path, str(tmp_path / f"w{world}"), str(world), str(n)],
                  tmp_path, TIMEOUT_S)
    shares = {w: json.loads((tmp_path / f"w{w}" / "shares.json").read_text()) for w in (1, 2)}
    assert shares == {1: [QUESTIONS * n], 2: [4 * n, 3 * n]}
    records = {w: [json.loads(line) for line in (tmp_path / f"w{w}" / "run" / "eval" / "step_000000.jsonl").open()]
               for w in (1, 2)}  # fmt: skip
    assert len(records[1]) == QUESTIONS * n
    assert [(r["question"], r["sample"]) for r in records[2]] == [(q, k) for q in range(QUESTIONS) for k in range(n)]
    assert len({r["response"] for r in records[1]}) > 1, "sampled responses differ between questions"
    for one, two in zip(records[1], records[2], strict=True):
        assert math.isclose(one.pop("entropy"), two.pop("entropy"), rel_tol=0, abs_tol=1e-5)
        assert one == two
    logged = {w: next(r for r in read_metrics(tmp_path / f"w{w}" / "run") if "eval/accuracy" in r) for w in (1, 2)}
    assert logged[1].keys() == logged[2].keys()
    evals = {k: float(v) for k, v in logged[1].items() if k.startswith("eval/")}  # NaN is logged as "nan"
    assert evals["eval/n"] == QUESTIONS and len(evals) == {1: 8, 3: 11}[n]  # + pass@1, @2, @3
    for key, value in evals.items():
        other, tol = float(logged[2][key]), 1e-5 if "entropy" in key else 0.0
        assert (math.isnan(value) and math.isnan(other)) or abs(other - value) <= tol, (key, value, other)
