"""The asynchronous rollout producer's shutdown, its errors, and the pending batches a checkpoint carries into
a resumed run (`trainer.learners.async_rollouts`), with fake sample functions and engines: no model, no vLLM."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from grpo_setups import remote_config, small_config

from rollout.engines.protocol import Sample
from rollout.reward import RewardResult
from trainer.config import ConfigError
from trainer.data.sampler import QuestionSampler
from trainer.data.tasks import Example
from trainer.learners import grpo
from trainer.learners.async_rollouts import (
    PENDING_INFO,
    ProducedBatch,
    ProducerStopped,
    RolloutProducer,
    RolloutSide,
    restore_pending,
)
from trainer.timing import PhaseTimer
from trainer.tracking import read_metrics

WAIT_S = 30  # an event that never comes fails the test, not the run


def fake_side(cfg: Any = None, engine: Any = None, scorer: Any = None) -> RolloutSide:
    return RolloutSide(cfg, None, engine, scorer, PhaseTimer())


class Recorder:
    """A sample function: records each step it starts, draws one question, takes `seconds` (or waits for
    `release`), returns an empty batch."""

    def __init__(self, seconds: float = 0.0, release: threading.Event | None = None) -> None:
        self.started: list[int] = []
        self.first = threading.Event()
        self.seconds, self.release = seconds, release

    def __call__(self, side: RolloutSide, sampler: QuestionSampler[Any], step: int) -> Any:
        self.started.append(step)
        self.first.set()
        sampler.draw(1)
        if self.release is not None:
            assert self.release.wait(WAIT_S)
        time.sleep(self.seconds)
        return [], torch.zeros(0), torch.zeros(0), {"time/step": 0.0}


class ReleaseOn(logging.Handler):
    """Sets `event` when a record containing `words` is logged."""

    def __init__(self, words: str, event: threading.Event) -> None:
        super().__init__()
        self.words, self.event = words, event  # not `release`: Handler.release() unlocks its I/O lock

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.event.set()


def wait_until(condition: Any, seconds: float = WAIT_S) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def producer(sample: Any, k: int, side: RolloutSide | None = None, **kwargs: Any) -> RolloutProducer:
    return RolloutProducer(side or fake_side(), QuestionSampler(list(range(100)), 0), sample, lambda e, s: {},
                           start=0, total=10, max_staleness=k, **kwargs)


# ---- shutdown --------------------------------------------------------------------------------------------
def test_close_stops_after_the_batch_in_progress() -> None:
    """k = 3: the weights of step 0 allow the batches of steps 1-4 at once. Closed while step 1's generates,
    the producer ends after that batch: no other is started, and close returns with the thread ended."""
    release = threading.Event()
    sample = Recorder(release=release)
    p = producer(sample, k=3)
    assert sample.first.wait(WAIT_S)
    closer = threading.Thread(target=p.close)
    closer.start()
    assert wait_until(p.side.stop.is_set)  # asked to stop while step 1's batch is under way
    release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive() and not p._thread.is_alive()
    assert sample.started == [1]  # one batch, not four


def test_close_ends_a_producer_waiting_for_weights() -> None:
    """k = 1: steps 1 and 2 generated, step 3 waits for the weights of step 1; close ends that wait."""
    sample = Recorder()
    p = producer(sample, k=1)
    p.take(2)
    p.close(timeout_s=5)
    assert sample.started == [1, 2] and not p._thread.is_alive()


def test_close_waits_past_its_timeout_for_a_batch_under_way(caplog: pytest.LogCaptureFixture) -> None:
    """A batch that outlasts close's timeout: a warning names what the producer is doing, and close returns
    only once the thread has ended (the caller closes the engine after it), having started no other batch."""
    release = threading.Event()
    sample = Recorder(release=release)
    p = producer(sample, k=2)
    assert sample.first.wait(WAIT_S)
    released_by_the_warning = ReleaseOn("still generating", release)  # the batch outlasts the timeout, always
    logging.getLogger("reasonrl").addHandler(released_by_the_warning)
    try:
        with caplog.at_level(logging.WARNING, logger="reasonrl"):
            p.close(timeout_s=0.1)
    finally:
        logging.getLogger("reasonrl").removeHandler(released_by_the_warning)
    assert release.is_set() and not p._thread.is_alive() and sample.started == [1]
    assert "the rollout producer is still generating the rollouts of step 1 0 s after it was asked to stop" \
        in caplog.text


class ZeroStdEngine:
    """Every sample answers "0": with gold "1" every group's rewards are equal (zero std), so DAPO refills."""

    policy_version = 0

    def __init__(self, on_generate: threading.Event) -> None:
        self.calls = 0
        self.on_generate = on_generate

    def generate(self, prompts: list[str], params: Any) -> list[Sample]:
        self.calls += 1
        self.on_generate.set()
        return [Sample(i, [1], [2], "0", [-1.0], "stop", 0) for i in range(len(prompts)) for _ in range(params.n)]


