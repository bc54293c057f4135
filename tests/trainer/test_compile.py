"""`model.compile` (`trainer.learner.compile_blocks`) against its naive twin, the eager model.

Compiled transformer blocks give the eager model's response log-probs, entropies and gradients on micro-batches
of several widths (dynamic shapes), with and without gradient checkpointing, under LoRA too; parameter names
(checkpoints, weight sync) are unchanged; a model without listed blocks and DeepSpeed ZeRO-3 are refused.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.config import LoraConfig, ModelConfig, OptimConfig
from trainer.data.batching import TokenBatch, pack_token_ids
from trainer.learner import Learner, compile_blocks, enable_checkpointing
from trainer.logprobs import forward_log_probs
from trainer.lora import apply_lora

pytestmark = pytest.mark.slow  # each compilation takes seconds on CPU
TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32; inductor fuses (reorders) elementwise work


def batch(seed: int, rows: int) -> TokenBatch:
    gen = torch.Generator().manual_seed(seed)

    def ids(most: int) -> list[int]:
        return torch.randint(2, 200, (int(torch.randint(1, most, (1,), generator=gen)),), generator=gen).tolist()

    return pack_token_ids([ids(12) for _ in range(rows)], [ids(20) for _ in range(rows)], pad_id=1)


def log_probs_and_grads(model: torch.nn.Module, tokens: TokenBatch) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    model.zero_grad()
    out = forward_log_probs(model, tokens, return_token_entropy=True, response_only=True)
    (out["log_probs"].sum() + 0.1 * out["token_entropy"].sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_equal_the_eager_model(tiny_qwen2_path: str, checkpointing: bool) -> None:
    eager, compiled = (AutoModelForCausalLM.from_pretrained(tiny_qwen2_path) for _ in range(2))
    if checkpointing:  # as the learner does it: blocks recomputed in the backward, the model in eval mode
        for m in (eager, compiled):
            enable_checkpointing(m)
    names = list(compiled.state_dict())
    assert compile_blocks(compiled) == compiled.config.num_hidden_layers
    assert list(compiled.state_dict()) == names  # no "_orig_mod." prefix: checkpoints and syncs unchanged
    for seed, rows in ((0, 4), (1, 3), (2, 6)):  # three widths: dynamic shapes, no wrong reuse
        tokens = batch(seed, rows)
        want, want_grads = log_probs_and_grads(eager, tokens)
        got, got_grads = log_probs_and_grads(compiled, tokens)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TOL)
        assert got_grads.keys() == want_grads.keys() and want_grads
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], **TOL)


def test_compile_finds_the_blocks_under_lora(tiny_qwen2_path: str) -> None:
    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    eager, compiled = (apply_lora(AutoModelForCausalLM.from_pretrained(tiny_qwen2_path), lora) for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled) == 2
    tokens = batch(3, 4)
    (want, want_grads), (got, got_grads) = log_probs_and_grads(eager, tokens), log_probs_and_grads(compiled, tokens)
    torch.testing.assert_close(got["log_probs"], want["log_probs"], **TOL)
    assert got_grads.keys() == want_grads.keys() and all("lora_" in n for n in got_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL)


def test_compile_refuses_a_model_without_listed_blocks() -> None:
    with pytest.raises(ValueError, match=r"model\.compile: found no transformer blocks in Linear"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_compile_refused_under_zero3(tiny_qwen2_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One clear error before anything is prepared (ZeRO-3's gathering hooks would be traced)."""
    monkeypatch.setattr(Learner, "sharded", property(lambda self: True))
    monkeypatch.setattr("trainer.learner._configure_deepspeed", lambda *args: None)
    config = ModelConfig(path=tiny_qwen2_path, dtype="float32", compile=True)
    with pytest.raises(ValueError, match=r"model\.compile with DeepSpeed ZeRO-3"):
        Learner(config, OptimConfig(), accelerator=SimpleNamespace())  # type: ignore[arg-type]


def test_learner_compiles_its_blocks(tiny_qwen2_path: str) -> None:
    learner = Learner(ModelConfig(path=tiny_qwen2_path, dtype="float32", compile=True), OptimConfig())
    layers = learner.unwrapped.model.layers  # type: ignore[union-attr]
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)
    plain = Learner(ModelConfig(path=tiny_qwen2_path, dtype="float32"), OptimConfig())
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in plain.unwrapped.model.layers)  # type: ignore[union-attr]
