"""The rollout producer of asynchronous GRPO (``grpo.max_staleness = k ≥ 1``): a background thread that
generates and scores the rollout batches of steps t+1 … t+k while the learner trains on step t.

Schedule (fixed lag, deterministic): step u's batch is sampled with the weights after learner step
``need(u) = max(start, u − 1 − k)`` exactly, so a sample is at most k versions behind the learner that
trains on it, and a run is reproducible from its seeds (``seed + 1000·u`` as in the synchronous loop)
whatever the threads' timing. The learner hands each step's weights over as a CPU copy (`WeightSnapshot`);
the producer loads them between batches when the next batch needs them and checks them with the stale-
weight probe (`ProbeExpectation`: the learner's side, computed at hand-over). This one thread talks to the engine and the reward pool (in-flight updates add a pusher, below): pushes, generation, scoring, and
evaluation (a `call`, run once the engine holds the learner's newest weights).

In-flight weight updates (``grpo.inflight_weight_updates``; PipelineRL, Piché et al. 2025, "PipelineRL:
Faster On-policy Reinforcement Learning for Long Sequence Generation"): while a batch is being generated, a
second thread loads each snapshot the learner hands over into the server at once, between two decode steps
(`rollout.engines.remote.RemoteEngine.update_weights_live`), instead of after the batch. A batch still starts
no earlier than the schedule above allows (so no token is more than k versions behind), but its later tokens
come from newer weights: lower lag, at the price of run-to-run reproducibility (which tokens each version
draws depends on timing). Each sample records its tokens' versions (`Sample.version_spans`). Within a batch,
a request that starts after a live swap may reuse prefix-cache blocks computed by the older weights before it
(its tokens are labelled with the new version); the importance weights stay right, as the behaviour log-probs
are the engine's own. After a batch that took weights in flight, the prefix cache is reset and the
stale-weight probe checks the newest weights, as after any push between batches.

Resume: `checkpoint_state` after step t saves the batches t+1 … t+k (sampled by weights older than the
checkpoint) with the sampler position after them, and with k, t and the sampler position before them
(``pending_rollouts_info``); a resumed producer serves them first. `restore_pending` takes them out of the
resumed state (no later checkpoint carries them) and keeps those the resumed run's k allows: a changed
``grpo.max_staleness`` (0 included) drops the rest and draws their questions again. A producer failure
(a dead server; a hung one after the engine's request timeout) reaches the learner as `RolloutProducerError`.

Several learner ranks: rank 0 alone runs the producer (`trainer.learners.async_ranks`).

Shutdown: `RolloutProducer.close` stops the producer before anything queued and between two generation rounds
of a batch, and returns once its thread has ended, so the engine and scorer never close under it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from rollout.engines.protocol import RolloutEngine, Sample
from rollout.reward.pool import RewardScorer
from rollout.weights import TensorMeta, WeightStream
from trainer.config import ConfigError, RunConfig
from trainer.data.sampler import QuestionSampler
from trainer.data.tasks import Example
from trainer.lora import weight_stream
from trainer.sync import GENERATION, StaleWeightProbe, learner_logprobs
from trainer.timing import PhaseTimer

logger = logging.getLogger("reasonrl")
PENDING_INFO = "pending_rollouts_info"  # beside "pending_rollouts": what `restore_pending` checks them by
T = TypeVar("T")
POLL_S = 0.5  # how often a waiting learner checks that the producer is alive


class RolloutProducerError(RuntimeError):
    """The rollout producer failed; the message names what it was doing and the cause."""


class ProducerStopped(Exception):
    """Raised on the producer thread between two generation rounds of a batch once `RolloutProducer.close` has
    asked it to stop: the batch is abandoned, the thread ends without an error."""


@dataclass
class ProbeExpectation:
    """The learner's side of the stale-weight probe (`trainer.sync.StaleWeightProbe.__call__`) at hand-over:
    log-probs of the probe sequences, and the next-token log-probs (vocab,) after the generation check's
    prefix, in which the engine's greedy token is looked up once it has the weights."""

    scored: list[list[float]]
    prefix: list[int]
    next_token: torch.Tensor  # (vocab,)

    @classmethod
    @torch.no_grad()
    def of(cls, probe: StaleWeightProbe, engine: RolloutEngine, model: torch.nn.Module) -> ProbeExpectation:
        prefix = probe.generation_prefix(engine)
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            logits = model(torch.tensor([prefix], device=device)).logits[0, -1]  # (vocab,)
        finally:
            model.train(was_training)
        return cls(learner_logprobs(model, probe.scored_sequences(engine)), prefix,
                   logits.float().log_softmax(-1).cpu())


