"""A clean stop on SIGTERM: what a cluster sends before it kills a job (Slurm at the time limit, on preemption or
`scancel`; Kubernetes on eviction). The run finishes the step it is in, saves a checkpoint and ends with
`Stopped`, so ``--resume`` continues from that step instead of the last periodic checkpoint.

`StopSignal` records the signal (a handler on the main thread; further SIGTERMs change nothing: a launcher such
as torchrun forwards the one its workers got already); `requested` tells every rank whether any rank got one
(a collective, once per step), so all ranks stop after the same step. A launcher gives its workers limited time
after forwarding it (torchrun: 30 s, then SIGKILL): a step and its checkpoint must fit in it.

Ctrl-C (SIGINT) stops at once instead: `interrupt_in_one_line` turns it into one line for every entry point
(`reasonrl`, ``python -m trainer.tools.demo_real``, ``python -m trainer.tools.shaped``).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class Stopped(RuntimeError):
    """The run stopped early on a signal, after saving a checkpoint; `signum` is the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignal:
    """Context manager: while inside, SIGTERM is recorded in `received` instead of ending the process."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: Any = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers on the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self, accelerator: Any) -> int:
        """The signal any rank received (0: none), the same on every rank; every rank must call it."""
        if accelerator.num_processes == 1:
            return self.received
        import torch  # here, not at the top: the entry points import this module before anything heavy

        flag = torch.tensor([self.received], dtype=torch.int64, device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


@contextmanager
def interrupt_in_one_line() -> Iterator[None]:
    """Ctrl-C inside: one line, "reasonrl: interrupted", not a traceback; what was written stays (checkpoints
    are atomic). The KeyboardInterrupt goes on, so Python exits by SIGINT after its cleanup and a calling shell
    (a `for` loop) stops too."""
    try:
        yield
    except KeyboardInterrupt:
        print("reasonrl: interrupted", file=sys.stderr)
        sys.excepthook = _quiet_interrupt
        raise


def _quiet_interrupt(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """`sys.excepthook` that prints nothing for the KeyboardInterrupt `interrupt_in_one_line` has reported."""
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
