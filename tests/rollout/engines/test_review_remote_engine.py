"""`RemoteEngine` against a real rollout server (vLLM on CPU, a 64-token context): greedy sampling with a group
size above one, and the server's context limit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import vllm_at_least
from transformers import AutoModelForCausalLM

from rollout.engines.hf import HFEngine
from rollout.engines.protocol import SamplingConfig
from rollout.engines.remote import RemoteEngine
from rollout.server import RolloutServer, free_port
from trainer.sync import StaleWeightProbe

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # starts a vLLM server process

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def server(tiny_qwen2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutServer]:
    tmp = tmp_path_factory.mktemp("remote")
    argv = ["--model", tiny_qwen2_path, "--port", str(free_port()), "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", str(MAX_MODEL_LEN),
            "--weights-dir", str(tmp / "weights")]  # fmt: skip
    server = RolloutServer(argv, startup_timeout_s=240, stop_timeout_s=20, log_path=tmp / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_greedy_with_n_gives_n_equal_samples_like_hf(
    server: RolloutServer, tiny_qwen2_path: str, tmp_path: Path
) -> None:
    """temperature 0 with n=3 through both generation routes: 3 samples per prompt, each the HF engine's greedy
    one (the server refused n > 1 with greedy sampling: HTTP 400 'n must be 1 when using greedy sampling')."""
    params = SamplingConfig(max_tokens=6, temperature=0.0, min_tokens=0, stop=(), n=3, seed=1)
    prompts = [[5, 6, 7], "What is"]
    ref = HFEngine(tiny_qwen2_path).generate(prompts, params)
    for inflight in [False, True] if vllm_at_least(0, 32) else [False]:
        remote = RemoteEngine(server.url, weights_dir=tmp_path, timeout_s=60, inflight=inflight)
        ours = remote.generate(prompts, params)
        assert [s.prompt_index for s in ours] == [0, 0, 0, 1, 1, 1]
        for a, b in zip(ours, ref, strict=True):
            assert (a.prompt_ids, a.response_ids, a.text, a.finish_reason) == (
                b.prompt_ids, b.response_ids, b.text, b.finish_reason,
            )  # fmt: skip
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
        ours[0].response_ids.append(-1)  # each sample owns its lists
        assert ours[1].response_ids == ref[1].response_ids
        remote.close()


def test_the_servers_context_limit_is_known(server: RolloutServer, tiny_qwen2_path: str, tmp_path: Path) -> None:
    """`max_model_len` is the server's (from ``/v1/models``; it was None), so the data check skips prompts the
    server would refuse and the probe fits its text (about 180 tokens) into 64 (HTTP 400 before)."""
    remote = RemoteEngine(server.url, weights_dir=tmp_path, timeout_s=60)
    try:
        assert remote.max_model_len == MAX_MODEL_LEN
        learner = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)  # the server's own weights
        probe = StaleWeightProbe(tokenizer=HFEngine(learner, tiny_qwen2_path).tokenizer)
        assert len(probe.token_ids[0]) > MAX_MODEL_LEN
        result = probe(remote, learner)
        assert result.ok and result.num_tokens == MAX_MODEL_LEN - 2 + 1
    finally:
        remote.close()


def test_one_prompt_for_the_list_of_prompts_is_refused(server: RolloutServer, tmp_path: Path) -> None:
    """A bare str was sent character by character (one request per character), a flat id list id by id."""
    remote = RemoteEngine(server.url, weights_dir=tmp_path, timeout_s=60)
    try:
        params = SamplingConfig(max_tokens=2, min_tokens=0, stop=(), seed=0)
        with pytest.raises(TypeError, match="got a bare str"):
            remote.generate("What is", params)
        with pytest.raises(TypeError, match="got a flat list of token ids"):
            remote.generate([5, 6, 7], params)
    finally:
        remote.close()