class WeightSnapshot(WeightStream):
    """The learner's weights after step `step`, copied to CPU at hand-over (the learner keeps training while
    the engine loads them later): a `WeightStream` carrying its policy `version`, and what the probe expects
    of an engine holding them (`expected`)."""

    def __init__(self, model: torch.nn.Module, bucket_mb: float, version: int, step: int,
                 expected: ProbeExpectation) -> None:
        super().__init__(model, bucket_mb, version)
        source = weight_stream(model, bucket_mb, None)  # under model.lora: merged weights, base names
        self._metadata = source.metadata()
        self.pairs = [(name, t.to("cpu", copy=True)) for name, t in source]
        self.step, self.expected = step, expected

    def metadata(self) -> list[TensorMeta]:
        return self._metadata

    def __iter__(self) -> Any:
        return iter(self.pairs)


@dataclass
class ProducedBatch:
    """One step's scored rollouts, as `trainer.learners.grpo.sample_and_score` returns them, plus the
    question sampler's position after them and the producer's own phase times (``time/generate`` …)."""

    step: int
    samples: list[Sample]
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    metrics: dict[str, float]
    sampler_state: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "samples": [vars(x) for x in self.samples], "rewards": self.rewards.tolist(),
                "advantages": self.advantages.tolist(), "metrics": self.metrics, "sampler": self.sampler_state}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ProducedBatch:
        return cls(int(raw["step"]), [Sample(**x) for x in raw["samples"]], torch.tensor(raw["rewards"]),
                   torch.tensor(raw["advantages"]), dict(raw["metrics"]), dict(raw["sampler"]))


@dataclass
class RolloutSide:
    """What `sample_and_score` uses of a `Session`, with the producer's own phase timer."""

    cfg: RunConfig
    accelerator: Any
    engine: RolloutEngine
    scorer: RewardScorer
    timer: PhaseTimer
    stop: threading.Event = field(default_factory=threading.Event)  # set by `RolloutProducer.close`

    def stop_if_asked(self) -> None:
        """Between generation rounds (DAPO refills): raise `ProducerStopped` once the producer is closing."""
        if self.stop.is_set():
            raise ProducerStopped("the rollout producer was closed")


SampleFn = Callable[[RolloutSide, QuestionSampler[Example], int], tuple[list[Sample], torch.Tensor, torch.Tensor,
                                                                          dict[str, float]]]
Check = Callable[[RolloutEngine, WeightSnapshot], dict[str, float]]


