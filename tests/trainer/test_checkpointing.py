"""`model.gradient_checkpointing` (`trainer.learner.enable_checkpointing`) against its naive twin, the same
model without it: each block really runs again in the backward (it never did: transformers checkpoints only
blocks in training mode, and the learner's model stays in eval mode), never under no_grad, with equal
log-probs and gradients and dropout still off (tiny GPT-2 has dropout 0.1 in its config), under LoRA too."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from trainer.config import LoraConfig, ModelConfig, OptimConfig
from trainer.data.batching import pack_token_ids
from trainer.learner import Learner
from trainer.logprobs import forward_log_probs
from trainer.sync import learner_logprobs


def block_calls(learner: Learner) -> list[bool]:
    """Records, for each call of the first block, whether grad mode was on."""
    calls: list[bool] = []
    block = next(m for m in learner.unwrapped.modules() if isinstance(m, GradientCheckpointingLayer))
    block.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    return calls


def log_probs_and_grads(learner: Learner) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 200, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    responses = [torch.randint(2, 200, (n,), generator=gen).tolist() for n in (7, 4, 11)]
    tokens = pack_token_ids(prompts, responses, pad_id=1)
    model = learner.model
    model.zero_grad()
    out = forward_log_probs(model, tokens, return_token_entropy=True, response_only=True)
    (out["log_probs"].sum() + 0.1 * out["token_entropy"].sum()).backward()
    grads = {n: p.grad.clone() for n, p in learner.unwrapped.named_parameters() if p.grad is not None}
    return out["log_probs"].detach(), grads


@pytest.mark.parametrize(("model", "lora"), [("tiny_qwen2_path", None), ("tiny_gpt2_path", None),
                                             ("tiny_qwen2_path", LoraConfig(r=4, alpha=8))])
def test_checkpointed_blocks_run_again_in_the_backward_with_equal_results(model: str, lora: LoraConfig | None,
                                                                          request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    plain, checkpointed = (Learner(ModelConfig(path=path, gradient_checkpointing=on, lora=lora), OptimConfig())
                           for on in (False, True) if torch.manual_seed(0))  # the same LoRA initialisation
    plain_calls, calls = block_calls(plain), block_calls(checkpointed)
    want, want_grads = log_probs_and_grads(plain)
    got, got_grads = log_probs_and_grads(checkpointed)
    assert plain_calls == [True] and calls == [True, True]  # the recompute is the second call
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same kernels: bit for bit
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-6, atol=1e-7)
    dropouts = [m for m in checkpointed.unwrapped.modules() if isinstance(m, torch.nn.Dropout)]
    assert not any(m.training for m in dropouts) and (dropouts or "qwen" in model)  # GPT-2's dropout stays off
    learner_logprobs(checkpointed.model, [[5, 6, 7, 8]])  # the probe's eval()/train(False) round trip
    calls.clear()
    log_probs_and_grads(checkpointed)
    with torch.no_grad():
        forward_log_probs(checkpointed.model, pack_token_ids([[5]], [[6, 7]], pad_id=1))
    assert calls == [True, True, False]  # still checkpointed after the probe; never under no_grad
