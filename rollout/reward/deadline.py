"""A wall-clock limit for pure-Python work on any thread: `call_with_deadline`.

``signal.alarm`` (math-verify's own timeout) works only on the main thread, and a thread cannot be killed.
Instead one watchdog thread per process raises `DeadlineExceeded` *inside* the late thread with
``PyThreadState_SetAsyncExc``; the interpreter delivers it at the thread's next bytecode boundary (a call
or a loop back-edge), so sympy's Python loops stop within milliseconds. A single long C call (one
multiplication of million-digit integers) is not interrupted: the guards in `rollout.reward.guard` keep
such inputs away. `DeadlineExceeded` is a `BaseException`, so ``except Exception`` blocks in the libraries
do not swallow it (sympy, math-verify and latex2sympy have no bare ``except:``).

The watchdog starts on first use, never in a process that only imports this module (the reward pool's
template forks workers and must stay single-threaded), and a forked child starts its own.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["DeadlineExceeded", "call_with_deadline"]

T = TypeVar("T")


class DeadlineExceeded(BaseException):
    """Raised inside a thread whose `call_with_deadline` ran past its limit."""


class _Watchdog:
    """Armed deadlines of this process and the thread that enforces them."""

    def __init__(self) -> None:
        # Entered by late threads, where the exception may land at any bytecode boundary: `disarm` holds the
        # lock through ``with self.lock`` (C enter and exit, nothing in between where it can land), never
        # through the Condition's Python ``__enter__``, which an exception could leave with the lock taken.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.armed: dict[int, tuple[float, int]] = {}  # token -> (deadline, thread ident)
        self.fired: set[int] = set()
        self.next_token = 0
        self.thread: threading.Thread | None = None

    def arm(self, seconds: float) -> int:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="grading-deadline", daemon=True)
                self.thread.start()
            self.next_token += 1
            self.armed[self.next_token] = (time.monotonic() + seconds, threading.get_ident())
            self.cond.notify()
            return self.next_token

    def disarm(self, token: int) -> None:
        """After this returns no exception for `token` is pending or will be raised."""
        with self.lock:
            self.armed.pop(token, None)
            if token in self.fired:
                self.fired.discard(token)
                _async_raise(threading.get_ident(), None)  # clear it if not yet delivered

    def _run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                for token, (deadline, ident) in list(self.armed.items()):
                    if deadline <= now:
                        del self.armed[token]
                        self.fired.add(token)
                        _async_raise(ident, DeadlineExceeded)
                deadlines = [deadline for deadline, _ in self.armed.values()]
                self.cond.wait(min(deadlines) - now if deadlines else None)


def _async_raise(ident: int, exc: type[BaseException] | None) -> None:
    """Make `exc` pending in thread `ident` (None clears a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc) if exc else None)


_watchdog = _Watchdog()


def _reset_after_fork() -> None:
    global _watchdog
    _watchdog = _Watchdog()  # the parent's watchdog thread does not exist in a forked child


os.register_at_fork(after_in_child=_reset_after_fork)


def call_with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """``fn()``, or `DeadlineExceeded` raised from inside it once `seconds` of wall time have passed.

    Not reentrant on one thread (an inner call's limit would clear the outer one's pending exception).

    >>> call_with_deadline(lambda: 42, 1.0)
    42
    """
    token = _watchdog.arm(seconds)
    try:
        return fn()
    finally:
        _watchdog.disarm(token)
