"""Reward functions and the isolated scoring pool used by the learner, the evaluator and rollout workers.

Reward functions are plain functions ``(response, ground_truth) -> {"reward", "format_reward",
"answer_reward"}`` (floats). They use `rollout.reward.parsers` to find answers and `rollout.reward.grading` to compare
them; see those modules for what counts as equal.

`RewardScorer` runs a reward function over a batch in a small pool of worker processes with a hard
wall-clock limit per sample (default 1 s): a sample that times out, raises, or kills its worker scores 0
and is counted; a worker stuck past the limit is SIGKILLed and replaced; the run never blocks. Design
(pebble-like, written here because a ``concurrent.futures`` pool cannot kill a stuck task):

- A *template* process is a fresh interpreter started with ``subprocess`` (``sys.executable -c …``:
  fork+exec, the *spawn* model, nothing of the parent copied), so it is safe when the parent has threads,
  torch, CUDA or vLLM loaded; unlike ``multiprocessing``'s spawn and forkserver it never re-imports the
  parent's ``__main__`` (under ``accelerate launch`` that is the training script). It imports only the
  reward function's module, warms sympy up, sees no GPU (``CUDA_VISIBLE_DEVICES=""``) and runs under an
  address-space limit (``memory_limit_mb``: ``10^(10^10)`` fails with MemoryError instead of swapping).
- Workers are forked from the template on request (it never starts a thread, so forking it is safe);
  the request carries the worker's two pipe ends, so the parent talks to each worker directly
  (length-prefixed pickle frames) and waits with ``select`` — no signals and no helper threads in the
  parent, so `score` works from any thread. A replacement worker is ready in milliseconds, not after an
  interpreter start (~1 s, far more on a loaded machine).
- A worker receives a chunk of samples and streams back one result per sample; the deadline of each
  sample starts when the previous result arrives. On a timeout only the sample being graded scores 0,
  the worker is SIGKILLed (through a pidfd on Linux, so never a recycled pid), and the rest of its chunk
  goes back to the queue.
- Nothing outlives the parent: the template exits when its socket to the parent closes, and workers die
  with the template (``PR_SET_PDEATHSIG``); `close` and a finalizer kill everything earlier.

Custom reward functions must be picklable by reference: a top-level ``def`` in an importable module
(not ``__main__``, not a lambda or closure; ``functools.partial`` of such a function is fine), and that
module should not start threads when imported (the template forks workers).

``num_workers=0`` grades in-process: no isolation and no timeout, for trusted fast grading only.

>>> r1_zero_reward("2 + 3 = 5 </think> <answer> 5 </answer>", "5")
{'reward': 1.0, 'format_reward': 1.0, 'answer_reward': 1.0}
>>> r1_zero_reward("2 + 3 = 5 </think> <answer> 6 </answer>", "5")
{'reward': 0.0, 'format_reward': 1.0, 'answer_reward': 0.0}
>>> question_only_reward("The sum is \\\\boxed{5}.", "5")["reward"]
1.0
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rollout.reward.grading import extract_boxed, grade_answer, warm_up
from rollout.reward.parsers import parse_gsm8k_response

__all__ = [
    "REWARD_FNS",
    "RewardFn",
    "RewardScorer",
    "get_reward_fn",
    "question_only_reward",
    "r1_zero_answer",
    "r1_zero_reward",
]

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], dict[str, float]]
REWARD_KEYS = ("reward", "format_reward", "answer_reward")


def _scores(fmt: bool, ans: bool) -> dict[str, float]:
    return {"reward": float(fmt and ans), "format_reward": float(fmt), "answer_reward": float(fmt and ans)}


# --------------------------------------------------------------------------------------------------
# Reward functions

_THINK_ANSWER = "</think> <answer>"


def r1_zero_answer(response: str) -> str | None:
    """The answer of an R1-Zero-formatted response, or None if the response is not formatted.

    `response` is what the model wrote after the prompt's trailing ``<think>``. It is formatted iff it
    contains ``</think> <answer>`` (exactly as in CS336's ``r1_zero_reward_fn``) and its last ``<answer>``
    is closed by a later ``</answer>``; the answer is the text between them, or the content of its last
    ``\\boxed{}`` when it has one.

    >>> r1_zero_answer("think </think> <answer> the total is \\\\boxed{18} </answer>")
    '18'
    >>> r1_zero_answer("think </think><answer> 18 </answer>") is None
    True
    """
    if _THINK_ANSWER not in response:
        return None
    start = response.rfind("<answer>") + len("<answer>")
    end = response.find("</answer>", start)
    if end < 0:
        return None
    answer = response[start:end]
    if "\\boxed" in answer or "\\fbox" in answer:
        return extract_boxed(answer) or ""
    return answer


def r1_zero_reward(response: str, ground_truth: str) -> dict[str, float]:
    """CS336 ``r1_zero_reward_fn``: format 1 iff `r1_zero_answer` finds the ``</think> <answer> …
    </answer>`` structure; answer 1 iff it is formatted and its answer equals `ground_truth`
    (`rollout.reward.grading.grade_answer`); reward = answer reward. A formatted wrong answer earns nothing
    (no partial format credit, which models learn to farm); an unformatted response scores all zeros
    even if its answer is right.
    """
    answer = r1_zero_answer(response)
    if answer is None:
        return _scores(False, False)
    return _scores(True, grade_answer(answer, ground_truth).correct)


def question_only_reward(response: str, ground_truth: str) -> dict[str, float]:
    """Grade the content of the last ``\\boxed{}`` (or, with no box, the last number) in `response`
    against `ground_truth`. Format 1 iff some answer was found; reward = answer reward.

    >>> question_only_reward("48 + 24 = 72 clips.", "72")
    {'reward': 1.0, 'format_reward': 1.0, 'answer_reward': 1.0}
    """
    answer = extract_boxed(response) if ("\\boxed" in response or "\\fbox" in response) else None
    if answer is None:
        answer = parse_gsm8k_response(response)
    if answer is None:
        return _scores(False, False)
    return _scores(True, grade_answer(answer, ground_truth).correct)


REWARD_FNS: dict[str, RewardFn] = {"r1_zero": r1_zero_reward, "question_only": question_only_reward}


def get_reward_fn(name: str) -> RewardFn:
    if name not in REWARD_FNS:
        raise KeyError(f"unknown reward function {name!r}; known: {sorted(REWARD_FNS)}")
    return REWARD_FNS[name]


# --------------------------------------------------------------------------------------------------
# Wire format: 8-byte little-endian length, then a pickle. Both ends are this module.

_HEADER = struct.Struct("<Q")


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _write_all(fd: int, data: bytes) -> None:
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


class _Frames:
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
# Template ("zygote") and worker processes.
#
# The template is a fresh interpreter (`subprocess`, so fork+exec: nothing of the parent is copied). It
# takes the parent's sys.path and the reward function over a socket, imports and warms up sympy, and
# then forks one worker per request. The request carries the worker's two pipe ends (SCM_RIGHTS), so
# the parent talks to each worker directly. The template never starts a thread, so forking it is safe,
# and a replacement worker is ready in milliseconds instead of an interpreter start (~1 s, far more on
# a loaded machine).

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
    from rollout.reward.pool import _template_main
except BaseException:
    data = pickle.dumps(("startup_error", traceback.format_exc()))
    sock.sendall(struct.pack("<Q", len(data)) + data)
    os._exit(1)
_template_main(sock)
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


def _template_main(sock: socket.socket) -> None:
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
        sock.sendall(_frame(("startup_error", traceback.format_exc())))
        return
    # Workers share the template's objects copy-on-write; a garbage collection in a worker would walk
    # (and so copy) all of them, ~0.1 s per worker and far more on a loaded machine. Freeze them out.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished workers
    sock.sendall(_frame(("ready", os.getpid())))
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


def _check_result(out: object) -> dict[str, float]:
    if not isinstance(out, dict) or any(k not in out for k in REWARD_KEYS):
        raise TypeError(f"reward fn must return a dict with keys {REWARD_KEYS}, got {out!r:.200}")
    scores = {str(k): float(v) for k, v in out.items()}
    if not all(math.isfinite(v) for v in scores.values()):
        raise ValueError(f"reward fn returned a non-finite value: {scores}")
    return scores


def _serve(fn: RewardFn, in_fd: int, out_fd: int) -> None:
    """Worker loop: "ready", then for each ("score", [(index, response, gold), …]) one ("result", index,
    scores | None, error | None, seconds) frame per sample, written as soon as it is known."""
    _write_all(out_fd, _frame(("ready", os.getpid())))
    while True:
        msg = _recv(lambda n: os.read(in_fd, n))
        if msg is None or msg[0] == "exit":
            return
        for index, response, gold in msg[1]:
            start = time.perf_counter()
            scores: dict[str, float] | None = None
            error: str | None = None
            try:
                scores = _check_result(fn(response, gold))
            except Exception as err:
                error = f"{type(err).__name__}: {err}"[:500]
            _write_all(out_fd, _frame(("result", index, scores, error, time.perf_counter() - start)))


# --------------------------------------------------------------------------------------------------
# Parent side


@dataclass
class _Template:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    frames: _Frames = field(default_factory=_Frames)

    @classmethod
    def start(cls, fn_spec: tuple[str, str | bytes], memory_limit_mb: int | None) -> _Template:
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
            ours.sendall(_frame(list(sys.path)) + _frame(config))
        ours.setblocking(False)  # reads only; fork requests are one byte each
        return cls(proc, ours)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.sock.close()


@dataclass
class _Worker:
    to_fd: int  # its stdin: we write chunks
    from_fd: int  # its stdout: we read results
    started: float
    pid: int = 0  # known once it reports ready
    pidfd: int = -1  # Linux: a handle that cannot point at a recycled pid
    ready: bool = False
    frames: _Frames = field(default_factory=_Frames)
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
class _Stats:
    rewards: list[float] = field(default_factory=list)
    formats: list[float] = field(default_factory=list)
    answers: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    timeouts: int = 0
    errors: int = 0
    restarts: int = 0


@dataclass
class _Processes:
    """Everything to kill at close or interpreter exit (shared with the finalizer, so no back-reference)."""

    owner: int = field(default_factory=os.getpid)
    template: _Template | None = None
    workers: list[_Worker] = field(default_factory=list)

    def kill_all(self) -> None:
        if os.getpid() != self.owner:  # a forked copy of the parent must not kill the parent's workers
            return
        for w in self.workers:
            w.kill()
        if self.template is not None:
            self.template.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _resolve(reward_fn: str | RewardFn) -> tuple[RewardFn, tuple[str, str | bytes]]:
    """The function, and how a worker gets it: ("name", registry name) or ("pickle", bytes)."""
    if isinstance(reward_fn, str):
        return get_reward_fn(reward_fn), ("name", reward_fn)
    fn = reward_fn
    if not callable(fn):
        raise TypeError(f"reward_fn must be a reward name or a function, got {type(fn).__name__}")
    if getattr(fn, "__module__", None) == "__main__":
        raise ValueError(
            f"reward_fn {getattr(fn, '__qualname__', fn)!r} is defined in __main__, which worker processes "
            "cannot import; move it into an importable module (or pass num_workers=0 to grade in-process)"
        )
    try:
        data = pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)
    except Exception as err:
        raise ValueError(
            f"reward_fn {fn!r} cannot be sent to worker processes ({err}); use a top-level function in an "
            "importable module, not a lambda, closure or local function"
        ) from err
    return fn, ("pickle", data)


class RewardScorer:
    """Score batches of (response, gold) with a reward function, isolated in worker processes.

    >>> with RewardScorer("r1_zero", timeout_s=1.0, num_workers=1) as scorer:
    ...     scorer.score(["x </think> <answer> 4 </answer>", "x </think> <answer> 5"], ["4", "4"])
    [{'reward': 1.0, 'format_reward': 1.0, 'answer_reward': 1.0}, {'reward': 0.0, 'format_reward': 0.0, 'answer_reward': 0.0}]

    Args:
        reward_fn: a name in `REWARD_FNS` ("r1_zero", "question_only") or a picklable top-level function.
        timeout_s: wall-clock limit per sample; past it the sample scores 0 and its worker is replaced.
        num_workers: worker processes; 0 grades in the calling process (no isolation, no timeout).
        max_chunk: most samples sent to a worker at once.
        memory_limit_mb: address-space limit of each worker (None: no limit).
        startup_timeout_s: how long the template may take to start (imports, warm-up) and a worker to
            report ready.
    """

    def __init__(
        self,
        reward_fn: str | RewardFn = "r1_zero",
        timeout_s: float = 1.0,
        num_workers: int = 2,
        *,
        max_chunk: int = 32,
        memory_limit_mb: int | None = 4096,
        startup_timeout_s: float = 60.0,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"RewardScorer timeout_s must be > 0 seconds, got {timeout_s}")
        if num_workers < 0:
            raise ValueError(f"RewardScorer num_workers must be >= 0 (0 = in-process), got {num_workers}")
        if max_chunk < 1:
            raise ValueError(f"RewardScorer max_chunk must be >= 1, got {max_chunk}")
        self.fn, self._fn_spec = _resolve(reward_fn)
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.max_chunk = max_chunk
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._closed = False
        self._logged = 0
        self._startup_failures = 0
        self._procs = _Processes()
        self._finalizer = weakref.finalize(self, self._procs.kill_all)
        if num_workers:
            self._procs.template = _Template.start(self._fn_spec, memory_limit_mb)
            self._template_ready = False
            self._template_started = time.monotonic()
            for _ in range(num_workers):
                self._procs.workers.append(self._fork())

    # -- public API --------------------------------------------------------------------------------

    def score(self, responses: Sequence[str], golds: Sequence[str]) -> list[dict[str, float]]:
        """Scores of each (response, gold) pair, in order; failed samples score all zeros."""
        if len(responses) != len(golds):
            raise ValueError(f"score() got {len(responses)} responses but {len(golds)} golds")
        for what, values in (("response", responses), ("gold", golds)):
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:  # loudly: a non-string would otherwise score 0 as a counted "error"
                raise TypeError(f"score(): {what} {bad} is {type(values[bad]).__name__}, not str")
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardScorer.score() called after close()")
            results: list[dict[str, float] | None] = [None] * len(responses)
            if self.num_workers == 0:
                self._score_in_process(responses, golds, results)
            else:
                try:
                    self._score_in_pool(responses, golds, results)
                except BaseException:
                    for w in list(self._procs.workers):  # leave no half-finished chunk behind
                        if w.inflight:
                            self._replace(w)
                    raise
            out = [r if r is not None else _scores(False, False) for r in results]
            for r in out:
                self._stats.rewards.append(r["reward"])
                self._stats.formats.append(r["format_reward"])
                self._stats.answers.append(r["answer_reward"])
            return out

    def metrics(self, reset: bool = True) -> dict[str, float]:
        """Statistics of the samples scored since the last reset, named for logging as they are:
        ``reward/mean``, ``reward/format_rate``, ``reward/answer_rate``, ``reward/samples``,
        ``reward/timeouts``, ``reward/errors`` (exceptions, bad return values, dead workers),
        ``reward/worker_restarts``, ``reward/latency_p50_ms``, ``reward/latency_p99_ms`` (grading time
        per sample; a timed-out sample counts its time until the kill)."""
        with self._lock:
            s = self._stats
            n = len(s.rewards)
            lat = sorted(s.latencies)
            out = {
                "reward/mean": sum(s.rewards) / n if n else 0.0,
                "reward/format_rate": sum(s.formats) / n if n else 0.0,
                "reward/answer_rate": sum(s.answers) / n if n else 0.0,
                "reward/samples": float(n),
                "reward/timeouts": float(s.timeouts),
                "reward/errors": float(s.errors),
                "reward/worker_restarts": float(s.restarts),
                "reward/latency_p50_ms": 1000 * _percentile(lat, 50),
                "reward/latency_p99_ms": 1000 * _percentile(lat, 99),
            }
            if reset:
                self._stats = _Stats()
            return out

    def close(self) -> None:
        """Stop the workers and the template (idempotent)."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- in-process --------------------------------------------------------------------------------

    def _score_in_process(
        self, responses: Sequence[str], golds: Sequence[str], results: list[dict[str, float] | None]
    ) -> None:
        for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
            start = time.perf_counter()
            try:
                results[i] = _check_result(self.fn(response, gold))
            except Exception as err:
                self._failed("error", i, response, f"{type(err).__name__}: {err}")
            self._stats.latencies.append(time.perf_counter() - start)

    # -- pool ----------------------------------------------------------------------------------------

    def _fork(self) -> _Worker:
        """Ask the template for a new worker (it reports "ready" on its own pipe when it is up)."""
        template = self._procs.template
        assert template is not None
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        template.sock.setblocking(True)  # one byte: it only waits while the template is starting up
        try:
            socket.send_fds(template.sock, [b"F"], [to_worker_r, from_worker_w])
        except OSError:
            pass  # the template is gone: this worker's pipe reads EOF and the template is restarted
        finally:
            template.sock.setblocking(False)
            os.close(to_worker_r)
            os.close(from_worker_w)
        os.set_blocking(from_worker_r, False)
        return _Worker(to_fd=to_worker_w, from_fd=from_worker_r, started=time.monotonic())

    def _replace(self, w: _Worker) -> None:
        """Kill `w` and put a fresh worker in its slot; unfinished samples are the caller's business."""
        w.kill()
        workers = self._procs.workers
        workers[workers.index(w)] = self._fork()
        self._stats.restarts += 1

    def _restart_template(self, why: str) -> None:
        self._startup_failures += 1
        if self._startup_failures >= 3 or not self._template_ready:
            raise RuntimeError(f"reward worker template {why}; see its traceback on stderr")
        assert self._procs.template is not None
        self._procs.template.close()
        self._procs.template = _Template.start(self._fn_spec, self.memory_limit_mb)
        self._template_ready = False
        self._template_started = time.monotonic()
        self._stats.restarts += 1

    def _failed(self, kind: str, index: int, response: str, detail: str) -> None:
        if kind == "timeout":
            self._stats.timeouts += 1
        else:
            self._stats.errors += 1
        self._logged += 1
        if self._logged <= 20 or self._logged % 1000 == 0:
            logger.warning(
                "reward %s on sample %d (scored 0; %d timeouts, %d errors so far): %s; response starts %r",
                kind, index, self._stats.timeouts, self._stats.errors, detail, response[:120],
            )  # fmt: skip

    def _dispatch(self, queue: deque[int], responses: Sequence[str], golds: Sequence[str]) -> None:
        idle = [w for w in self._procs.workers if w.ready and not w.inflight]
        for k, w in enumerate(idle):
            if not queue:
                return
            share = min(self.max_chunk, max(1, math.ceil(len(queue) / (len(idle) - k))))
            chunk: list[int] = []
            chars = 0
            while queue and len(chunk) < share and (not chunk or chars < 1 << 18):
                i = queue.popleft()
                chunk.append(i)
                chars += len(responses[i]) + len(golds[i])
            try:
                _write_all(w.to_fd, _frame(("score", [(i, responses[i], golds[i]) for i in chunk])))
            except OSError:  # died while idle: retry the chunk elsewhere
                queue.extendleft(reversed(chunk))
                self._replace(w)
                continue
            w.inflight.extend(chunk)
            w.clock = time.monotonic()
            w.deadline = w.clock + self.timeout_s

    def _read_template(self, template: _Template) -> None:
        try:
            data = template.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._restart_template(f"exited with code {template.proc.poll()}")
            return
        for msg in template.frames.feed(data):
            if msg[0] == "startup_error":
                raise RuntimeError(f"reward worker template failed to start:\n{msg[1]}")
            if msg[0] == "ready":
                self._template_ready = True

    def _read(self, w: _Worker, results: list[dict[str, float] | None], responses: Sequence[str]) -> bool:
        """Take what `w` has written; False if its pipe is closed (it has exited)."""
        try:
            data = os.read(w.from_fd, 1 << 20)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        for msg in w.frames.feed(data):
            if msg[0] == "ready":
                w.ready, w.pid = True, msg[1]
                with contextlib.suppress(OSError, AttributeError):
                    w.pidfd = os.pidfd_open(w.pid)
                self._startup_failures = 0
            elif msg[0] == "result":
                _, index, scores, error, seconds = msg
                assert w.inflight and w.inflight[0] == index, "reward worker answered out of order"
                w.inflight.popleft()
                now = time.monotonic()
                w.clock, w.deadline = (now, now + self.timeout_s) if w.inflight else (0.0, math.inf)
                self._stats.latencies.append(seconds)
                if error is not None:
                    self._failed("error", index, responses[index], error)
                else:
                    results[index] = scores
        return True

    def _lost(self, w: _Worker, queue: deque[int], responses: Sequence[str], why: str) -> None:
        """`w` timed out or died: its current sample scores 0, the rest of its chunk is re-queued."""
        if w.inflight:
            head = w.inflight.popleft()
            self._stats.latencies.append(time.monotonic() - w.clock)
            self._failed("timeout" if why == "timeout" else "error", head, responses[head], why)
            queue.extendleft(reversed(w.inflight))
            w.inflight.clear()
        self._replace(w)

    def _score_in_pool(
        self, responses: Sequence[str], golds: Sequence[str], results: list[dict[str, float] | None]
    ) -> None:
        queue: deque[int] = deque(range(len(responses)))
        while queue or any(w.inflight for w in self._procs.workers):
            self._dispatch(queue, responses, golds)
            now = time.monotonic()
            starting = [w.started for w in self._procs.workers if not w.ready]
            if not self._template_ready:
                starting.append(self._template_started)
            wake = min(
                [w.deadline for w in self._procs.workers if w.inflight]
                + [t + self.startup_timeout_s for t in starting],
                default=now + 0.1,
            )
            template = self._procs.template
            assert template is not None
            by_fd: dict[int, _Worker | _Template] = {w.from_fd: w for w in self._procs.workers}
            by_fd[template.sock.fileno()] = template
            readable, _, _ = select.select(list(by_fd), [], [], max(0.0, wake - now))
            for fd in readable:  # (a worker or template replaced meanwhile is skipped: fds get reused)
                w = by_fd[fd]
                if isinstance(w, _Template):
                    if w is self._procs.template:
                        self._read_template(w)
                elif not w.closed and not self._read(w, results, responses):
                    self._lost(w, queue, responses, "worker process died")
            now = time.monotonic()
            for w in list(self._procs.workers):
                if w.inflight and now >= w.deadline:
                    # a result may be waiting in the pipe while we were busy elsewhere: take it first
                    ready_now, _, _ = select.select([w.from_fd], [], [], 0)
                    if ready_now and not self._read(w, results, responses):
                        self._lost(w, queue, responses, "worker process died")
                    elif w.inflight and time.monotonic() >= w.deadline:
                        self._lost(w, queue, responses, "timeout")
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    raise RuntimeError(
                        f"reward worker did not start within {self.startup_timeout_s} s (startup_timeout_s)"
                    )
