"""Data order: a resumable question sampler (seeded epoch-wise shuffles with a cursor that checkpoints
save) for the rollout modes, and the seeded held-out split and epoch batches of the dataset modes (SFT,
DPO, expert iteration's SFT phase). Every order is a pure function of (seed, epoch), so every rank
computes the same one and a resumed run needs only the step (or the sampler's cursor)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from trainer.checkpoint import ResumeError

T = TypeVar("T")


class QuestionSampler(Generic[T]):
    """Draws items without replacement, reshuffling (seed + epoch) when an epoch is used up.

    Every rank holds the same sampler state, so all ranks draw the same questions and shard them.
    """

    def __init__(self, items: Sequence[T], seed: int) -> None:
        if not items:
            raise ValueError("QuestionSampler needs at least one item (is the dataset empty?)")
        self.items = items
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def draw(self, n: int) -> list[T]:
        out: list[T] = []
        while len(out) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffle()
            take = min(n - len(out), len(self._order) - self.cursor)
            out += [self.items[i] for i in self._order[self.cursor : self.cursor + take]]
            self.cursor += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": len(self.items)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position. The order is a function of the number of items, so a state saved
        over another number (the training data changed: its file, ``data.train_limit``, the prompts dropped as
        too long) would silently draw other questions: `ValueError` (states saved before ``size`` was kept are
        checked by their cursor only): `ResumeError`."""
        size = state.get("size", len(self.items))
        if size != len(self.items) or not 0 <= state["cursor"] <= len(self.items):
            raise ResumeError(
                f"the checkpoint's question order was drawn over {size} training questions (position "
                f"{state['cursor']} of epoch {state['epoch']}), this run has {len(self.items)}: the training data "
                "changed since the checkpoint (its file, data.train_limit, data.train_source, or the prompts "
                "dropped as too long). Resume with the data the run trained on, or start a new run")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._shuffle()


def split_heldout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded ``round(fraction·n)`` held out (at least 1 if fraction > 0)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = 0 if fraction == 0 else min(n - 1, max(1, round(fraction * n)))
    return sorted(order[k:]), sorted(order[:k])


def epoch_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of each optimizer batch of one epoch: a seeded permutation cut in `batch_size` chunks."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer batches in an epoch of `n` rows, a short last batch included (every rank runs it, with
    zero-weight stand-ins where it has no rows: `trainer.data.batching.deal_micro_batches`)."""
    return math.ceil(n / batch_size)


def step_stream(epoch: Callable[[int], Iterator[T]], steps_per_epoch: int, start_step: int) -> Iterator[T]:
    """The items of epochs 0, 1, 2, … (``epoch(e)`` yields one item per optimizer step), after skipping the
    first `start_step` (resume: the order is a pure function of the epoch, so nothing else is saved)."""
    first, skip = divmod(start_step, steps_per_epoch)
    for e in itertools.count(first):
        yield from itertools.islice(epoch(e), skip if e == first else 0, None)
