"""Asynchronous GRPO (`trainer.learners.async_rollouts`) on several learner ranks sharing one rollout server
(``rollout.placement: remote``).

Rank 0 alone runs the producer, and it samples each step's whole batch as one process would (`ONE_PROCESS`:
the same questions, seeds and statistics, and no collective on its thread). On the learner thread, in step on
every rank, rank 0 sends the batch to the others (`share_batch`), each rank trains on its slice of whole groups
(`rank_share`), and every rank takes part in the hand-over's forward and weight gathers (collective under
ZeRO-3) while rank 0 alone keeps the snapshot (`trainer.learners.grpo.hand_over`). Evaluation runs on rank 0's
producer thread and on the other ranks' learner threads, once the server holds the newest weights (a barrier
the producer reaches first); rank 0's learner thread waits meanwhile, so no two threads of a process use the
process group at once. A run on N ranks therefore trains on the batches a one-process run samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.learners.async_rollouts import ProducedBatch, RolloutProducer, RolloutProducerError


@dataclass(frozen=True)
class OneProcess:
    """The producer's view of the cluster: one process (rank 0 samples every rank's share, `share_batch`)."""

    num_processes: int = 1
    process_index: int = 0


ONE_PROCESS = OneProcess()


def share_batch(accelerator: Any, producer: RolloutProducer | None, step: int) -> ProducedBatch:
    """The batch of `step` from rank 0's producer, the same on every rank (collective: every rank calls it on
    its learner thread). A producer failure reaches every rank as `RolloutProducerError`."""
    if accelerator.num_processes == 1:
        assert producer is not None
        return producer.take(step)
    from accelerate.utils import broadcast_object_list

    payload: list[Any] = [None]
    error: RolloutProducerError | None = None
    if producer is not None:
        try:
            payload[0] = producer.take(step).to_json()
        except RolloutProducerError as err:
            error, payload[0] = err, {"error": str(err)}
    broadcast_object_list(payload, from_process=0)
    if error is not None:
        raise error
    if "error" in payload[0]:
        raise RolloutProducerError(f"rank 0's rollout producer failed: {payload[0]['error']}")
    return ProducedBatch.from_json(payload[0])


def rank_share(batch: ProducedBatch, rank: int, world: int) -> ProducedBatch:
    """Rank `rank`'s contiguous slice of `batch`'s rows (whole groups when the rows split evenly into `world`
    shares of whole groups, as the cluster checks require)."""
    n = len(batch.samples) // world
    rows = slice(rank * n, (rank + 1) * n)
    return ProducedBatch(batch.step, batch.samples[rows], batch.rewards[rows], batch.advantages[rows],
                         batch.metrics, batch.sampler_state)
