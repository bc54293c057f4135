"""Phase timing: ``with timer("generate"): ...`` accumulates seconds reported as ``time/generate``."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.last: dict[str, float] = {}  # duration of each phase's most recent `with` block

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.last[phase] = time.perf_counter() - start
            self.seconds[phase] += self.last[phase]

    def pop(self) -> dict[str, float]:
        """``time/<phase>`` for every phase since the last pop, then reset."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = sum(self.seconds.values())
        self.seconds.clear()
        return out
