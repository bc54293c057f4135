"""Gradient of one optimizer batch is the same however it is split (micro-batches × accumulation, ranks).

For SFT and for GRPO under each `aggregate_loss` mode, on the tiny GPT-2 (fp32, dropout off):
processing a batch of 4 sequences as 1 × 1, 2 × 2 or 4 × 4 (micro-batches × accumulation steps) gives the
same accumulated gradient within 1e-6 relative (‖g_k − g_1‖ / ‖g_1‖, and per parameter). For token mode
(and for sequence_mean, with equal shards) two simulated DDP ranks — each computing its half separately,
gradients then averaged as DDP does — equal one rank with the whole batch.

The sequences have different prompt and response lengths, so a rule that mixed up per-micro-batch and
global normalisation (e.g. token mean per micro-batch) would fail here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from cs336_adapters import grpo_microbatch_train_step, sft_microbatch_train_step
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.data.tokenization import tokenize_prompt_and_output
from trainer.logprobs import get_response_log_probs

PROMPTS = ["What is 2 + 3?", "Janet has 16 eggs and gives away 3. How many are left?", "Q: 7 * 8", "Tom"]
OUTPUTS = [
    " <think> 2 + 3 = 5 </think> <answer> 5 </answer>",
    " 13",
    " <think> 7 * 8 = 56 </think> <answer> 56 </answer> and more words after it",
    " has 5 apples. He buys 7 more apples.",
]
RTOL = 1e-6
MAX_LEN = 64  # the Dr. GRPO / SFT constant

Grads = list[torch.Tensor]


@pytest.fixture(scope="module")
def setup(tiny_gpt2_path: str) -> dict[str, torch.Tensor | torch.nn.Module]:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()  # eval: dropout off
    batch = tokenize_prompt_and_output(PROMPTS, OUTPUTS, tok)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        current = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
    return {
        "model": model,
        **batch,
        "advantages": torch.randn(len(PROMPTS), 1, generator=gen),
        # old policy ≠ current so ratios differ from 1 and some tokens are clipped
        "old_log_probs": current + 0.3 * torch.randn(current.shape, generator=gen),
    }


StepFn = Callable[[dict[str, torch.Tensor], torch.Tensor, int], None]


def accumulate(setup: dict, rows: torch.Tensor, n_micro: int, step: StepFn) -> Grads:
    """Zero grads, run `step` on `n_micro` equal micro-batches of `rows`, return the summed gradients."""
    model = setup["model"]
    model.zero_grad(set_to_none=True)
    for part in rows.chunk(n_micro):
        mb = {k: v[part] for k, v in setup.items() if isinstance(v, torch.Tensor)}
        log_probs = get_response_log_probs(model, mb["input_ids"], mb["labels"])["log_probs"]
        step(mb, log_probs, n_micro)
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def assert_same_grads(got: Grads, want: Grads) -> None:
    assert len(got) == len(want) > 0
    flat_got, flat_want = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])
    assert float(flat_want.norm()) > 0
    rel = float((flat_got - flat_want).norm() / flat_want.norm())
    assert rel <= RTOL, f"relative gradient difference {rel:.3e}"
    for g, w in zip(got, want, strict=True):
        assert float((g - w).norm()) <= RTOL * max(float(w.norm()), 1e-30) + 1e-9


def grpo_step(mode: str, global_tokens: int | None = None, world_size: int = 1) -> StepFn:
    def step(mb: dict[str, torch.Tensor], log_probs: torch.Tensor, n_micro: int) -> None:
        grpo_microbatch_train_step(
            log_probs,
            mb["response_mask"],
            n_micro,
            "grpo_clip",
            advantages=mb["advantages"],
            old_log_probs=mb["old_log_probs"],
            cliprange=0.2,
            length_normalization=mode,
            normalize_constant=MAX_LEN,
            global_token_count=global_tokens,
            world_size=world_size,
        )

    return step


def sft_step(mb: dict[str, torch.Tensor], log_probs: torch.Tensor, n_micro: int) -> None:
    sft_microbatch_train_step(log_probs, mb["response_mask"], n_micro, normalize_constant=MAX_LEN)


ALL = torch.arange(len(PROMPTS))


def test_batch_is_heterogeneous(setup: dict) -> None:
    """Different response lengths per sequence (else sequence_mean and token modes would coincide)."""
    lengths = setup["response_mask"].sum(-1).tolist()
    assert len(set(lengths)) == len(lengths)


@pytest.mark.parametrize("n_micro", [2, 4])
def test_sft_invariant_to_micro_batching(setup: dict, n_micro: int) -> None:
    assert_same_grads(accumulate(setup, ALL, n_micro, sft_step), accumulate(setup, ALL, 1, sft_step))


@pytest.mark.parametrize("mode", ["sequence_mean", "constant", "token"])
@pytest.mark.parametrize("n_micro", [2, 4])
def test_grpo_invariant_to_micro_batching(setup: dict, mode: str, n_micro: int) -> None:
    total = int(setup["response_mask"].sum())
    step = grpo_step(mode, global_tokens=total)
    assert_same_grads(accumulate(setup, ALL, n_micro, step), accumulate(setup, ALL, 1, step))


def test_token_mode_per_micro_batch_count_would_differ(setup: dict) -> None:
    """Control: normalising each micro-batch by its *own* token count (the classic bug) changes the grads."""
    whole = accumulate(setup, ALL, 1, grpo_step("token", global_tokens=int(setup["response_mask"].sum())))

    def buggy(mb: dict[str, torch.Tensor], log_probs: torch.Tensor, n_micro: int) -> None:
        grpo_step("token", global_tokens=int(mb["response_mask"].sum()) * n_micro)(mb, log_probs, n_micro)

    split = accumulate(setup, ALL, 2, buggy)
    with pytest.raises(AssertionError, match="relative gradient difference"):
        assert_same_grads(split, whole)


@pytest.mark.parametrize("n_micro", [1, 2])
def test_token_mode_world_size_simulation(setup: dict, n_micro: int) -> None:
    """Two ranks, each with half the batch and the global token count, world_size=2; DDP averages
    their gradients → equal to one rank (world_size=1) processing the whole batch."""
    total = int(setup["response_mask"].sum())
    single = accumulate(setup, ALL, 1, grpo_step("token", global_tokens=total, world_size=1))
    ranks = [
        accumulate(setup, shard, n_micro, grpo_step("token", global_tokens=total, world_size=2))
        for shard in ALL.chunk(2)
    ]
    averaged = [(a + b) / 2 for a, b in zip(*ranks, strict=True)]
    assert_same_grads(averaged, single)


@pytest.mark.parametrize("mode", ["sequence_mean", "constant"])
def test_per_sequence_modes_world_size_simulation(setup: dict, mode: str) -> None:
    """Equal shards: the DDP average of the per-rank batch means is the global batch mean."""
    single = accumulate(setup, ALL, 1, grpo_step(mode))
    ranks = [accumulate(setup, shard, 1, grpo_step(mode)) for shard in ALL.chunk(2)]
    assert_same_grads([(a + b) / 2 for a, b in zip(*ranks, strict=True)], single)