class ConstantScorer:
    def score(self, responses: list[str], golds: list[str]) -> list[RewardResult]:
        return [RewardResult(0.0, 0.0, 0.0) for _ in responses]


def test_a_stop_ends_dynamic_sampling_between_rounds(tmp_path: Path) -> None:
    """DAPO with 3 refill rounds, every group zero-std: a stop asked during the first round's generation ends
    the batch before the second round (`ProducerStopped`) instead of generating all four."""
    cfg = small_config("unused", tmp_path, "grpo.dynamic_sampling=true", "grpo.max_refill_rounds=3",
                       "data.prompt_template=question_only")
    side = fake_side(cfg, None, ConstantScorer())
    side.accelerator = type("OneProcess", (), {"num_processes": 1, "process_index": 0})()
    side.engine = ZeroStdEngine(side.stop)  # type: ignore[assignment]  # generating asks the stop
    with pytest.raises(ProducerStopped):
        grpo.sample_and_score(side, QuestionSampler([Example(f"{i} + 1 =", "1") for i in range(10)], 0), 1)
    assert side.engine.calls == 1  # type: ignore[attr-defined]


# ---- errors ----------------------------------------------------------------------------------------------
class FailingLiveEngine:
    """In-flight pushes fail (after setting `pushed`), as a server refusing the weights would."""

    policy_version = 0

    def __init__(self) -> None:
        self.pushed = threading.Event()

    def update_weights_live(self, snapshot: Any) -> None:
        self.pushed.set()
        raise ConnectionError("weights refused")


def test_a_failed_batch_is_the_error_raised_when_its_inflight_push_failed_too(
        caplog: pytest.LogCaptureFixture) -> None:
    """Step 1's batch fails after the in-flight push of step 1's weights failed: the learner gets the batch's
    error as the cause; the push's error is logged, not raised in its place."""
    from trainer.learners.async_rollouts import RolloutProducerError

    engine = FailingLiveEngine()

    def sample(side: RolloutSide, sampler: QuestionSampler[Any], step: int) -> Any:
        assert engine.pushed.wait(WAIT_S)
        raise ValueError("generation failed")

    p = producer(sample, k=1, side=fake_side(engine=engine), inflight=True)
    p.hand_weights(type("Snapshot", (), {"step": 1, "version": 1})())  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="reasonrl"), pytest.raises(RolloutProducerError) as failure:
        p.take(1)
    p.close()
    assert isinstance(failure.value.__cause__, ValueError), failure.value
    assert "generating the rollouts of step 1" in str(failure.value)
    assert "loading the weights of step 1 into the rollout engine in flight: ConnectionError: weights refused" \
        in caplog.text


# ---- pending batches on resume ---------------------------------------------------------------------------
QUESTIONS = [Example(f"q{i}", "1") for i in range(40)]
TOTAL = 8


class VersionEngine:
    """Holds the policy version of the weights pushed into it."""

    policy_version = 0

    def update_weights(self, snapshot: Any) -> None:
        self.policy_version = snapshot.version


