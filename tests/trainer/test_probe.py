"""Stale-weight probe: hand-worked comparisons, then real syncs into vLLM (good, wrong, incomplete)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import perturbed, tiny_vllm_engine, vllm_at_least
from transformers import AutoModelForCausalLM

from rollout.engines.hf import HFEngine, score_sequences
from rollout.engines.vllm import VLLMEngine
from rollout.weights import iter_state_dict
from trainer.config_io import config_from_dict
from trainer.sync import (
    PROBE_TEXT,
    ProbeResult,
    StaleWeightProbe,
    StaleWeightsError,
    compare_logprobs,
    default_thresholds,
    learner_logprobs,
    make_probe,
    probe_token_ids,
)


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
    with caplog.at_level(logging.WARNING, logger="trainer.sync"):
        result = probe.check([[-1.0, -2.0]], [[-3.0, -2.0]])
    assert isinstance(result, ProbeResult) and not result.ok and result.max_abs_diff == 2.0
    assert "stale weights" in caplog.text


def test_default_probe_sequence(tiny_qwen2_path: str) -> None:
    hf = HFEngine(tiny_qwen2_path)
    ids = probe_token_ids(hf.tokenizer)
    assert len(ids) > 32 and hf.tokenizer.decode(ids) == PROBE_TEXT
    result = StaleWeightProbe(tokenizer=hf.tokenizer)(hf, hf.model)  # an engine sharing the learner: exact
    assert result.max_abs_diff == 0.0 and result.generation_abs_diff == 0.0
    assert result.num_tokens == len(ids) - 1 + 1  # the probe's tokens and the one generated
    prompt_only = StaleWeightProbe(tokenizer=hf.tokenizer, generation_check=False)(hf, hf.model)
    assert prompt_only.num_tokens == len(ids) - 1 and prompt_only.generation_abs_diff is None
    assert "rollout/probe_generation_abs_diff" not in prompt_only.metrics()


def test_learner_logprobs_equal_the_plain_forward(tiny_qwen2_path: str) -> None:
    """The learner's side of the probe (`trainer.logprobs.forward_log_probs`, ragged sequences padded together)
    equals the naive one-liner ``log_softmax(model(ids).logits)`` of each sequence alone; the HF engine's
    `score_sequences` equals it to the last bit (same log-softmax), so a shared module probes exactly 0."""
    model = load(tiny_qwen2_path)
    model.train()
    seqs = [[5, 6, 7, 8, 9], [3, 4], list(range(10, 40))]
    ours = learner_logprobs(model, seqs)
    assert [len(x) for x in ours] == [4, 1, 29] and model.training
    with torch.no_grad():
        for seq, got in zip(seqs, ours, strict=True):
            ids = torch.tensor([seq])
            naive = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])
            assert torch.allclose(torch.tensor(got), naive[:, 0], atol=1e-5)
    assert learner_logprobs(model, seqs[:1]) == score_sequences(model, seqs[:1])


class _Engine:
    """The engine members `generation_prefix` reads (`RolloutEngine`: None where an engine has none)."""

    def __init__(self, cache_block_size: int | None = None, max_model_len: int | None = None) -> None:
        self.cache_block_size, self.max_model_len = cache_block_size, max_model_len


def test_generation_prefix_fills_two_cache_blocks() -> None:
    """Two blocks and 8 tokens of the probe sequence repeated; no shorter than the sequence less one token;
    the sequence alone without a block size; cut to fit max_model_len; `prefix_len` overrides."""
    probe = StaleWeightProbe([[1, 2, 3, 4, 5]])
    assert probe.generation_prefix(_Engine()) == [1, 2, 3, 4]
    assert probe.generation_prefix(_Engine(cache_block_size=4)) == [1, 2, 3, 4, 5] * 3 + [1]
    assert probe.generation_prefix(_Engine(cache_block_size=4, max_model_len=8)) == [1, 2, 3, 4, 5, 1, 2]
    assert probe.generation_prefix(_Engine(cache_block_size=1)) == [1, 2, 3, 4, 5] * 2
    assert StaleWeightProbe([[1, 2]], prefix_len=3).generation_prefix(_Engine(cache_block_size=4)) == [
        1,
        2,
        1,
    ]
    with pytest.raises(ValueError, match="prefix_len"):
        StaleWeightProbe([[1, 2]], prefix_len=0)


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
    """``named_parameters()`` lists a tied weight once. `VLLMEngine.update_weights` now refuses that stream
    (lm_head.weight missing); sent to vLLM's reload directly, vLLM 0.32 keeps the old ``lm_head`` and the
    probe sees it (vLLM 0.26 shares it with the embedding, so there the head follows and the probe passes)."""
    learner = perturbed(tiny_qwen2_path, seed=4)
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        engine.update_weights((n, p.detach()) for n, p in learner.named_parameters())
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    engine.llm.collective_rpc(
        "reload_weights",
        kwargs={
            "weights_iterator": ((n, p.detach()) for n, p in learner.named_parameters()),
            "is_checkpoint_format": True,
        },
    )
    engine.llm.reset_prefix_cache()
    result = StaleWeightProbe(tokenizer=engine.tokenizer, on_mismatch="warn")(engine, learner)
    if vllm_at_least(0, 32):
        assert not result.ok and result.mean_abs_diff > 1e-2
    else:
        assert result.ok and result.max_abs_diff < 1e-4


@pytest.mark.vllm
def test_probe_sees_a_stale_prefix_cache(
    engine: VLLMEngine, tiny_qwen2_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync whose prefix-cache reset did nothing: prompt log-probs (never read from the cache) still agree,
    the token generated after the probe's cached prefix does not, and the probe says so. With the reset the
    probe passes."""
    base, learner = load(tiny_qwen2_path), perturbed(tiny_qwen2_path, seed=5)
    probe = StaleWeightProbe(tokenizer=engine.tokenizer)
    prompt_only = StaleWeightProbe(tokenizer=engine.tokenizer, generation_check=False)
    prefix = probe.generation_prefix(engine)
    assert len(prefix) == 2 * engine.cache_block_size + 8 <= engine.max_model_len - 1
    engine.update_weights(iter_state_dict(base))
    assert probe(engine, base).ok  # leaves the prefix cached under these weights
    with monkeypatch.context() as patch:
        patch.setattr(engine.llm, "reset_prefix_cache", lambda *args, **kwargs: True)
        engine.update_weights(iter_state_dict(learner))
    assert prompt_only(engine, learner).max_abs_diff < 1e-4  # blind to the stale cache
    with pytest.raises(StaleWeightsError, match="stale prefix cache"):
        probe(engine, learner)
    result = StaleWeightProbe(tokenizer=engine.tokenizer, on_mismatch="warn")(engine, learner)
    assert result.generation_abs_diff is not None and result.generation_abs_diff > 1e-2
    engine.update_weights(iter_state_dict(base))
    assert probe(engine, base).ok
    engine.update_weights(iter_state_dict(learner))
    result = probe(engine, learner)
    assert result.ok and result.generation_abs_diff is not None and result.generation_abs_diff < 1e-4
    assert result.metrics()["rollout/probe_generation_abs_diff"] == result.generation_abs_diff