class RolloutProducer:
    """Generates the batches of steps ``start + 1 .. total`` on a background thread (see the module docstring).

    `side`: the engine, scorer and config the thread uses; `sample`: one step's sample-and-score;
    `check`: the probe after each weight push (its metrics); `pending`: batches saved by a checkpoint.
    """

    def __init__(self, side: RolloutSide, sampler: QuestionSampler[Example], sample: SampleFn, check: Check, *,
                 start: int, total: int, max_staleness: int, pending: Sequence[ProducedBatch] = (),
                 inflight: bool = False) -> None:
        self.side, self.sampler, self._sample, self._check = side, sampler, sample, check
        self.start_step, self.total, self.k, self.inflight = start, total, max_staleness, inflight
        self.engine_step = start  # the learner step whose weights the engine holds
        if [b.step for b in pending] != list(range(start + 1, start + 1 + len(pending))) or len(pending) > self.k:
            raise ValueError(f"rollout producer: pending batches of steps {[b.step for b in pending]} after step "
                             f"{start} with max_staleness={self.k} (`restore_pending` keeps only usable ones)")
        self._ready: dict[int, ProducedBatch] = {b.step: b for b in pending}
        self._next = start + len(pending) + 1  # the next step to generate
        self._last_taken: ProducedBatch | None = None
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._push_metrics: dict[str, float] = {}
        self.error: BaseException | None = None
        self._doing = "starting"
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def need(self, step: int) -> int:
        """The learner step whose weights sample the batch of `step`."""
        return max(self.start_step, step - 1 - self.k)

    # ---- the learner's side ----------------------------------------------------------------------------
    def hand_weights(self, snapshot: WeightSnapshot) -> None:
        self._put(("weights", snapshot))

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the producer thread between batches (after the weights handed so far); its result."""
        box: dict[str, Any] = {}
        done = threading.Event()
        self._put(("call", (fn, box, done)))
        self._wait(done.is_set, "running a call (evaluation)")
        if "error" in box:
            raise box["error"]
        return box["result"]  # type: ignore[no-any-return]

    def take(self, step: int) -> ProducedBatch:
        """The batch of `step`, waiting for the producer (raises `RolloutProducerError` if it failed)."""
        self._wait(lambda: step in self._ready, f"generating the rollouts of step {step}")
        with self._cond:
            self._last_taken = self._ready.pop(step)
        return self._last_taken

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """After learner step `step`: the sampler position and the pending batches step+1 .. step+k."""
        last = min(step + self.k, self.total)
        self._wait(lambda: all(u in self._ready for u in range(step + 1, last + 1)),
                   f"generating the rollouts of steps {step + 1}..{last} for the checkpoint")
        pending = [self._ready[u] for u in range(step + 1, last + 1)]
        newest = pending[-1] if pending else self._last_taken
        sampler = newest.sampler_state if newest is not None else self.sampler.state_dict()
        taken = self._last_taken
        before = taken.sampler_state if taken is not None and taken.step == step else None
        info = {"after_step": step, "max_staleness": self.k, "sampler_before": before}
        return {"sampler": sampler, "pending_rollouts": [b.to_json() for b in pending], PENDING_INFO: info}

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the producer and return once its thread has ended, so the caller may close the engine and the
        reward scorer after it. The stop comes before any queued item; the thread finishes what it is doing
        (a generation round and its scoring, a weight push, a call) and starts nothing else: a batch stops
        between two generation rounds (`RolloutSide.stop_if_asked`), its rollouts dropped. Past `timeout_s` a
        warning names what it is still doing and the wait goes on: the engine's own request timeout
        (``rollout.request_timeout_s``) and the scorer's per-answer timeout bound it, and closing the engine
        under a live request would fail it mid-call (a second interrupt ends the wait)."""
        with self._cond:
            self.side.stop.set()
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("the rollout producer is still %s %.0f s after it was asked to stop: waiting for it "
                           "to finish before the rollout engine and reward scorer close", self._doing, timeout_s)
            self._thread.join()

    def _put(self, item: tuple[str, Any]) -> None:
        with self._cond:
            self._inbox.append(item)
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        with self._cond:
            while not ready():
                if self.error is not None or not self._thread.is_alive():
                    cause = self.error
                    raise RolloutProducerError(
                        f"the rollout producer failed while {self._doing} (the learner was waiting for it: "
                        f"{what}): {type(cause).__name__}: {cause}. Once the cause is fixed (e.g. the rollout "
                        "server restarted), the run resumes from its last checkpoint with --resume") from cause
                self._cond.wait(POLL_S)

    # ---- the producer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._serve_one():
                pass
        except ProducerStopped:
            pass
        except BaseException as err:
            with self._cond:
                self.error = err
                self._cond.notify_all()

    def _serve_one(self) -> bool:
        """False once asked to stop (`close`); else run a queued call, else generate the next batch if its
        weights are loaded, else wait for an item (or the stop)."""
        with self._cond:
            if self.side.stop.is_set():
                return False
            head = self._inbox[0][0] if self._inbox else None
            loaded = self.engine_step - self.need(self._next)  # > 0 only after weights taken in flight
            can_generate = self._next <= self.total and (loaded == 0 or (self.inflight and loaded > 0))
            if head != "call" and can_generate:
                head = "generate"
            elif head is None:
                waiting = self._next <= self.total
                self._doing = "waiting for the learner's weights" if waiting else "idle"
                with self.side.timer("wait_weights") if waiting else contextlib.nullcontext():
                    while not self._inbox and not self.side.stop.is_set():
                        self._cond.wait()
                if self.side.stop.is_set():
                    return False
                head = self._inbox[0][0]
            item: Any = self._inbox.popleft()[1] if head != "generate" else None
        if head == "generate":
            self._generate(self._next)
        elif head == "weights":
            self._push(item)
        elif head == "call":
            self._run_call(*item)
        return True

    def _generate(self, step: int) -> None:
        self._doing = f"generating the rollouts of step {step}"
        self.side.stop_if_asked()
        live = LivePushes(self) if self.inflight else None
        try:
            samples, rewards, advantages, metrics = self._sample(self.side, self.sampler, step)
        except BaseException:
            if live is not None:  # the generation's error is the one raised; a failed push's is logged
                live.stop(raise_error=False)
            raise
        if live is not None:
            live.stop()
            metrics |= live.metrics()
            if live.last is not None:  # check the newest weights once nothing is in flight
                self._doing = f"checking the weights of step {live.last.step} taken in flight"
                self.side.engine.reset_prefix_cache()  # type: ignore[attr-defined]
                self._push_metrics = self._check(self.side.engine, live.last)
        metrics |= {"time/wait_weights": 0.0} | self._push_metrics | self.side.timer.pop()
        metrics.pop("time/step")  # the producer's phases overlap the learner's: not part of the step time
        self._push_metrics = {}
        batch = ProducedBatch(step, samples, rewards, advantages, metrics, copy.deepcopy(self.sampler.state_dict()))
        with self._cond:
            self._ready[step] = batch
            self._next = step + 1
            self._cond.notify_all()

    def _push(self, snapshot: WeightSnapshot) -> None:
        self._doing = f"loading the weights of step {snapshot.step} into the rollout engine"
        if snapshot.step != self.engine_step + 1:
            raise RuntimeError(f"rollout producer: weights of step {snapshot.step} after step {self.engine_step}")
        with self.side.timer("push_weights"):
            self.side.engine.update_weights(snapshot)
            self._push_metrics = self._check(self.side.engine, snapshot)
        self.engine_step = snapshot.step

    def _run_call(self, fn: Callable[[], Any], box: dict[str, Any], done: threading.Event) -> None:
        self._doing = "running a call (evaluation)"
        try:
            box["result"] = fn()
        except Exception as err:
            box["error"] = err
        with self._cond:
            done.set()
            self._cond.notify_all()


