"""Per-pair preference losses from sequence log-probs: DPO, IPO and SimPO. Pure functions: (batch,) in and out.

With ``h = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))`` (summed sequence
log-probs, `trainer.logprobs.sequence_logp`; the reference terms are constants):

- DPO (Rafailov et al. 2023, eq. 7):   ``L = −log σ(β h)``
- IPO (Azar et al. 2023, eq. 17):      ``L = (h − 1/(2β))²``
- SimPO (Meng et al. 2024, eq. 6):     ``L = −log σ(β·mean_w − β·mean_l − γ)``, ``mean = log π_θ(y|x) / |y|``
  over the response tokens only, no reference model.

None of these reduce over pairs; the DPO learner does, through `trainer.losses.aggregate.aggregate_loss`
(``"token"`` mode with one "token" per pair).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _log_ratio_margin(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> torch.Tensor:
    """``h = (π_w − ref_w) − (π_l − ref_l)`` on sequence log-probs, the references detached; (batch,)."""
    return (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())


def dpo_loss_from_logps(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair DPO loss ``−log σ(β h)`` (Rafailov et al. 2023, eq. 7; module docstring for ``h``).

    All inputs (batch,) summed sequence log-probs; the reference ones are treated as constants.
    E.g. h = 0 → log 2 ≈ 0.693 for any β. Returns (batch,).
    """
    # all inputs: (batch,) -> (batch,)
    margin = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * margin)


def ipo_loss_from_logps(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair IPO loss ``(h − 1/(2β))²`` (Azar et al. 2023, eq. 17), with summed log-probs as in the paper
    (TRL averages them per token instead).

    All inputs (batch,) summed sequence log-probs; references are constants. E.g. h = 0, β = 0.5 → 1.0.
    """
    # all inputs: (batch,) -> (batch,)
    h = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


def simpo_loss_from_logps(
    mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """Per-pair SimPO loss ``−log σ(β·mean_w − β·mean_l − γ)`` (Meng et al. 2024, eq. 6).

    Inputs (batch,) length-normalised response log-probs ``log π(y|x) / |y|``; ``γ`` is the target reward
    margin. E.g. equal means, γ = 0 → log 2 ≈ 0.693.
    """
    # mean_chosen, mean_rejected: (batch,) -> (batch,)
    return -F.logsigmoid(beta * (mean_chosen - mean_rejected) - gamma)
