"""Reward functions and the isolated scoring pool used by the learner, the evaluator and rollout workers.

Reward functions are plain functions ``(response, ground_truth) -> {"reward", "format_reward",
"answer_reward"}`` (floats). They use `rollout.parsers` to find answers and `rollout.grading` to compare
them; see those modules for what counts as equal.

`RewardScorer` runs a reward function over a batch in a small pool of worker processes with a hard
wall-clock limit per sample (default 1 s): a sample that times out, raises, or kills its worker scores 0
and is counted; a worker stuck past the limit is SIGKILLed and replaced; the run never blocks. Design
(pebble-like, written here because a ``concurrent.futures`` pool cannot kill a stuck task):

- Each worker is a fresh interpreter started with ``subprocess`` (``sys.executable -c …``, i.e. the
  *spawn* model: fork+exec, no copy of the parent). That is safe when the parent has threads, torch, CUDA
  or vLLM loaded, and unlike ``multiprocessing``'s spawn it never re-imports the parent's ``__main__``
  (under ``accelerate launch`` that is the training script, which would import torch in every worker).
  Workers import only the reward function's module; they see no GPU (``CUDA_VISIBLE_DEVICES=""``), run
  under an address-space limit (``memory_limit_mb``) so a number like ``10^(10^10)`` fails with
  MemoryError instead of swapping, ignore SIGINT, and exit when the parent goes away.
- The parent talks to each worker over its stdin/stdout pipes (length-prefixed pickle frames) and waits
  with ``select`` — no signals and no helper threads, so `score` works from any thread.
- One warm spare process (``spare_workers``) stands by, so a killed worker's slot is refilled at once.
- A worker receives a chunk of samples and streams back one result per sample; the deadline of each
  sample starts when the previous result arrives. On a timeout only the sample being graded scores 0;
  the rest of the chunk goes back to the queue.

Custom reward functions must be picklable by reference: a top-level ``def`` in an importable module
(not ``__main__``, not a lambda or closure; ``functools.partial`` of such a function is fine).

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
import logging
import math
import os
import pickle
import select
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

from rollout.grading import extract_boxed, grade_answer
from rollout.parsers import parse_gsm8k_response

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
    (`rollout.grading.grade_answer`); reward = answer reward. A formatted wrong answer earns nothing
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


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(fd: int) -> Any:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


# The worker's first code: move the protocol pipes off fds 0/1 (so stray prints go to stderr), take the
# parent's sys.path from the first frame, then hand over to `_worker_main`.
_BOOTSTRAP = """
import os, pickle, struct, sys, traceback
in_fd, out_fd = os.dup(0), os.dup(1)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(2, 1)
def _read(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(in_fd, n - len(buf))
        if not chunk:
            os._exit(0)
        buf += chunk
    return buf
sys.path[:] = pickle.loads(_read(struct.unpack("<Q", _read(8))[0]))
try:
    from rollout.rewards import _worker_main
except BaseException:
    data = pickle.dumps(("startup_error", traceback.format_exc()))
    os.write(out_fd, struct.pack("<Q", len(data)) + data)
    os._exit(1)
_worker_main(in_fd, out_fd)
"""


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _check_result(out: object) -> dict[str, float]:
    if not isinstance(out, dict) or any(k not in out for k in REWARD_KEYS):
        raise TypeError(f"reward fn must return a dict with keys {REWARD_KEYS}, got {out!r:.200}")
    scores = {str(k): float(v) for k, v in out.items()}
    if not all(math.isfinite(v) for v in scores.values()):
        raise ValueError(f"reward fn returned a non-finite value: {scores}")
    return scores


_WARM_UP = [
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("(x+1)^2", "x^2+2x+1"),
    ("x = 1", "1"),
    ("\\{1,2\\}", "(1, 2]"),
]


def _worker_main(in_fd: int, out_fd: int) -> None:
    """Worker loop: config frame, "ready", then ("score", [(index, response, gold), …]) → one ("result",
    index, scores | None, error | None, seconds) frame per sample."""
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    config = _recv(in_fd)
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
        # pay sympy's first-use costs (imports, parser and simplifier set-up, ~0.4 s) before reporting
        # ready, not inside the first samples' time limits
        for pred, gold in _WARM_UP:
            grade_answer(pred, gold)
    except BaseException:
        _write_all(out_fd, _frame(("startup_error", traceback.format_exc())))
        return
    _write_all(out_fd, _frame(("ready", os.getpid())))
    while True:
        msg = _recv(in_fd)
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
class _Worker:
    proc: subprocess.Popen[bytes]
    started: float
    ready: bool = False
    buf: bytearray = field(default_factory=bytearray)
    inflight: deque[int] = field(default_factory=deque)  # sample indices, in the order being graded
    deadline: float = math.inf  # when the head of `inflight` times out
    clock: float = 0.0  # when the head of `inflight` started

    @property
    def fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def frames(self) -> list[Any]:
        out = []
        while len(self.buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < _HEADER.size + size:
                break
            out.append(pickle.loads(bytes(self.buf[_HEADER.size : _HEADER.size + size])))
            del self.buf[: _HEADER.size + size]
        return out


@dataclass
class _Stats:
    rewards: list[float] = field(default_factory=list)
    formats: list[float] = field(default_factory=list)
    answers: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    timeouts: int = 0
    errors: int = 0
    restarts: int = 0


def _kill_all(procs: list[subprocess.Popen[bytes]], owner: int) -> None:
    if os.getpid() != owner:  # a forked copy of the parent exiting must not kill the parent's workers
        return
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def _exit_status(w: _Worker) -> str:
    try:
        return f"worker exited with code {w.proc.wait(timeout=1.0)}"
    except subprocess.TimeoutExpired:
        return "worker closed its pipe"


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
        num_workers: samples graded at once; 0 grades in the calling process (no isolation, no timeout).
        spare_workers: extra started-and-warm processes kept idle, so that a killed worker's capacity
            is back at once rather than after a new interpreter's ~0.5-1 s start-up.
        max_chunk: most samples sent to a worker at once.
        memory_limit_mb: address-space limit of each worker (None: no limit).
        startup_timeout_s: how long a new worker may take to import and report ready.
    """

    def __init__(
        self,
        reward_fn: str | RewardFn = "r1_zero",
        timeout_s: float = 1.0,
        num_workers: int = 2,
        *,
        spare_workers: int = 1,
        max_chunk: int = 32,
        memory_limit_mb: int | None = 4096,
        startup_timeout_s: float = 60.0,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"RewardScorer timeout_s must be > 0 seconds, got {timeout_s}")
        if num_workers < 0:
            raise ValueError(f"RewardScorer num_workers must be >= 0 (0 = in-process), got {num_workers}")
        if spare_workers < 0:
            raise ValueError(f"RewardScorer spare_workers must be >= 0, got {spare_workers}")
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
        self._procs: list[subprocess.Popen[bytes]] = []  # every live worker process, for the finalizer
        self._finalizer = weakref.finalize(self, _kill_all, self._procs, os.getpid())
        self._workers = [self._spawn() for _ in range(num_workers + spare_workers if num_workers else 0)]
        self._startup_failures = 0
        self._logged = 0

    # -- public API --------------------------------------------------------------------------------

    def score(self, responses: Sequence[str], golds: Sequence[str]) -> list[dict[str, float]]:
        """Scores of each (response, gold) pair, in order; failed samples score all zeros."""
        if len(responses) != len(golds):
            raise ValueError(f"score() got {len(responses)} responses but {len(golds)} golds")
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
                    for w in self._workers:  # leave no half-finished chunk behind
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
        """Stop the workers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                if w.proc.poll() is None and not w.inflight:
                    try:
                        assert w.proc.stdin is not None
                        _write_all(w.proc.stdin.fileno(), _frame(("exit",)))
                    except OSError:
                        pass
            deadline = time.monotonic() + 0.5
            for w in self._workers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._finalizer()  # kills whatever is left and closes the pipes

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

    def _spawn(self) -> _Worker:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._procs.append(proc)
        assert proc.stdin is not None
        config = {"fn": self._fn_spec, "memory_limit_mb": self.memory_limit_mb}
        with contextlib.suppress(OSError):  # if it died already, the read loop sees EOF and reports it
            _write_all(proc.stdin.fileno(), _frame(list(sys.path)) + _frame(config))
        return _Worker(proc=proc, started=time.monotonic())

    def _replace(self, w: _Worker) -> None:
        """Kill `w` and put a fresh worker in its slot; unfinished samples are the caller's business."""
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()
        for pipe in (w.proc.stdin, w.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._procs.remove(w.proc)
        self._workers[self._workers.index(w)] = self._spawn()
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
        busy = sum(1 for w in self._workers if w.inflight)
        idle = [w for w in self._workers if w.ready and not w.inflight][: max(0, self.num_workers - busy)]
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
                assert w.proc.stdin is not None
                _write_all(
                    w.proc.stdin.fileno(), _frame(("score", [(i, responses[i], golds[i]) for i in chunk]))
                )
            except OSError:  # died while idle: retry the chunk elsewhere
                queue.extendleft(reversed(chunk))
                self._replace(w)
                continue
            w.inflight.extend(chunk)
            w.clock = time.monotonic()
            w.deadline = w.clock + self.timeout_s

    def _read(self, w: _Worker, results: list[dict[str, float] | None], responses: Sequence[str]) -> bool:
        """Take what `w` has written; False if it has exited (EOF)."""
        try:
            data = os.read(w.fd, 1 << 20)
        except OSError:
            data = b""
        if not data:
            return False
        w.buf += data
        for msg in w.frames():
            if msg[0] == "ready":
                w.ready = True
                self._startup_failures = 0
            elif msg[0] == "startup_error":
                raise RuntimeError(f"reward worker failed to start:\n{msg[1]}")
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
        elif not w.ready:
            self._startup_failures += 1
            if self._startup_failures >= 3:
                raise RuntimeError(f"reward workers keep exiting during startup ({why}); see stderr")
        self._replace(w)

    def _score_in_pool(
        self, responses: Sequence[str], golds: Sequence[str], results: list[dict[str, float] | None]
    ) -> None:
        queue: deque[int] = deque(range(len(responses)))
        while queue or any(w.inflight for w in self._workers):
            self._dispatch(queue, responses, golds)
            now = time.monotonic()
            wake = min(
                [w.deadline for w in self._workers if w.inflight]
                + [w.started + self.startup_timeout_s for w in self._workers if not w.ready],
                default=now + 0.1,
            )
            by_fd = {w.fd: w for w in self._workers}
            readable, _, _ = select.select(list(by_fd), [], [], max(0.0, wake - now))
            for fd in readable:
                w = by_fd[fd]
                if not self._read(w, results, responses):
                    self._lost(w, queue, responses, _exit_status(w))
            now = time.monotonic()
            for w in list(self._workers):
                if w.inflight and now >= w.deadline:
                    # a result may be waiting in the pipe while we were busy elsewhere: take it first
                    ready_now, _, _ = select.select([w.fd], [], [], 0)
                    if ready_now and not self._read(w, results, responses):
                        self._lost(w, queue, responses, _exit_status(w))
                    elif w.inflight and time.monotonic() >= w.deadline:
                        self._lost(w, queue, responses, "timeout")
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    raise RuntimeError(
                        f"reward worker did not start within {self.startup_timeout_s} s (startup_timeout_s)"
                    )
