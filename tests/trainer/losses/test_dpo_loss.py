"""DPO: hand values, independent straightforward computation on the tiny models, the template/EOS bug."""

from __future__ import annotations

import math

import pytest
import torch
from cs336_adapters import batched_dpo_loss, compute_per_instance_dpo_loss, dpo_batch_loss
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.data.prompts import ALPACA
from trainer.logprobs import sequence_logp
from trainer.losses import dpo_loss_from_logps

PROMPT = "Tom has 5 apples. He buys 7 more apples. How many apples does Tom have now?"
CHOSEN = "Tom has 5 + 7 = 12 apples. The answer is 12."
REJECTED = "The answer is 35."
BETA = 0.5


@pytest.fixture(scope="module")
def models(tiny_gpt2_path: str, tiny_qwen2_path: str) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """Policy = tiny GPT-2, reference = tiny Qwen2 (same tokenizer), so the two log-probs differ."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path).eval()
    return lm, ref, AutoTokenizer.from_pretrained(tiny_gpt2_path)


def straightforward_logp(model: torch.nn.Module, tokenizer: object, text: str) -> float:
    """Independent reference: string + EOS string, tokenised as a whole, full log-softmax, summed."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # type: ignore[operator]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).sum()
    return float(logp)


def straightforward_dpo(
    lm: torch.nn.Module, ref: torch.nn.Module, tok: object, template: str, eos: str
) -> float:
    texts = [template.format(instruction=PROMPT, response=r) + eos for r in (CHOSEN, REJECTED)]
    pw, pl = (straightforward_logp(lm, tok, t) for t in texts)
    rw, rl = (straightforward_logp(ref, tok, t) for t in texts)
    margin = BETA * ((pw - rw) - (pl - rl))
    return math.log1p(math.exp(-margin))  # −log σ(x) = log(1 + e^{−x})


def test_dpo_loss_from_logps_hand_values() -> None:
    """All log-probs equal → margin 0 → −log σ(0) = log 2 = 0.693147.
    π_w = −1, ref_w = −2, π_l = −3, ref_l = −2, β = 0.5: margin = (1) − (−1) = 2 → β·2 = 1 →
    −log σ(1) = log(1 + e^{−1}) = 0.313262."""
    z = torch.zeros(1)
    torch.testing.assert_close(dpo_loss_from_logps(z, z, z, z, 0.1), torch.tensor([math.log(2.0)]))
    got = dpo_loss_from_logps(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5
    )
    torch.testing.assert_close(got, torch.tensor([0.313262]), rtol=1e-6, atol=1e-6)


def test_dpo_loss_from_logps_matches_naive_and_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (-torch.rand(6, generator=gen, dtype=torch.float64) * 50 for _ in range(4))
    got = dpo_loss_from_logps(pw, pl, rw, rl, 0.1)
    want = [
        -math.log(1.0 / (1.0 + math.exp(-0.1 * ((a - c) - (b - d)))))
        for a, b, c, d in zip(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), strict=True)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss_from_logps(a, b, rw, rl, 0.1), (pw, pl))
    torch.testing.assert_close(dpo_batch_loss(got, gradient_accumulation_steps=3), got.mean() / 3)


