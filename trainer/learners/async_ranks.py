"""Asynchronous GRPO (`trainer.learners.async_rollouts`) on several learner ranks sharing one rollout server
(``rollout.placement: remote``).

Rank 0 alone runs the producer, and it samples each step's whole batch as one process would (`ONE_PROCESS`:
the same questions, seeds and statistics, and no collective on its thread). On the learner thread, in step on
every rank, rank 0 sends the batch to the others (`share_batch`), each rank trains on its slice of whole groups
(`rank_share`), and every rank takes part in the hand-over's forward and weight gathers (collective under
ZeRO-3) while rank 0 alone keeps the snapshot (`trainer.learners.grpo.hand_over`). Evaluation runs on rank 0's
producer thread and on the other ranks' learner threads, once the server holds the newest weights (a status the
producer sends when it gets there, `evaluate_everywhere`); rank 0's learner thread waits meanwhile, so no two
threads of a process use the process group at once. A run on N ranks therefore trains on the batches a
one-process run samples. Every message from rank 0 is ``{"ok": value}`` or ``{"error": text}``: a producer failure
reaches every rank as `RolloutProducerError`, in a step or before an evaluation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from trainer.learners.async_rollouts import ProducedBatch, RolloutProducer, RolloutProducerError

T = TypeVar("T")


@dataclass(frozen=True)
class OneProcess:
    """The producer's view of the cluster: one process (rank 0 samples every rank's share, `share_batch`)."""

    num_processes: int = 1
    process_index: int = 0


ONE_PROCESS = OneProcess()


def share_batch(accelerator: Any, producer: RolloutProducer | None, step: int) -> ProducedBatch:
    """The batch of `step` from rank 0's producer, the same on every rank (collective: every rank calls it on
    its learner thread)."""
    if accelerator.num_processes == 1:
        assert producer is not None
        return producer.take(step)
    if producer is None:
        return ProducedBatch.from_json(_receive())
    return ProducedBatch.from_json(_send(lambda: producer.take(step).to_json()))


def evaluate_everywhere(accelerator: Any, producer: RolloutProducer | None, evaluate: Callable[[], T]) -> T:
    """`evaluate()` on every rank once the rollout server holds the newest weights: on rank 0's producer thread
    (the engine's, between batches) and on the other ranks' learner threads once rank 0's producer sends that it
    is there. If the producer fails before, rank 0's learner thread sends the failure instead."""
    if producer is None:
        _receive()
        return evaluate()
    if accelerator.num_processes == 1:
        return producer.call(evaluate)
    started = threading.Event()

    def on_producer_thread() -> T:
        started.set()
        _send(lambda: None)
        return evaluate()

    try:
        return producer.call(on_producer_thread)
    except RolloutProducerError as err:
        if not started.is_set():  # the producer thread never got to the collective: this thread sends in its place
            _broadcast({"error": str(err)})
        raise


def _send(work: Callable[[], Any]) -> Any:
    """Rank 0: `work()`'s result to every rank (or its `RolloutProducerError`, then raised here too)."""
    try:
        value = work()
    except RolloutProducerError as err:
        _broadcast({"error": str(err)})
        raise
    return _broadcast({"ok": value})["ok"]


def _receive() -> Any:
    """The other ranks: what rank 0 sends with `_send`; its failure raised as `RolloutProducerError`."""
    message = _broadcast(None)
    if "error" in message:
        raise RolloutProducerError(f"rank 0's rollout producer failed: {message['error']}")
    return message["ok"]


def _broadcast(message: dict[str, Any] | None) -> dict[str, Any]:
    from accelerate.utils import broadcast_object_list

    payload = [message]
    broadcast_object_list(payload, from_process=0)
    return payload[0]  # type: ignore[return-value]


def rank_share(batch: ProducedBatch, rank: int, world: int) -> ProducedBatch:
    """Rank `rank`'s contiguous slice of `batch`'s rows (whole groups when the rows split evenly into `world`
    shares of whole groups, as the cluster checks require)."""
    n = len(batch.samples) // world
    rows = slice(rank * n, (rank + 1) * n)
    return ProducedBatch(batch.step, batch.samples[rows], batch.rewards[rows], batch.advantages[rows],
                         batch.metrics, batch.sampler_state)
