"""Stale-weight probe: hand-worked comparisons, then real syncs into vLLM (good, wrong, incomplete)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pytest
import torch
from helpers import perturbed, tiny_vllm_engine, vllm_at_least
from transformers import AutoModelForCausalLM

from rollout.engine import iter_state_dict
from rollout.hf_engine import HFEngine
from rollout.probe import (
    PROBE_TEXT,
    ProbeResult,
    StaleWeightProbe,
    StaleWeightsError,
    compare_logprobs,
    default_thresholds,
    probe_token_ids,
)
from rollout.vllm_engine import VLLMEngine


def load(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_compare_logprobs_hand_example() -> None:
    """|(-1, -2) - (-1.5, -2)| = (0.5, 0) and |(-3) - (-2)| = 1: mean 1.5 / 3 = 0.5, max 1."""
    assert compare_logprobs([[-1.0, -2.0], [-3.0]], [[-1.5, -2.0], [-2.0]]) == (0.5, 1.0, 3)
    mean, worst, _ = compare_logprobs([[-1.0]], [[-math.inf]])
    assert mean == worst == math.inf
    with pytest.raises(ValueError, match="scored 2 tokens"):
        compare_logprobs([[-1.0, -2.0]], [[-1.0]])


def test_thresholds_and_modes() -> None:
    assert default_thresholds(torch.float32) == (1e-3, 1e-3)
    bf16_max, bf16_mean = default_thresholds(torch.bfloat16)
    assert bf16_max > 1e-3 and bf16_mean > 1e-3
    probe = StaleWeightProbe([[1, 2, 3]])
    ok = probe.check([[-1.0, -2.0]], [[-1.0004, -2.0]], version=3)
    assert ok.ok and ok.policy_version == 3 and ok.metrics()["rollout/probe_ok"] == 1.0
    with pytest.raises(StaleWeightsError, match="policy version 3"):
        probe.check([[-1.0, -2.0]], [[-1.01, -2.0]], version=3)
    loose = StaleWeightProbe([[1, 2, 3]], max_threshold=0.1, mean_threshold=0.1)
    assert loose.check([[-1.0, -2.0]], [[-1.01, -2.0]]).ok
    with pytest.raises(ValueError, match="on_mismatch"):
        StaleWeightProbe([[1, 2]], on_mismatch="ignore")  # type: ignore[arg-type]


def test_warn_mode_logs_and_returns(caplog: pytest.LogCaptureFixture) -> None:
    probe = StaleWeightProbe([[1, 2, 3]], on_mismatch="warn")
    with caplog.at_level(logging.WARNING, logger="rollout.probe"):
        result = probe.check([[-1.0, -2.0]], [[-3.0, -2.0]])
    assert isinstance(result, ProbeResult) and not result.ok and result.max_abs_diff == 2.0
    assert "stale weights" in caplog.text


def test_default_probe_sequence(tiny_qwen2_path: str) -> None:
    hf = HFEngine(tiny_qwen2_path)
    ids = probe_token_ids(hf.tokenizer)
    assert len(ids) > 32 and hf.tokenizer.decode(ids) == PROBE_TEXT
    result = StaleWeightProbe(tokenizer=hf.tokenizer)(hf, hf.model)  # an engine sharing the learner: exact
    assert result.max_abs_diff == 0.0 and result.num_tokens == len(ids) - 1


# ---- against a real vLLM engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_qwen2_path: str) -> Iterator[VLLMEngine]:
    e = tiny_vllm_engine(tiny_qwen2_path)
    yield e
    e.close()


@pytest.mark.vllm
def test_probe_passes_after_a_good_sync(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    learner = perturbed(tiny_qwen2_path)
    engine.update_weights(iter_state_dict(learner))
    result = StaleWeightProbe(tokenizer=engine.tokenizer)(engine, learner)
    assert result.ok and result.max_abs_diff < 1e-4 and result.policy_version == engine.policy_version


@pytest.mark.vllm
def test_probe_catches_wrong_and_stale_weights(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    learner = perturbed(tiny_qwen2_path, seed=2)
    probe = StaleWeightProbe(tokenizer=engine.tokenizer)
    engine.update_weights(iter_state_dict(perturbed(tiny_qwen2_path, seed=3)))  # somebody else's weights
    with pytest.raises(StaleWeightsError, match="stale weights"):
        probe(engine, learner)
    engine.update_weights(iter_state_dict(learner))
    assert probe(engine, learner).ok
    with torch.no_grad():  # the learner takes a small step; no sync follows
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    with pytest.raises(StaleWeightsError):
        probe(engine, learner)


@pytest.mark.vllm
def test_probe_catches_untied_lm_head_left_behind(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """``named_parameters()`` lists a tied weight once; vLLM 0.32's reload then keeps the old ``lm_head``
    (vLLM 0.26 shares it with the embedding, so there the head follows and the probe passes)."""
    learner = perturbed(tiny_qwen2_path, seed=4)
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    engine.update_weights((n, p.detach()) for n, p in learner.named_parameters())
    result = StaleWeightProbe(tokenizer=engine.tokenizer, on_mismatch="warn")(engine, learner)
    if vllm_at_least(0, 32):
        assert not result.ok and result.mean_abs_diff > 1e-2
    else:
        assert result.ok and result.max_abs_diff < 1e-4
