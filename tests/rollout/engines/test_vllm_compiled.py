"""The vLLM engine with torch.compile (``enforce_eager=False``, the default on GPUs) on CPU: the weight sync and
the stale-weight probe work on the compiled model as they do on the eager one.

The other vLLM tests and the CPU configs run eagerly (on the tiny model compilation only adds start-up and
reload time), so this module is where the compiled path is covered on CPU: its own engine, in its own module
(one in-process engine at a time).
"""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed, rolled_token_rows
from transformers import AutoModelForCausalLM

from rollout.engines.hf import HFEngine
from rollout.engines.protocol import SamplingConfig
from rollout.engines.vllm import VLLMEngine
from rollout.weights import WeightStream
from trainer.sync import StaleWeightProbe, StaleWeightsError

GREEDY = SamplingConfig(max_tokens=16, temperature=0.0, min_tokens=0, stop=())
PROMPT = [5, 6, 7, 8, 9]

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_compiled_engine_syncs_and_probes_like_the_learner(tiny_qwen2_path: str) -> None:
    """Greedy continuations equal HF's before and after a bucketed sync of trained (perturbed) weights, with
    log-probs within 1e-4 (float32); the probe passes after the sync and catches wrong weights."""
    engine = VLLMEngine(tiny_qwen2_path, dtype="float32", enforce_eager=False, kv_cache_memory_bytes=64 << 20,
                        max_model_len=512)
    try:
        from vllm.config import CompilationMode

        mode = engine.llm.llm_engine.vllm_config.compilation_config.mode
        assert mode != CompilationMode.NONE, "the engine was not compiled"
        initial = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32)
        (ref,) = HFEngine(initial, tiny_qwen2_path).generate([PROMPT], GREEDY)
        (got,) = engine.generate([PROMPT], GREEDY)
        assert got.response_ids == ref.response_ids

        learner = perturbed(tiny_qwen2_path, seed=2)
        hf = HFEngine(learner, tiny_qwen2_path)
        (ref,) = hf.generate([PROMPT], GREEDY)
        assert ref.response_ids != got.response_ids, "the perturbation changes the greedy continuation"
        engine.update_weights(WeightStream(learner, bucket_mb=0.1))
        (after,) = engine.generate([PROMPT], GREEDY)
        assert after.response_ids == ref.response_ids
        assert max(abs(a - b) for a, b in zip(after.logprobs, ref.logprobs, strict=True)) <= 1e-4
        probe = StaleWeightProbe(tokenizer=engine.tokenizer, dtype=torch.float32)
        assert probe(engine, learner).ok

        engine.update_weights(rolled_token_rows(learner))
        with pytest.raises(StaleWeightsError):
            probe(engine, learner)
    finally:
        engine.close()
