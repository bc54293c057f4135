"""Worker for ``tests/trainer/learners/test_async_ranks.py`` (not a test module): asynchronous GRPO's hand-out of
rank 0's rollout batches to every learner rank.

Run as one plain process (world 1) and as 2 gloo ranks (``torchrun --nproc_per_node 2``). Rank 0 runs a real
`RolloutProducer` whose sample function draws 4 questions of the sampler per step and makes a group of 2
samples for each (rewards 0..7 in row order); the batch of step 2 fails (the server gone). Every rank calls
`share_batch` for steps 1 and 2 and keeps `rank_share` of step 1, then `evaluate_everywhere` with the failed
producer, then with a working one. Each rank writes ``OUT/rank{R}.json``: the rows of the whole batch (question
index and reward), its own rows, the errors step 2 and the first evaluation raised, and what the second
evaluation returned (the rank, and whether it ran on the main thread). The process group has a 60 s timeout, so
a rank left waiting in a collective fails instead of hanging.
Usage: ``python tests/share_worker.py OUT_DIR``.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS, GROUP = 4, 2


def sample(side: Any, sampler: Any, step: int) -> tuple[list[Any], torch.Tensor, torch.Tensor, dict[str, float]]:
    from rollout.engines.protocol import Sample

    if step == 2:
        raise ConnectionError("the rollout server is gone")
    questions = sampler.draw(QUESTIONS)
    samples = [Sample(q, [1, 2], [3 + g], "", [-0.5], "stop", 0) for q in questions for g in range(GROUP)]
    rewards = torch.arange(len(samples), dtype=torch.float32)
    return samples, rewards, rewards - rewards.mean(), {"reward/reward_mean": float(rewards.mean())}


def main(out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from trainer.data.sampler import QuestionSampler
    from trainer.learners.async_ranks import ONE_PROCESS, evaluate_everywhere, rank_share, share_batch
    from trainer.learners.async_rollouts import RolloutProducer, RolloutProducerError, RolloutSide
    from trainer.timing import PhaseTimer

    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))])

    def start_producer(total: int) -> RolloutProducer | None:
        if acc.process_index != 0:
            return None
        side = RolloutSide(None, ONE_PROCESS, None, None, PhaseTimer())  # type: ignore[arg-type]
        return RolloutProducer(side, QuestionSampler(list(range(100)), seed=3), sample,
                               lambda engine, snapshot: {}, start=0, total=total, max_staleness=1)

    def where() -> list[Any]:
        return [acc.process_index, threading.current_thread() is threading.main_thread()]

    producer = start_producer(total=2)
    whole = share_batch(acc, producer, 1)
    mine = rank_share(whole, acc.process_index, acc.num_processes)
    result: dict[str, Any] = {
        "whole": [[x.prompt_index, r] for x, r in zip(whole.samples, whole.rewards.tolist(), strict=True)],
        "mine": [[x.prompt_index, r] for x, r in zip(mine.samples, mine.rewards.tolist(), strict=True)],
        "metrics": whole.metrics.get("reward/reward_mean"),
    }
    try:
        share_batch(acc, producer, 2)
        result["error"] = None
    except RolloutProducerError as err:
        result["error"] = str(err)
    try:
        evaluate_everywhere(acc, producer, where)
        result["eval_error"] = None
    except RolloutProducerError as err:
        result["eval_error"] = str(err)
    if producer is not None:
        producer.close()
    working = start_producer(total=1)
    result["evaluated"] = evaluate_everywhere(acc, working, where)
    if working is not None:
        working.close()
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():  # an exit with the gloo group alive can abort (`Learner.end_distributed`)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