class LivePushes:
    """The in-flight pusher of one batch (module docstring): a thread that, until `stop`, takes each weight
    snapshot at the head of the producer's inbox and loads it into the engine while the batch generates."""

    def __init__(self, producer: RolloutProducer) -> None:
        self.producer = producer
        self.last: WeightSnapshot | None = None  # the newest snapshot loaded
        self.count, self.seconds = 0, 0.0
        self.error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._run, name="rollout-inflight-push", daemon=True)
        self._thread.start()

    def stop(self, raise_error: bool = True) -> None:
        """Take no more snapshots, wait for a push under way, and raise its error, if any (with `raise_error`
        false, where the batch failed too and its error is the one raised: log it)."""
        p = self.producer
        with p._cond:
            self._done = True
            p._cond.notify_all()
        self._thread.join()
        if self.error is not None and raise_error:
            raise self.error
        if self.error is not None:
            logger.warning("rollout producer: %s (the batch's generation failed as well: its error is raised)",
                           self.error)

    def metrics(self) -> dict[str, float]:
        return {"rollout/inflight_pushes": float(self.count), "rollout/inflight_push_s": self.seconds}

    def _next(self) -> WeightSnapshot | None:
        p = self.producer
        with p._cond:
            while not self._done and not (p._inbox and p._inbox[0][0] == "weights"):
                p._cond.wait(POLL_S)
            return None if self._done else p._inbox.popleft()[1]

    def _run(self) -> None:
        p = self.producer
        while (snapshot := self._next()) is not None:
            try:
                if snapshot.step != p.engine_step + 1:
                    raise RuntimeError(f"weights of step {snapshot.step} after step {p.engine_step}")
                start = time.perf_counter()
                p.side.engine.update_weights_live(snapshot)  # type: ignore[attr-defined]
                if p.side.engine.policy_version != snapshot.version:
                    raise RuntimeError(f"the engine took them as policy version {p.side.engine.policy_version}, "
                                       f"expected {snapshot.version}")
            except BaseException as err:
                self.error = RuntimeError(f"loading the weights of step {snapshot.step} into the rollout engine "
                                          f"in flight: {type(err).__name__}: {err}")
                self.error.__cause__ = err
                return
            self.seconds += time.perf_counter() - start
            self.count += 1
            self.last, p.engine_step = snapshot, snapshot.step