@pytest.mark.vllm
def test_default_thresholds_follow_a_bf16_learner_of_a_float32_engine(
    engine: VLLMEngine, tiny_qwen2_path: str
) -> None:
    """model.dtype bfloat16 with rollout.dtype float32: the engine computes in float32, the learner in bf16, so
    a correct sync differs by bf16 rounding (above float32's 1e-3). `make_probe` takes the less precise side's
    thresholds, and the probe passes (it used the engine's float32 ones alone and raised `StaleWeightsError`)."""
    learner = perturbed(tiny_qwen2_path, seed=6).to(torch.bfloat16)
    engine.update_weights(iter_state_dict(learner))
    cfg = config_from_dict({"model": {"path": "m", "dtype": "bfloat16"}, "rollout": {"dtype": "float32"}})
    probe = make_probe(cfg, _learner(engine, "no"))
    assert (probe.max_threshold, probe.mean_threshold) == default_thresholds(torch.bfloat16)
    result = probe(engine, learner)
    assert result.ok and result.max_abs_diff > default_thresholds(torch.float32)[0]
    fp32 = config_from_dict({"model": {"path": "m", "dtype": "float32"}, "rollout": {"dtype": "float32"}})
    strict = make_probe(fp32, _learner(engine, "no"))
    assert (strict.max_threshold, strict.mean_threshold) == default_thresholds(torch.float32)
    # float32 weights under `accelerate launch --mixed_precision bf16` (every launch/*.yaml for GPUs): the
    # learner computes in bf16 (and DeepSpeed holds bf16 weights), so the bf16 thresholds apply
    mixed = make_probe(fp32, _learner(engine, "bf16"))
    assert (mixed.max_threshold, mixed.mean_threshold) == default_thresholds(torch.bfloat16)
    assert make_probe(fp32, _learner(engine, "fp16")).mean_threshold == default_thresholds(torch.float16)[1]


def _learner(engine: VLLMEngine, mixed_precision: str) -> Any:
    """What `make_probe` reads of a learner: its tokenizer and its accelerator's mixed precision."""
    return SimpleNamespace(tokenizer=engine.tokenizer, accelerator=SimpleNamespace(mixed_precision=mixed_precision))


@pytest.mark.vllm
def test_probe_fits_an_engine_context_shorter_than_the_probe_text(tiny_qwen2_path: str) -> None:
    """rollout.max_model_len 64 (the config allows 16): the default probe text (about 180 tiny-tokenizer
    tokens) is scored cut to 63 tokens, on both sides; it was sent whole and vLLM refused it at the first sync."""
    from rollout.engines.vllm import VLLMEngine

    short = VLLMEngine(tiny_qwen2_path, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
                       max_model_len=64)  # fmt: skip
    try:
        learner = perturbed(tiny_qwen2_path, seed=7)
        short.update_weights(iter_state_dict(learner))
        probe = StaleWeightProbe(tokenizer=short.tokenizer)
        assert len(probe.token_ids[0]) > 64
        result = probe(short, learner)
        assert result.ok and result.num_tokens == 62 + 1 and result.max_abs_diff < 1e-4
        assert [len(s) for s in probe.scored_sequences(short)] == [63]
        prompt_only = StaleWeightProbe(tokenizer=short.tokenizer, generation_check=False)(short, learner)
        assert prompt_only.ok and prompt_only.num_tokens == 62
        # the asynchronous loop's probe (expectation taken at hand-over, checked after the push) cuts them too
        from trainer.learners.async_rollouts import ProbeExpectation, probe_check

        snapshot = SimpleNamespace(version=short.policy_version, step=1,
                                   expected=ProbeExpectation.of(probe, short, learner))
        metrics = probe_check(probe)(short, snapshot)  # type: ignore[arg-type]
        assert metrics["rollout/probe_ok"] == 1.0 and metrics["rollout/probe_max_abs_diff"] < 1e-4
    finally:
        short.close()
