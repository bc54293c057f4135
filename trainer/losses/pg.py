"""Per-token losses of a policy's log-probs (CS336 §4, §7). Pure functions: tensors in, ``(batch, seq)`` out.

None of these reduce over tokens; `trainer.losses.aggregate.aggregate_loss` alone turns the per-token loss
into a scalar (`sft_loss` is the NLL passed through it, what SFT, EI and the warm start call). Advantages / rewards are per sequence, shape ``(batch, 1)`` (a ``(batch,)`` tensor is
accepted and reshaped, never silently broadcast along the sequence axis).

- naive / REINFORCE:   ``ℓ_t = −A · log π_θ(o_t)``
- GRPO-Clip (PPO):     ``ℓ_t = −min(ρ_t A, clip(ρ_t, 1−ε_low, 1+ε_high) A)``, ``ρ_t = π_θ(o_t)/π_old(o_t)``
  (ε_low = ε_high = ε in the paper; DAPO "clip-higher" raises ε_high)
- GRPO-No-Clip:        ``ℓ_t = −ρ_t A``
- CISPO:               ``ℓ_t = −sg[clip(ρ_t, 1−ε_low, 1+ε_high)] · A · log π_θ(o_t)`` (MiniMax-M1, arXiv 2506.13585)
- GSPO (-token):       ``ℓ_t = −min(s_t A, clip(s_t, 1−ε_low, 1+ε_high) A)``, ``s_t = sg[s] · π_θ(o_t)/sg[π_θ(o_t)]``,
  ``s = (π_θ(o)/π_old(o))^{1/|o|}`` the length-normalised sequence ratio (Zheng et al. 2025, arXiv 2507.18071)
- k3 KL penalty:       ``ℓ_t = exp(r_t) − r_t − 1``, ``r_t = log π_ref(o_t) − log π_θ(o_t)`` (Schulman 2020)
- SFT NLL:             ``ℓ_t = −log π_θ(y_t)``, REINFORCE with ``A = 1`` on demonstrations (`sft_loss`)
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from trainer.losses.aggregate import aggregate_loss

PolicyLossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip", "gspo", "cispo"]
POLICY_LOSS_TYPES: tuple[str, ...] = get_args(PolicyLossType)


def _per_sequence(values: torch.Tensor, policy_log_probs: torch.Tensor, name: str) -> torch.Tensor:
    """(batch,) or (batch, 1) → (batch, 1), checked against policy_log_probs (batch, seq)."""
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    if values.dim() != 2 or values.shape[1] != 1 or values.shape[0] != policy_log_probs.shape[0]:
        raise ValueError(
            f"{name} must be (batch, 1) with batch={policy_log_probs.shape[0]}; got {tuple(values.shape)}"
        )
    return values.to(policy_log_probs.dtype)


def _check_same_shape(policy_log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> None:
    if policy_log_probs.shape != old_log_probs.shape:
        raise ValueError(
            f"policy_log_probs {tuple(policy_log_probs.shape)} and old_log_probs "
            f"{tuple(old_log_probs.shape)} disagree"
        )


def _check_clip_ranges(low: float, high: float) -> None:
    if low < 0 or high < 0:
        raise ValueError(f"clip ranges must be >= 0; got low={low}, high={high}")


def compute_naive_policy_gradient_loss(
    raw_rewards_or_advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
) -> torch.Tensor:
    """REINFORCE per-token loss ``ℓ_t = −A · log π_θ(o_t | q, o_<t)`` (CS336 eq. 32).

    Args:
        raw_rewards_or_advantages: (batch, 1) — raw rewards (no baseline) or advantages.
        policy_log_probs: (batch, seq).
    Returns:
        (batch, seq) per-token loss.
    """
    adv = _per_sequence(raw_rewards_or_advantages, policy_log_probs, "raw_rewards_or_advantages")
    return -adv * policy_log_probs  # (batch, seq)


def compute_grpo_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    cliprange: float,
    *,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-Clip per-token loss ``−min(ρ A, clip(ρ, 1−ε_low, 1+ε_high) A)`` (CS336 eq. 33, PPO-Clip).

    ``ρ = exp(log π_θ − log π_old)``. ``ε_low`` / ``ε_high`` default to `cliprange`; pass
    `cliprange_high` > `cliprange` for DAPO's clip-higher.

    Args:
        advantages: (batch, 1).
        policy_log_probs, old_log_probs: (batch, seq); ``old_log_probs`` is treated as a constant.
    Returns:
        ``(loss (batch, seq), metadata)`` with ``"clipped"`` (batch, seq) bool — true where the clipped
        term is strictly smaller than the unclipped one (the clip is active and the token gets no
        gradient) — and ``"clip_fraction"`` (0-dim), the mean of ``clipped`` over *all* positions
        (log the mean over response tokens instead).
    """
    eps_low = cliprange if cliprange_low is None else cliprange_low
    eps_high = cliprange if cliprange_high is None else cliprange_high
    _check_clip_ranges(eps_low, eps_high)
    _check_same_shape(policy_log_probs, old_log_probs)
    adv = _per_sequence(advantages, policy_log_probs, "advantages")  # (batch, 1)
    ratio = torch.exp(policy_log_probs - old_log_probs.detach())  # (batch, seq)
    unclipped = ratio * adv  # (batch, seq)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # (batch, seq)
    loss = -torch.minimum(unclipped, clipped)  # (batch, seq)
    is_clipped = clipped < unclipped  # (batch, seq) bool
    return loss, {"clipped": is_clipped, "clip_fraction": is_clipped.float().mean()}