def probe_check(probe: StaleWeightProbe) -> Check:
    """The stale-weight probe after a push, in `StaleWeightProbe.__call__`'s order (one greedy token after the
    cached prefix, then the prompt scoring), against the learner's `ProbeExpectation`; the engine must have
    taken the snapshot's version. Returns the sync and probe metrics."""

    def check(engine: RolloutEngine, snapshot: WeightSnapshot) -> dict[str, float]:
        if engine.policy_version != snapshot.version:
            raise RuntimeError(f"rollout engine took the weights of step {snapshot.step} as policy version "
                               f"{engine.policy_version}, expected {snapshot.version}")
        expected = snapshot.expected
        (sample,) = engine.generate([expected.prefix], GENERATION)
        scored = engine.prompt_logprobs(probe.scored_sequences(engine))
        learner = [*expected.scored, [float(expected.next_token[sample.response_ids[0]])]]
        result = probe.check(learner, [*scored, sample.logprobs[:1]], engine.policy_version, generation=True)
        sync = {k: float(v) for k, v in engine.metrics.items() if k.startswith("rollout/sync")}
        metrics: dict[str, float] = sync | result.metrics()
        return metrics

    return check


def restore_pending(state: dict[str, Any], sampler: QuestionSampler[Any], k: int, total: int) -> list[ProducedBatch]:
    """The batches a checkpoint saved for the steps after it (`RolloutProducer.checkpoint_state`) that this run,
    with ``grpo.max_staleness = k``, can train on; taken out of the resumed `state`, so no later checkpoint
    carries them. Kept: the longest run of them for steps start+1, start+2, … (at most k of them, none past
    `total`) whose every token is 0..k versions behind the learner that trains on it (at step u: the
    checkpoint's policy version + u − 1 − start). The rest are dropped and `sampler` goes back to the position
    after the last batch kept (before the first, where none is), so their questions are drawn again; the
    synchronous loop (k = 0) keeps none. Batches of other steps (an earlier checkpoint's, carried by a
    synchronous run's save) are dropped with the sampler as the checkpoint left it. A checkpoint that did not
    record the position before its batches, where none can be kept: `ConfigError` naming the k that works."""
    batches = [ProducedBatch.from_json(b) for b in state.pop("pending_rollouts", [])]
    info = state.pop(PENDING_INFO, {})
    if not batches:
        return []
    start, version = int(state["step"]), int(state["policy_version"])
    steps = f"{batches[0].step}..{batches[-1].step}"
    if info.get("after_step", start) != start or batches[0].step != start + 1:
        logger.warning("resume: dropped the rollouts of steps %s saved with the checkpoint of step %d: they belong "
                       "to the checkpoint of step %s", steps, start, info.get("after_step", batches[0].step - 1))
        return []
    kept = usable_pending(batches, start, version, k, total)
    if len(kept) == len(batches):
        return kept
    position = kept[-1].sampler_state if kept else info.get("sampler_before")
    if position is None:
        need = max(len(batches), *(pending_lag(b, start, version) for b in batches))
        raise ConfigError([f"the checkpoint of step {start} holds the rollouts of steps {steps}, which "
                           f"grpo.max_staleness={k} cannot train on, and predates the saved sampler position "
                           f"needed to draw them again: resume with grpo.max_staleness={need} or more"], "--resume")
    sampler.load_state_dict(position)
    logger.warning("resume: the checkpoint of step %d holds the rollouts of steps %s (sampled with "
                   "grpo.max_staleness=%s); with grpo.max_staleness=%d this run trains on %d of them and draws the "
                   "questions of steps %d..%d again", start, steps, info.get("max_staleness", "?"), k, len(kept),
                   start + len(kept) + 1, batches[-1].step)
    return kept


def usable_pending(batches: list[ProducedBatch], start: int, version: int, k: int,
                   total: int) -> list[ProducedBatch]:
    """The longest prefix of `batches` for steps start+1, start+2, … that a run with max_staleness `k` and
    `total` steps trains on: at most k batches, every token 0..k versions behind (`restore_pending`)."""
    kept: list[ProducedBatch] = []
    for b in batches:
        step = start + len(kept) + 1
        if b.step != step or len(kept) == k or step > total or not 0 <= pending_lag(b, start, version) <= k:
            break
        kept.append(b)
    return kept


def pending_lag(batch: ProducedBatch, start: int, version: int) -> int:
    """Versions between the learner at the batch's step (resumed after `start` at policy `version`) and the
    batch's oldest token; negative if a token is ahead of it."""
    learner = version + batch.step - 1 - start
    versions = [v for x in batch.samples for v in (x.policy_version, *x.token_versions())]
    oldest, newest = min(versions, default=learner), max(versions, default=learner)
    return learner - oldest if newest <= learner else -1
