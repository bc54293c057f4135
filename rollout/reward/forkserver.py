"""The fork server behind `rollout.reward.pool.RewardScorer`: a template process forks worker processes.

A *template* is a fresh interpreter started with ``subprocess`` (fork+exec, the *spawn* model: nothing of
the parent is copied), so it is safe when the parent has threads, torch, CUDA or vLLM loaded; unlike
``multiprocessing``'s spawn and forkserver it never re-imports the parent's ``__main__`` (under ``accelerate
launch`` that is the training script). It imports the reward function's module, warms sympy up, sees no
GPU and runs under an address-space limit. It never starts a thread, so it can fork workers safely; a
request carries the worker's two pipe ends (SCM_RIGHTS), so the parent talks to each worker directly in
length-prefixed pickle frames, and a replacement worker is ready in milliseconds rather than after an
interpreter start. Nothing outlives the parent: the template exits when its socket closes, and workers
die with the template (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollout.reward.functions import RewardFn, RewardResult, check_result, get_reward_fn
from rollout.reward.grading import warm_up

__all__ = ["Frames", "Processes", "Template", "Worker", "frame", "write_all"]

# --------------------------------------------------------------------------------------------------
# Wire format: 8-byte little-endian length, then a pickle. Both ends are this module.

_HEADER = struct.Struct("<Q")


def frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(read: Callable[[int], bytes]) -> Any:
    """The next frame from `read` (``os.read`` of a pipe or ``socket.recv``), or None at EOF."""
    header = _read_exact(read, _HEADER.size)
    if header is None:
        return None
    body = _read_exact(read, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


class Frames:
    """Frames arriving in pieces on a non-blocking reader."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self.buf += data
        out = []
        while len(self.buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < _HEADER.size + size:
                break
            out.append(pickle.loads(bytes(self.buf[_HEADER.size : _HEADER.size + size])))
            del self.buf[: _HEADER.size + size]
        return out


# --------------------------------------------------------------------------------------------------
# Template and worker processes (module docstring).

_BOOTSTRAP = """
import os, pickle, socket, struct, sys, traceback
sock = socket.socket(fileno=int(sys.argv[1]))
os.dup2(2, 1)  # stray prints go to stderr
def _read(n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            os._exit(0)
        buf += chunk
    return buf
sys.path[:] = pickle.loads(_read(struct.unpack("<Q", _read(8))[0]))
try:
    from rollout.reward.forkserver import template_main
except BaseException:
    data = pickle.dumps(("startup_error", traceback.format_exc()))
    sock.sendall(struct.pack("<Q", len(data)) + data)
    os._exit(1)
template_main(sock)
os._exit(0)  # at once: its workers die with it (PR_SET_PDEATHSIG); no slow interpreter teardown
"""


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent (the single-threaded template) exits."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before we asked
        os._exit(0)


def template_main(sock: socket.socket) -> None:
    """Template loop: config frame; import, warm up, "ready"; then fork a worker per request."""
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    config = _recv(sock.recv)
    if config is None:
        return
    try:
        if config["memory_limit_mb"]:
            import resource

            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = config["memory_limit_mb"] * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
        how, what = config["fn"]
        fn = get_reward_fn(what) if how == "name" else pickle.loads(what)
        warm_up()  # sympy's first-use costs are paid once, here, not inside a sample's time limit
    except BaseException:
        sock.sendall(frame(("startup_error", traceback.format_exc())))
        return
    # Workers share the template's objects copy-on-write; a garbage collection in a worker would walk
    # (and so copy) all of them, ~0.1 s per worker and far more on a loaded machine. Freeze them out.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished workers
    sock.sendall(frame(("ready", os.getpid())))
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1, 2)
        except OSError:
            return
        if not msg or len(fds) != 2:  # EOF: the parent has gone
            return
        template = os.getpid()
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _die_with_parent(template)
                _serve(fn, fds[0], fds[1])
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        os.close(fds[0])
        os.close(fds[1])


def _serve(fn: RewardFn, in_fd: int, out_fd: int) -> None:
    """Worker loop: "ready", then for each ("score", [(index, response, gold), …]) one ("result", index,
    scores | None, error | None, seconds) frame per sample, written as soon as it is known."""
    write_all(out_fd, frame(("ready", os.getpid())))
    while True:
        msg = _recv(lambda n: os.read(in_fd, n))
        if msg is None or msg[0] == "exit":
            return
        for index, response, gold in msg[1]:
            start = time.perf_counter()
            scores: RewardResult | None = None
            error: str | None = None
            try:
                scores = check_result(fn(response, gold))
            except Exception as err:
                error = f"{type(err).__name__}: {err}"[:500]
            write_all(out_fd, frame(("result", index, scores, error, time.perf_counter() - start)))


# --------------------------------------------------------------------------------------------------
# Parent side


@dataclass
class Template:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    frames: Frames = field(default_factory=Frames)

    @classmethod
    def start(cls, fn_spec: tuple[str, str | bytes], memory_limit_mb: int | None) -> Template:
        ours, theirs = socket.socketpair()
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                env=env,
            )
        finally:
            theirs.close()
        config = {"fn": fn_spec, "memory_limit_mb": memory_limit_mb}
        with contextlib.suppress(OSError):  # if it died already, the read loop sees EOF and reports it
            ours.sendall(frame(list(sys.path)) + frame(config))
        ours.setblocking(False)  # reads only; fork requests are one byte each
        return cls(proc, ours)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.sock.close()


@dataclass
class Worker:
    to_fd: int  # its stdin: we write chunks
    from_fd: int  # its stdout: we read results
    started: float
    pid: int = 0  # known once it reports ready
    pidfd: int = -1  # Linux: a handle that cannot point at a recycled pid
    ready: bool = False
    frames: Frames = field(default_factory=Frames)
    inflight: deque[int] = field(default_factory=deque)  # sample indices, in the order being graded
    deadline: float = math.inf  # when the head of `inflight` times out
    clock: float = 0.0  # when the head of `inflight` started
    closed: bool = False

    def kill(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            elif self.pid:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for fd in (self.to_fd, self.from_fd, self.pidfd):
            if fd >= 0:
                os.close(fd)


@dataclass
class Processes:
    """Everything to kill at close or interpreter exit (shared with the finalizer, so no back-reference)."""

    owner: int = field(default_factory=os.getpid)
    template: Template | None = None
    workers: list[Worker] = field(default_factory=list)

    def kill_all(self) -> None:
        if os.getpid() != self.owner:  # a forked copy of the parent must not kill the parent's workers
            return
        for w in self.workers:
            w.kill()
        if self.template is not None:
            self.template.close()