def versioned_sample(side: RolloutSide, sampler: QuestionSampler[Example], step: int) -> Any:
    """Two questions a step, one sample each, drawn by the engine's version; the text is the question."""
    samples = [Sample(i, [1], [2], q.question, [-1.0], "stop", side.engine.policy_version)
               for i, q in enumerate(sampler.draw(2))]
    return samples, torch.zeros(2), torch.zeros(2), {"time/step": 0.0}


def learn(p: RolloutProducer, steps: range, version: int, trained: list[str]) -> int:
    """The learner's side: take each step's batch, check its staleness as `async_grpo_step` does, record its
    questions, hand the next version's weights over. Returns the learner's version after `steps`."""
    for step in steps:
        batch = p.take(step)
        grpo.staleness(version, batch.samples, p.k)
        trained += [x.text for x in batch.samples]
        version += 1
        p.hand_weights(type("Snapshot", (), {"step": step, "version": version})())  # type: ignore[arg-type]
    return version


def async_run(k: int, first: int, last: int, state: dict[str, Any] | None, trained: list[str],
              pending: Any = ()) -> dict[str, Any]:
    """Steps first..last with max_staleness `k` from `state` (None: a fresh run); the checkpoint after `last`
    (`checkpoint_state` with the step and policy version, as `Session.save` writes them)."""
    sampler = QuestionSampler(QUESTIONS, 0)
    if state is not None:
        sampler.load_state_dict(state["sampler"])
    version = 0 if state is None else state["policy_version"]
    engine = VersionEngine()
    engine.policy_version = version
    p = RolloutProducer(fake_side(engine=engine), sampler, versioned_sample, lambda e, s: {}, start=first - 1,
                        total=TOTAL, max_staleness=k, pending=pending)
    try:
        version = learn(p, range(first, last + 1), version, trained)
        return {"step": last, "policy_version": version, **p.checkpoint_state(last)}
    finally:
        p.close()


def straight_questions() -> list[str]:
    return [q.question for q in QuestionSampler(QUESTIONS, 0).draw(2 * TOTAL)]


def resume(state: dict[str, Any], k: int, trained: list[str]) -> list[Any]:
    """Resume `state` (a checkpoint of step 4) with max_staleness `k` to the end; the batches it kept."""
    sampler = QuestionSampler(QUESTIONS, 0)
    sampler.load_state_dict(state["sampler"])
    kept = restore_pending(state, sampler, k, TOTAL)
    state["sampler"] = sampler.state_dict()
    if k:
        async_run(k, 5, TOTAL, state, trained, kept)
    else:  # the synchronous loop: each step draws and trains on its own questions
        trained += [q.question for _ in range(5, TOTAL + 1) for q in sampler.draw(2)]
    return kept


@pytest.mark.timeout(60)
@pytest.mark.parametrize("k", [3, 4, 2, 1, 0])
def test_resume_with_another_max_staleness_trains_every_question_once(k: int) -> None:
    """A run with k = 3 checkpointed after step 4 holds the batches of steps 5-7 (sampled by versions 1-3:
    3 behind). Resumed with k ≥ 3 it trains on them; with k < 3 (the synchronous loop included) they are too
    stale, so they are dropped and their questions drawn again. Either way every step's questions are those
    of a run straight through, and the pending batches leave the resumed state."""
    trained: list[str] = []
    state = async_run(3, 1, 4, None, trained)
    assert [b["step"] for b in state["pending_rollouts"]] == [5, 6, 7]
    kept = resume(state, k, trained)
    assert [b.step for b in kept] == ([5, 6, 7] if k >= 3 else [])
    assert trained == straight_questions()
    assert "pending_rollouts" not in state and PENDING_INFO not in state


