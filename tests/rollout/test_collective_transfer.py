"""Collective weight transfer (`rollout.transfer`, backend gloo) into a real vLLM rollout server process started
with ``--weight-transfer gloo``: the weights equal those the filesystem transfer loads (its naive twin, on
the same server), the guard refuses an update that does not match the served model before any tensor moves,
a server killed mid-broadcast ends the sync with one clear error within a bounded wait, and GRPO trains
through it with the stale-weight probe passing after every push."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from grpo_setups import small_config
from helpers import perturbed, vllm_at_least

from rollout.auth import TOKEN_ENV, TOKEN_FILE_ENV
from rollout.engines.hf import HFEngine
from rollout.engines.remote import RemoteEngine, ServerError
from rollout.server import RolloutServer, free_port
from rollout.transfer import CollectiveSender
from rollout.weights import WeightStream, iter_state_dict
from trainer.learners.grpo import train_grpo
from trainer.sync import StaleWeightProbe
from trainer.tracking import read_metrics

pytestmark = pytest.mark.vllm
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]


def start(model: str, tmp: Path) -> RolloutServer:
    argv = ["--model", model, "--port", str(free_port()), "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512",
            "--weights-dir", str(tmp / "weights"), "--weight-transfer", "gloo"]  # fmt: skip
    return RolloutServer(argv, startup_timeout_s=300, stop_timeout_s=20, log_path=tmp / "server.log").start()


@pytest.fixture(scope="module")
def server(tiny_qwen2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutServer]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN_ENV, "transfer-test-secret-" + "0" * 12)  # read by the server and the clients
        patch.delenv(TOKEN_FILE_ENV, raising=False)
        started = start(tiny_qwen2_path, tmp_path_factory.mktemp("gloo-server"))
        try:
            yield started
        finally:
            started.close()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "transfer-test-secret-" + "0" * 12)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)


def weights_dir(server: RolloutServer) -> Path:
    return Path(server.argv[server.argv.index("--weights-dir") + 1])


def test_gloo_transfer_loads_the_weights_the_filesystem_transfer_loads(
    server: RolloutServer, secret: None, tiny_qwen2_path: str
) -> None:
    gloo = RemoteEngine(server.url, weight_transfer="gloo", timeout_s=120)
    files = RemoteEngine(server.url, weights_dir=weights_dir(server), timeout_s=120)
    learner = perturbed(tiny_qwen2_path, seed=3)
    probe = StaleWeightProbe(tokenizer=HFEngine(tiny_qwen2_path).tokenizer, on_mismatch="warn")
    version = gloo.policy_version
    gloo.update_weights(WeightStream(learner, bucket_mb=0.25))
    assert gloo.policy_version == version + 1 and gloo.sender is not None and gloo.sender.connects == 1
    assert probe(gloo, learner).max_abs_diff < 1e-4  # the learner's weights, not the checkpoint's
    by_broadcast = gloo.prompt_logprobs(PROMPTS)
    nbytes = sum(t.numel() * t.element_size() for _, t in iter_state_dict(learner))
    assert gloo.metrics["rollout/sync_gb"] == pytest.approx(nbytes / 1e9)

    files.update_weights(iter_state_dict(perturbed(tiny_qwen2_path, seed=4)))  # other weights in between
    assert not probe(files, learner).ok
    files.update_weights(iter_state_dict(learner))
    assert files.prompt_logprobs(PROMPTS) == by_broadcast  # bit-identical weights either way

    gloo.update_weights(iter_state_dict(learner))  # a plain (name, tensor) iterable; the same group
    assert gloo.sender.connects == 1 and gloo.prompt_logprobs(PROMPTS) == by_broadcast
    if vllm_at_least(0, 32):  # the server keeps the version (0.26 has no such route: each client keeps its own)
        assert RemoteEngine(server.url, weights_dir=weights_dir(server)).policy_version == gloo.policy_version
    gloo.close()
    files.close()


def test_the_guard_refuses_an_update_that_does_not_match_the_served_model(
    server: RolloutServer, secret: None, tiny_qwen2_path: str
) -> None:
    engine = RemoteEngine(server.url, weight_transfer="gloo", timeout_s=120)
    learner = perturbed(tiny_qwen2_path, seed=5)
    engine.update_weights(iter_state_dict(learner))
    before = engine.prompt_logprobs(PROMPTS)
    state = dict(iter_state_dict(learner))
    bad = {**state, "model.norm.weight": torch.ones(7)}
    start = time.monotonic()
    with pytest.raises(ServerError, match=r"model.norm.weight has shape \[7\], the served model's is \[128\]"):
        engine.update_weights(bad.items())
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(ServerError, match=r"1 of the served model's parameters missing: model\.norm\.weight"):
        engine.update_weights(missing.items())
    assert time.monotonic() - start < 60  # refused before any tensor moved: no broadcast to wait out
    assert engine.prompt_logprobs(PROMPTS) == before  # the old weights keep serving
    other = perturbed(tiny_qwen2_path, seed=6)
    engine.update_weights(iter_state_dict(other))  # the group is rebuilt after each failed update
    assert engine.sender is not None and engine.sender.connects == 3
    assert engine.prompt_logprobs(PROMPTS) != before
    engine.close()


def test_grpo_trains_through_the_gloo_transfer(
    server: RolloutServer, secret: None, tiny_qwen2_path: str, tmp_path: Path
) -> None:
    """Two synchronous and three asynchronous steps with weights broadcast to the server: every sync is checked
    by the full stale-weight probe (a mismatch fails the run; its metrics reach the log with the batch after
    the push, so k = 1 logs one of its two pushes in three steps), and no weights touch the filesystem."""
    for k in (0, 1):
        out = tmp_path / f"k{k}"
        cfg = small_config(tiny_qwen2_path, out, "rollout.engine=vllm", "rollout.placement=remote",
                           f"rollout.server_url={server.url}", "rollout.weight_transfer=gloo",
                           "rollout.sleep_between_rollouts=false", f"grpo.n_grpo_steps={2 + k}",
                           f"grpo.max_staleness={k}")  # fmt: skip
        train_grpo(cfg)
        rows = [r for r in read_metrics(out) if "rollout/sync_gb" in r]
        assert len(rows) == 2 - k and all(r["rollout/sync_gb"] > 0 and r["rollout/probe_ok"] == 1 for r in rows)
        assert not (out / "weights").exists()


def test_a_server_killed_mid_broadcast_ends_the_sync_with_one_clear_error(
    tiny_qwen2_path: str, tmp_path: Path, secret: None
) -> None:
    own = start(tiny_qwen2_path, tmp_path)
    try:
        engine = RemoteEngine(own.url, weight_transfer="gloo", timeout_s=120)
        engine.update_weights(iter_state_dict(perturbed(tiny_qwen2_path, seed=7)))  # the group is up
        assert own.process is not None
        group = os.getpgid(own.process.pid)

        class KilledMidway(WeightStream):  # lists itself up front, then kills the server at its 6th tensor
            def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
                for i, pair in enumerate(super().__iter__()):
                    if i == 5:
                        os.killpg(group, signal.SIGKILL)
                        time.sleep(1)
                    yield pair

        start_s = time.monotonic()
        with pytest.raises((ConnectionError, RuntimeError)) as caught:
            engine.update_weights(KilledMidway(perturbed(tiny_qwen2_path, seed=8)))
        assert time.monotonic() - start_s < 60
        message = str(caught.value)
        assert "/update_weights" in message or "weight transfer (gloo)" in message, message
    finally:
        own.close()


def test_a_send_completing_after_the_servers_answer_is_not_an_error() -> None:
    """`CollectiveSender._await`: a successful answer to ``/update_weights`` means the server received every
    tensor, so a send whose completion lags behind it is waited for (within ``settle_s``), not reported lost;
    an error answer ends the wait with that error; no answer at all, with the timeout."""
    sender = CollectiveSender(client=None, server_url="http://127.0.0.1:1", backend="gloo",  # type: ignore[arg-type]
                              timeout_s=30, host="127.0.0.1")  # fmt: skip
    answered: Future[Any] = Future()
    answered.set_result({})
    polls = iter([False] * 20 + [True])
    sender._await(lambda: next(polls), answered, "lm_head.weight")  # completes after the answer: fine
    sender.timeout_s = 0.5  # above, 20 sleeps of 0.5 ms had to fit in it: a starved machine overran it
    sender.settle_s = 0.05
    with pytest.raises(RuntimeError, match=r"sending lm_head\.weight did not complete within 0\.05 s after it"):
        sender._await(lambda: False, answered, "lm_head.weight")
    refused: Future[Any] = Future()
    refused.set_exception(ServerError("refused", 422))
    with pytest.raises(ServerError, match="refused"):
        sender._await(lambda: False, refused, "x")
    with pytest.raises(TimeoutError, match=r"x not received within 0\.5 s"):
        sender._await(lambda: False, Future(), "x")


@pytest.mark.gpu
def test_nccl_transfer_into_a_server_on_its_own_gpu(tiny_qwen2_path: str, tmp_path: Path, secret: None) -> None:
    """The same exchange over NCCL (vLLM's own engine on the server): the server on GPU 1, the learner's
    weights on GPU 0 (NCCL needs one GPU per rank), checked by the probe and against the filesystem twin."""
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL between the learner and a server needs two GPUs")
    argv = ["--model", tiny_qwen2_path, "--port", str(free_port()), "--dtype", "float32", "--enforce-eager",
            "--gpu-memory-utilization", "0.2", "--max-model-len", "512", "--weights-dir", str(tmp_path / "weights"),
            "--weight-transfer", "nccl"]  # fmt: skip
    with RolloutServer(argv, startup_timeout_s=300, stop_timeout_s=20, log_path=tmp_path / "server.log",
                       env={"CUDA_VISIBLE_DEVICES": "1"}) as server:  # fmt: skip
        torch.cuda.set_device(0)
        learner = perturbed(tiny_qwen2_path, seed=3).to("cuda:0")
        nccl = RemoteEngine(server.url, weight_transfer="nccl", timeout_s=120)
        nccl.update_weights(WeightStream(learner))
        probe = StaleWeightProbe(tokenizer=HFEngine(tiny_qwen2_path).tokenizer)
        assert probe(nccl, learner).max_abs_diff < 1e-3
        by_broadcast = nccl.prompt_logprobs(PROMPTS)
        files = RemoteEngine(server.url, weights_dir=tmp_path / "weights", timeout_s=120)
        files.update_weights(iter_state_dict(learner))
        assert files.prompt_logprobs(PROMPTS) == by_broadcast
        nccl.close()
