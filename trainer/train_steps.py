"""One micro-batch of GRPO or SFT: per-token loss → `aggregate_loss` → ``backward()`` (CS336 §4, §7).

The caller sums gradients over ``gradient_accumulation_steps`` micro-batches and then steps the
optimizer. With equal-sized micro-batches the accumulated gradient equals that of the whole optimizer
batch in one pass, for every aggregation mode (``tests/test_invariance.py``).
"""

from __future__ import annotations

import torch

from trainer.losses import compute_policy_gradient_loss
from trainer.masking import aggregate_loss, masked_mean


def grpo_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    loss_type: str,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    *,
    length_normalization: str = "sequence_mean",
    normalize_constant: float | None = None,
    global_token_count: int | float | torch.Tensor | None = None,
    world_size: int = 1,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss of one micro-batch, aggregated and backpropagated.

    ``loss = aggregate_loss(ℓ, response_mask, length_normalization, ...)`` where ``ℓ`` (batch, seq) is
    `compute_policy_gradient_loss` of `loss_type`; then ``loss.backward()``. The modes are those of
    `trainer.masking.aggregate_loss`: ``"sequence_mean"`` (CS336 default: masked mean per sequence, mean
    over batch, / grad-accum), ``"constant"`` (Dr. GRPO; needs `normalize_constant`), ``"token"`` (DAPO;
    needs `global_token_count` and `world_size`).

    Args:
        policy_log_probs: (batch, seq), requires grad.
        response_mask: (batch, seq) bool or 0/1.
        raw_rewards / advantages: (batch, 1); old_log_probs: (batch, seq).
    Returns:
        ``(loss, metadata)``: ``loss`` is the 0-dim scalar that was backpropagated (already divided by
        the grad-accum steps / global token count — multiply back for a per-batch value). ``metadata``
        holds detached tensors: the loss function's own entries, plus ``"clip_fraction"`` as the mean of
        ``clipped`` over response tokens for ``grpo_clip``.
    """
    per_token_loss, loss_meta = compute_policy_gradient_loss(
        policy_log_probs,
        loss_type,
        raw_rewards=raw_rewards,
        advantages=advantages,
        old_log_probs=old_log_probs,
        cliprange=cliprange,
        cliprange_low=cliprange_low,
        cliprange_high=cliprange_high,
    )  # (batch, seq)
    loss = aggregate_loss(
        per_token_loss,
        response_mask,
        length_normalization,
        gradient_accumulation_steps=gradient_accumulation_steps,
        normalize_constant=normalize_constant,
        global_token_count=global_token_count,
        world_size=world_size,
    )
    torch.autograd.backward(loss)
    metadata = {key: value.detach() for key, value in loss_meta.items()}
    if "clipped" in loss_meta:
        metadata["clip_fraction"] = masked_mean(loss_meta["clipped"].float(), response_mask).detach()
    return loss.detach(), metadata


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
    *,
    length_normalization: str = "constant",
    global_token_count: int | float | torch.Tensor | None = None,
    world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the response tokens of one micro-batch, backpropagated.

    Default (CS336 §4.3): ``loss = −(1/B) Σ_i [Σ_t m_it log π_θ(y_it) / C] / G`` — i.e.
    ``aggregate_loss(−log_probs, mask, "constant", normalize_constant=C, gradient_accumulation_steps=G)``.
    ``length_normalization="sequence_mean"`` or ``"token"`` (with `global_token_count`) select the other
    `aggregate_loss` modes.

    Args:
        policy_log_probs: (batch, seq), requires grad.
        response_mask: (batch, seq) bool or 0/1.
    Returns:
        ``(loss, metadata)``: ``loss`` is the 0-dim scalar that was backpropagated; metadata has
        ``"nll_per_token"`` (detached masked mean NLL of this micro-batch) and ``"response_tokens"``.
    """
    loss = aggregate_loss(
        -policy_log_probs,
        response_mask,
        length_normalization,
        gradient_accumulation_steps=gradient_accumulation_steps,
        normalize_constant=normalize_constant,
        global_token_count=global_token_count,
        world_size=world_size,
    )
    torch.autograd.backward(loss)
    metadata = {
        "nll_per_token": masked_mean(-policy_log_probs.detach(), response_mask),
        "response_tokens": response_mask.sum().detach(),
    }
    return loss.detach(), metadata