def test_a_checkpoint_carrying_an_earlier_checkpoints_batches_resumes(caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint of step 6 written by a synchronous run resumed from step 4's asynchronous checkpoint still
    holds step 4's batches (5-7) under an older version of the loop. Resumed with k = 1 they are dropped
    (the checkpoint's sampler position is its own), and steps 7-8 are generated, not waited for forever."""
    trained: list[str] = []
    state = async_run(3, 1, 4, None, trained)
    sampler = QuestionSampler(QUESTIONS, 0)
    sampler.load_state_dict(state[PENDING_INFO]["sampler_before"])
    trained += [q.question for q in sampler.draw(4)]  # synchronous steps 5, 6
    carried = {**state, "step": 6, "policy_version": 6, "sampler": sampler.state_dict()}
    del carried[PENDING_INFO]  # as the older loop saved them
    with caplog.at_level(logging.WARNING, logger="reasonrl"):
        assert restore_pending(carried, sampler, 1, TOTAL) == []
    assert "dropped the rollouts of steps 5..7 saved with the checkpoint of step 6" in caplog.text
    async_run(1, 7, TOTAL, carried, trained)
    assert trained == straight_questions()


def test_lowering_max_staleness_on_an_old_checkpoint_is_one_clear_error() -> None:
    """A checkpoint saved before the sampler position ahead of its batches was kept cannot draw them again:
    resuming it with a smaller k names the k it needs."""
    state = async_run(3, 1, 4, None, [])
    del state[PENDING_INFO]
    with pytest.raises(ConfigError, match=r"the checkpoint of step 4 holds the rollouts of steps 5..7, which "
                                          r"grpo.max_staleness=1 cannot train on, .*resume with "
                                          r"grpo.max_staleness=3 or more"):
        restore_pending(state, QuestionSampler(QUESTIONS, 0), 1, TOTAL)


def test_the_producer_refuses_pending_batches_it_cannot_serve() -> None:
    state = async_run(3, 1, 4, None, [])
    batches = [ProducedBatch.from_json(b) for b in state["pending_rollouts"]]
    with pytest.raises(ValueError, match=r"pending batches of steps \[5, 6, 7\] after step 4 with max_staleness=2"):
        RolloutProducer(fake_side(), QuestionSampler(QUESTIONS, 0), versioned_sample, lambda e, s: {}, start=4,
                        total=TOTAL, max_staleness=2, pending=batches)


def trainer_state(run: Path, step: int) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_asynchronous_checkpoint_resumes_synchronously_then_asynchronously_again(
        tiny_qwen2_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A k = 2 run interrupted in step 3 leaves step 2's checkpoint with the batches of steps 3-4. Resumed with
    grpo.max_staleness=0, the synchronous loop drops them and draws their questions again (its final sampler
    position is the one the asynchronous run had reached after step 4), and its checkpoints carry no pending
    batches; extended to 6 steps with k = 1, the run generates steps 5-6 instead of waiting for them."""
    from rollout.engines.hf import HFEngine

    monkeypatch.setattr("trainer.engines.build_engine", lambda cfg, learner: HFEngine(cfg.model.path))
    run = tmp_path / "run"
    extra = ("checkpoint.save_every=2", "checkpoint.keep_last=5")
    step = grpo.async_grpo_step

    def interrupted(s, producer, probe, n, ref_model):  # type: ignore[no-untyped-def]
        if n == 3:
            raise KeyboardInterrupt
        return step(s, producer, probe, n, ref_model)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(grpo, "async_grpo_step", interrupted)
        grpo.train_grpo(remote_config(tiny_qwen2_path, run, *extra, "grpo.max_staleness=2"))
    saved = trainer_state(run, 2)
    assert [b["step"] for b in saved["pending_rollouts"]] == [3, 4]

    grpo.train_grpo(remote_config(tiny_qwen2_path, run, *extra, "grpo.max_staleness=0"), resume=True)
    synchronous = trainer_state(run, 4)
    assert "pending_rollouts" not in synchronous and PENDING_INFO not in synchronous
    assert synchronous["sampler"] == saved["sampler"]

    grpo.train_grpo(remote_config(tiny_qwen2_path, run, *extra, "grpo.max_staleness=1", "grpo.n_grpo_steps=6"),
                    resume=True)
    records = [r for r in read_metrics(run) if "train/loss" in r]
    assert [r["step"] for r in records][-2:] == [5, 6]
