"""The asynchronous rollout producer's shutdown, its errors, and the pending batches a checkpoint carries into
a resumed run (`trainer.learners.async_rollouts`), with fake sample functions and engines: no model, no vLLM."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from grpo_setups import small_config

from rollout.engines.protocol import Sample
from rollout.reward import RewardResult
from trainer.data.sampler import QuestionSampler
from trainer.data.tasks import Example
from trainer.learners import grpo
from trainer.learners.async_rollouts import ProducerStopped, RolloutProducer, RolloutSide
from trainer.timing import PhaseTimer

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


def producer(sample: Any, k: int, side: RolloutSide | None = None, **kwargs: Any) -> RolloutProducer:
    return RolloutProducer(side or fake_side(), QuestionSampler(list(range(100)), 0), sample, lambda e, s: {},
                           start=0, total=10, max_staleness=k, **kwargs)


# ---- shutdown --------------------------------------------------------------------------------------------
def test_close_stops_after_the_batch_in_progress() -> None:
    """k = 3: the weights of step 0 allow the batches of steps 1-4 at once. Closed while step 1's generates,
    the producer ends after that batch: no other is started, and close returns with the thread ended."""
    sample = Recorder(seconds=0.3)
    p = producer(sample, k=3)
    assert sample.first.wait(WAIT_S)
    began = time.monotonic()
    p.close()
    assert sample.started == [1]
    assert not p._thread.is_alive()
    assert time.monotonic() - began < 1.0  # one batch (0.3 s), not four


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
    threading.Timer(0.5, release.set).start()
    with caplog.at_level(logging.WARNING, logger="reasonrl"):
        p.close(timeout_s=0.1)
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
