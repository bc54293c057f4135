"""A resumable question sampler: seeded epoch-wise shuffles with a cursor that checkpoints save."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Generic, TypeVar

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
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._shuffle()