def compute_grpo_no_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-No-Clip per-token loss ``−ρ A`` with ``ρ = π_θ / π_old`` (CS336 §7.6 ablation).

    Args: as `compute_grpo_clip_loss`. Returns ``(loss (batch, seq), {})``.
    """
    _check_same_shape(policy_log_probs, old_log_probs)
    adv = _per_sequence(advantages, policy_log_probs, "advantages")  # (batch, 1)
    ratio = torch.exp(policy_log_probs - old_log_probs.detach())  # (batch, seq)
    return -ratio * adv, {}


def compute_cispo_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    cliprange_low: float,
    cliprange_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO per-token loss (MiniMax-M1, Chen et al. 2025, arXiv 2506.13585, eqs. 4-5).

    ``ℓ_t = −sg[clip(ρ_t, 1−ε_low, 1+ε_high)] · A · log π_θ(o_t)``, ``ρ_t = π_θ(o_t)/π_old(o_t)``: REINFORCE
    weighted by the clipped, detached importance ratio. Unlike GRPO-Clip no token loses its gradient where
    the ratio leaves the range; only its weight is bounded. On-policy (ρ = 1) it is
    ``reinforce_with_baseline``. (MiniMax-M1 bounds only the upper side: set a large ``cliprange``.)

    Args: as `compute_grpo_clip_loss`.
    Returns:
        ``(loss (batch, seq), metadata)`` with ``"clipped"`` (batch, seq) bool, where the weight was clipped,
        and ``"clip_fraction"`` (0-dim, over all positions).
    """
    _check_clip_ranges(cliprange_low, cliprange_high)
    _check_same_shape(policy_log_probs, old_log_probs)
    adv = _per_sequence(advantages, policy_log_probs, "advantages")  # (batch, 1)
    ratio = torch.exp(policy_log_probs.detach() - old_log_probs.detach())  # (batch, seq)
    weight = torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)  # (batch, seq), no gradient
    is_clipped = weight != ratio  # (batch, seq) bool
    return -weight * adv * policy_log_probs, {"clipped": is_clipped, "clip_fraction": is_clipped.float().mean()}


