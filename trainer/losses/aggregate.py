"""Masked reductions and the one rule that turns a per-token loss into the scalar GRPO, SFT and DPO backpropagate.

Every learner reduces its ``(batch, seq)`` per-token loss through `aggregate_loss` and nothing else (verl's
``agg_loss``), so the normalisation lives in one place and its micro-batch / gradient-accumulation /
world-size invariance is tested once (``tests/trainer/test_invariance.py``). ``L`` = per-token loss, ``m`` =
response mask, ``B`` = micro-batch size, ``G`` = gradient accumulation steps, ``W`` = world size:

- ``"sequence_mean"`` (CS336 / original GRPO): ``(1/B) Σ_i [Σ_t m_it L_it / Σ_t m_it] / G``.
- ``"constant"`` (Dr. GRPO; CS336 SFT): ``(1/B) Σ_i [Σ_t m_it L_it / C] / G``, ``C`` = ``normalize_constant``.
- ``"token"`` (DAPO token-level): ``W · Σ_{i,t} m_it L_it / N``, ``N`` = response tokens of the whole
  optimizer batch (all micro-batches, all ranks); ``W`` undoes DDP's mean over ranks, and there is no
  ``/ G`` because ``N`` already spans every micro-batch.

With equal-sized micro-batches the ``G`` micro-batch losses of any mode sum to the loss of the whole
optimizer batch at once (and, averaged over ``W`` ranks, of the whole global batch).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

LossAggMode = Literal["sequence_mean", "constant", "token"]
LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)


def masked_mean(
    tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *, empty_is_zero: bool = False
) -> torch.Tensor:
    """Mean of `tensor` over the elements where `mask` is 1: ``Σ m·x / Σ m`` (along `dim`, or all).

    `mask` may be bool or numeric (0/1) and must broadcast to `tensor`. Where the mask is empty along the
    reduced dimension the result is NaN (0/0), as a plain mean of nothing would be, or 0 with
    `empty_is_zero` (the count is clamped to at least 1: what a per-sequence loss or a logged metric
    wants for a row without response tokens).

    Example: ``masked_mean([[1., 2.], [3., 4.]], [[1, 0], [1, 1]]) == (1 + 3 + 4) / 3``.
    """
    # tensor: (...), mask: broadcastable to tensor -> () or tensor's shape without `dim`
    mask_f = mask.to(tensor.dtype)
    total = (tensor * mask_f).sum() if dim is None else (tensor * mask_f).sum(dim=dim)
    count = mask_f.expand_as(tensor).sum() if dim is None else mask_f.expand_as(tensor).sum(dim=dim)
    return total / (count.clamp(min=1.0) if empty_is_zero else count)


def masked_normalize(
    tensor: torch.Tensor,
    mask: torch.Tensor,
    normalize_constant: float = 1.0,
    dim: int | None = None,
) -> torch.Tensor:
    """Masked sum divided by a constant: ``Σ m·x / normalize_constant`` (along `dim`, or all).

    Example: ``masked_normalize([[1., 2.], [3., 4.]], [[1, 0], [1, 1]], 2.0) == (1 + 3 + 4) / 2``.
    """
    # tensor: (...), mask: broadcastable to tensor
    masked = tensor * mask.to(tensor.dtype)
    total = masked.sum() if dim is None else masked.sum(dim=dim)
    return total / normalize_constant


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    gradient_accumulation_steps: int = 1,
    normalize_constant: float | None = None,
    global_token_count: int | float | torch.Tensor | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """Reduce a per-token loss ``(batch, seq)`` to the scalar one micro-batch backpropagates.

    Implements the modes in the module docstring:

    - ``"sequence_mean"``: ``mean_i(masked_mean(L_i, m_i)) / G``. A sequence with no unmasked token
      contributes 0 (its denominator is clamped to 1) instead of NaN.
    - ``"constant"``: ``mean_i(masked_normalize(L_i, m_i, C)) / G``; needs `normalize_constant`.
    - ``"token"``: ``W · masked_sum(L, m) / N``; needs `global_token_count` (``N``, response tokens in the
      whole optimizer batch across micro-batches and ranks). `gradient_accumulation_steps` is not used.

    Raises ValueError for an unknown mode, a missing argument the mode needs (named), or non-positive
    `gradient_accumulation_steps` / `world_size` / constants.
    """
    # per_token_loss: (batch, seq); mask: (batch, seq) bool or 0/1
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {list(LOSS_AGG_MODES)}")
    if per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss must be (batch, seq); got shape {tuple(per_token_loss.shape)}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1; got {gradient_accumulation_steps}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    mask_f = mask.to(per_token_loss.dtype).expand_as(per_token_loss)  # (batch, seq)

    if mode == "sequence_mean":
        per_seq = masked_mean(per_token_loss, mask_f, dim=-1, empty_is_zero=True)  # (batch,)
        return per_seq.mean() / gradient_accumulation_steps
    if mode == "constant":
        if normalize_constant is None:
            raise ValueError(
                "aggregate_loss mode 'constant' needs normalize_constant (e.g. max generation length)"
            )
        if normalize_constant <= 0:
            raise ValueError(f"normalize_constant must be > 0; got {normalize_constant}")
        per_seq = masked_normalize(per_token_loss, mask_f, normalize_constant, dim=-1)  # (batch,)
        return per_seq.mean() / gradient_accumulation_steps
    # mode == "token"
    return (per_token_loss * mask_f).sum() * world_size / _token_count(global_token_count, per_token_loss)


def _token_count(
    global_token_count: int | float | torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor | float:
    """``N`` of the ``"token"`` mode: a positive number, or a tensor moved to `like`'s device and dtype."""
    if global_token_count is None:
        raise ValueError(
            "aggregate_loss mode 'token' needs global_token_count (response tokens in the whole optimizer "
            "batch, summed over micro-batches and ranks)"
        )
    if isinstance(global_token_count, torch.Tensor):
        # not validated: reading a CUDA tensor's value would sync the device every micro-batch
        return global_token_count.to(device=like.device, dtype=like.dtype)
    count = float(global_token_count)
    if count <= 0:
        raise ValueError(f"global_token_count must be > 0; got {count}")
    return count
