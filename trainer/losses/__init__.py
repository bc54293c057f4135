"""Every loss of the learners and the one rule that reduces it, each a pure function of tensors.

- `aggregate`: masked mean / normalize and `aggregate_loss`, the only way a per-token loss becomes the
  scalar that GRPO, SFT, EI and DPO backpropagate (sequence mean, constant, or token level).
- `pg`: per-token losses of the policy: REINFORCE, GRPO-Clip / No-Clip, GSPO, CISPO, the k3 KL penalty, the SFT NLL.
- `preference`: per-pair DPO, IPO and SimPO losses from sequence log-probs.

Log-probs themselves come from `trainer.logprobs`, the one forward path.
"""

from trainer.losses.aggregate import (
    LOSS_AGG_MODES,
    LossAggMode,
    aggregate_loss,
    masked_mean,
    masked_normalize,
)
from trainer.losses.pg import (
    POLICY_LOSS_TYPES,
    PolicyLossType,
    compute_cispo_loss,
    compute_grpo_clip_loss,
    compute_grpo_no_clip_loss,
    compute_gspo_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    k3_kl,
    sft_loss,
)
from trainer.losses.preference import dpo_loss_from_logps, ipo_loss_from_logps, simpo_loss_from_logps

__all__ = [
    "LOSS_AGG_MODES",
    "POLICY_LOSS_TYPES",
    "LossAggMode",
    "PolicyLossType",
    "aggregate_loss",
    "compute_cispo_loss",
    "compute_grpo_clip_loss",
    "compute_grpo_no_clip_loss",
    "compute_gspo_loss",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "dpo_loss_from_logps",
    "ipo_loss_from_logps",
    "k3_kl",
    "masked_mean",
    "masked_normalize",
    "sft_loss",
    "simpo_loss_from_logps",
]