def compute_gspo_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_low: float,
    cliprange_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token per-token loss (Zheng et al. 2025, "Group Sequence Policy Optimization", eqs. 13-14).

    ``ℓ_t = −min(s_t A, clip(s_t, 1−ε_low, 1+ε_high) A)`` with ``s_t = sg[s] · π_θ(o_t)/sg[π_θ(o_t)]`` and
    ``s = exp((1/|o|) Σ_t m_t (log π_θ(o_t) − log π_old(o_t)))`` over the response tokens. Every token of a
    row has the value ``s`` and the gradient ``s · ∇ log π_θ(o_t)`` (none where the row's clip binds), so
    with the ``sequence_mean`` aggregation the loss and its gradient are those of GSPO's sequence-level
    objective (eq. 5; tested against it). The paper clips at ε_low = 3e-4, ε_high = 4e-4: a sequence ratio
    moves far less than a token's.

    Args:
        advantages: (batch, 1).
        policy_log_probs, old_log_probs: (batch, seq); ``old_log_probs`` is treated as a constant.
        response_mask: (batch, seq) bool or 0/1: the tokens of each response (a row with none has s = 1).
    Returns:
        ``(loss (batch, seq), metadata)`` with ``"clipped"`` (batch, seq) bool (the row's clip is active,
        on every position of the row) and ``"clip_fraction"`` (0-dim, over all positions).
    """
    _check_clip_ranges(cliprange_low, cliprange_high)
    if not policy_log_probs.shape == old_log_probs.shape == response_mask.shape:
        raise ValueError(
            f"policy_log_probs {tuple(policy_log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)} and "
            f"response_mask {tuple(response_mask.shape)} disagree"
        )
    adv = _per_sequence(advantages, policy_log_probs, "advantages")  # (batch, 1)
    mask = response_mask.to(policy_log_probs.dtype)  # (batch, seq)
    log_ratio = (policy_log_probs.detach() - old_log_probs.detach()) * mask  # (batch, seq)
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # (batch, 1)
    ratio = torch.exp(seq_log_ratio + policy_log_probs - policy_log_probs.detach())  # (batch, seq): value s
    unclipped = ratio * adv  # (batch, seq)
    clipped = torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high) * adv  # (batch, seq)
    is_clipped = clipped < unclipped  # (batch, seq) bool
    return -torch.minimum(unclipped, clipped), {"clipped": is_clipped, "clip_fraction": is_clipped.float().mean()}


def compute_policy_gradient_loss(
    policy_log_probs: torch.Tensor,
    loss_type: str,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    *,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dispatch to the per-token loss of `loss_type` (CS336 §7 ``compute_policy_gradient_loss``).

    - ``"no_baseline"``: `compute_naive_policy_gradient_loss` with ``A = raw_rewards`` (needs raw_rewards).
    - ``"reinforce_with_baseline"``: naive loss with ``A = advantages`` (needs advantages).
    - ``"grpo_clip"``: needs advantages, old_log_probs and cliprange (or both cliprange_low/high).
    - ``"grpo_no_clip"``: needs advantages and old_log_probs.
    - ``"gspo"``: as ``"grpo_clip"``, and response_mask (the sequence ratio averages over the response).
    - ``"cispo"``: as ``"grpo_clip"``.

    Returns ``(loss (batch, seq), metadata)``. Raises ValueError naming a missing argument, or listing
    the valid loss types for an unknown one.
    """
    # policy_log_probs: (batch, seq); raw_rewards / advantages: (batch, 1)
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {list(POLICY_LOSS_TYPES)}")

    def need(value: torch.Tensor | float | None, name: str) -> None:
        if value is None:
            raise ValueError(f"loss_type {loss_type!r} needs {name}, which was not given")

    if loss_type == "no_baseline":
        need(raw_rewards, "raw_rewards")
        assert raw_rewards is not None
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    need(advantages, "advantages")
    assert advantages is not None
    if loss_type == "reinforce_with_baseline":
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    need(old_log_probs, "old_log_probs")
    assert old_log_probs is not None
    if loss_type == "grpo_no_clip":
        return compute_grpo_no_clip_loss(advantages, policy_log_probs, old_log_probs)
    if cliprange is None and (cliprange_low is None or cliprange_high is None):
        raise ValueError(
            f"loss_type {loss_type!r} needs cliprange (or both cliprange_low and cliprange_high), "
            "which was not given"
        )
    low = cliprange_low if cliprange_low is not None else cliprange
    high = cliprange_high if cliprange_high is not None else cliprange
    assert low is not None and high is not None
    if loss_type == "cispo":
        return compute_cispo_loss(advantages, policy_log_probs, old_log_probs, low, high)
    if loss_type == "gspo":
        need(response_mask, "response_mask")
        assert response_mask is not None
        return compute_gspo_loss(advantages, policy_log_probs, old_log_probs, response_mask, low, high)
    return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, low, cliprange_high=high)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ‖π_ref) per token: ``exp(r) − r − 1`` with ``r = log π_ref − log π_θ``.

    Unbiased for the KL when the tokens are sampled from π_θ, and ≥ 0 token by token (unlike k1 = −r).
    E.g. ``log π_θ = 0, log π_ref = log 2`` → ``2 − log 2 − 1 ≈ 0.307``. The gradient flows through both
    arguments; pass a detached (or no-grad) reference.
    """
    # log_probs, ref_log_probs: (batch, seq) -> (batch, seq)
    r = ref_log_probs - log_probs
    return torch.exp(r) - r - 1


def sft_loss(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str,
    *,
    gradient_accumulation_steps: int = 1,
    normalize_constant: float | None = None,
    global_token_count: int | float | torch.Tensor | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """Negative log-likelihood of the response tokens of one micro-batch, as the scalar to backpropagate.

    ``aggregate_loss(−log π_θ(y), m, mode, ...)``: with ``"constant"`` (CS336 §4.3)
    ``−(1/B) Σ_i [Σ_t m_it log π_θ(y_it) / C] / G``; with ``"token"`` (SFT and EI learners) the micro-batch
    losses sum to the token-mean NLL of the optimizer batch over all ranks. Arguments as `aggregate_loss`.
    """
    # policy_log_probs: (batch, seq); response_mask: (batch, seq) bool or 0/1 -> ()
    return aggregate_loss(
        -policy_log_probs,
        response_mask,
        mode,
        gradient_accumulation_steps=gradient_accumulation_steps,
        normalize_constant=normalize_constant,
        global_token_count=global_token_count,
        world_size=world_size,
    )