def test_per_instance_matches_straightforward_computation(models: tuple) -> None:
    lm, ref, tok = models
    assert tok("x" + tok.eos_token, add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id
    got = compute_per_instance_dpo_loss(lm, ref, tok, BETA, PROMPT, CHOSEN, REJECTED)
    want = straightforward_dpo(lm, ref, tok, ALPACA, tok.eos_token)
    assert got.dim() == 0 and got.device == next(lm.parameters()).device
    assert got.requires_grad
    assert abs(got.item() - want) <= 1e-6 * abs(want), (got.item(), want)


def test_template_and_eos_matter(models: tuple) -> None:
    """The classic bugs: dropping the template or the EOS changes the value."""
    lm, ref, tok = models
    got = compute_per_instance_dpo_loss(lm, ref, tok, BETA, PROMPT, CHOSEN, REJECTED).item()
    no_template = straightforward_dpo(lm, ref, tok, "{instruction}{response}", tok.eos_token)
    no_eos = straightforward_dpo(lm, ref, tok, ALPACA, "")
    assert abs(got - no_template) > 1e-4
    assert abs(got - no_eos) > 1e-4
    # and the template is a real parameter: passing the bare template reproduces the bare value
    bare = compute_per_instance_dpo_loss(
        lm, ref, tok, BETA, PROMPT, CHOSEN, REJECTED, "{instruction}{response}"
    ).item()
    assert abs(bare - no_template) <= 1e-6 * abs(no_template)


def test_sequence_logp_padded_batch_matches_one_by_one(models: tuple) -> None:
    lm, _, tok = models
    texts = [ALPACA.format(instruction=PROMPT, response=r) for r in (CHOSEN, REJECTED, "12")]
    batched = sequence_logp(lm, tok, texts, chunk_tokens=16)
    for i, text in enumerate(texts):
        want = straightforward_logp(lm, tok, text + tok.eos_token)
        assert abs(batched[i].item() - want) <= 1e-6 * abs(want)
    no_eos = sequence_logp(lm, tok, texts[:1], append_eos=False)
    assert abs(no_eos[0].item() - straightforward_logp(lm, tok, texts[0])) <= 1e-6 * abs(no_eos[0].item())


def test_batched_equals_per_instance_and_grads_reach_policy_only(models: tuple) -> None:
    lm, ref, tok = models
    prompts = [PROMPT, "What is 3 * 4?"]
    chosen = [CHOSEN, "3 * 4 = 12"]
    rejected = [REJECTED, "3 * 4 = 7, so 7"]
    lm.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    batched = batched_dpo_loss(lm, ref, tok, BETA, prompts, chosen, rejected)
    dpo_batch_loss(batched).backward()
    batch_grads = [p.grad.clone() for p in lm.parameters()]
    assert all(p.grad is None for p in ref.parameters())
    lm.zero_grad(set_to_none=True)
    singles = [
        compute_per_instance_dpo_loss(lm, ref, tok, BETA, *args)
        for args in zip(prompts, chosen, rejected, strict=True)
    ]
    torch.stack(singles).mean().backward()
    torch.testing.assert_close(batched, torch.stack(singles).detach(), rtol=1e-6, atol=1e-7)
    for p, g in zip(lm.parameters(), batch_grads, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    lm.zero_grad(set_to_none=True)


def test_errors(models: tuple) -> None:
    lm, ref, tok = models
    with pytest.raises(ValueError, match="1 prompts, 2 chosen"):
        batched_dpo_loss(lm, ref, tok, BETA, ["a"], ["b", "c"], ["d"])
    with pytest.raises(ValueError, match="at least one text"):
        sequence_logp(lm, tok, [])


@pytest.mark.gpu
def test_result_on_policy_device_when_reference_elsewhere(tiny_gpt2_path: str, tiny_qwen2_path: str) -> None:
    """Policy on CUDA, reference on CPU: the loss lives on CUDA and matches the all-CPU value. Tolerance
    1e-4 relative because the CUDA and CPU forward passes round differently (not the same computation)."""
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    lm = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path).eval()
    on_cpu = compute_per_instance_dpo_loss(lm, ref, tok, BETA, PROMPT, CHOSEN, REJECTED).item()
    lm = lm.to("cuda")
    got = compute_per_instance_dpo_loss(lm, ref, tok, BETA, PROMPT, CHOSEN, REJECTED)
    assert got.device.type == "cuda"
    assert next(ref.parameters()).device.type == "cpu"
    got.backward()
    assert all(p.grad is None or p.grad.device.type == "cuda" for p in lm.parameters())
    assert abs(got.item() - on_cpu) <= 1e-4 * abs(on_cpu)
