"""The CS336 assignment-5 functions, as thin adapters over the code that trains.

The CS336 handout names a few functions that the learners do not call in that shape: a GRPO or SFT
micro-batch step taking log-probs instead of a model, a per-instance DPO loss, advantages computed from a
reward function. The tests that pin CS336 semantics call these adapters, and each adapter runs the
learner's own code:

- `grpo_microbatch_train_step` → `trainer.learners.grpo.micro_step`, with a stand-in learner whose forward
  returns the given log-probs (KL, entropy bonus and TIS off, as in CS336);
- `sft_microbatch_train_step` → `trainer.losses.sft_loss` (the SFT, EI and warm-start loss), then backward;
- `batched_dpo_loss` / `compute_per_instance_dpo_loss` → the DPO learner's `pair_logps` and `preference_loss`;
- `compute_group_normalized_rewards` → `trainer.advantages.group_normalize` and `reward_metadata`;
- `compute_entropy` is the plain (max-shifted) entropy, the naive twin of the chunked entropy that
  `trainer.logprobs` computes inside its autograd function.

Only the argument checks of the CS336 signatures (arguments that are optional there but always present in
a training config) are the adapters' own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from trainer.advantages import group_normalize, reward_metadata
from trainer.config import DPOConfig
from trainer.data.batching import TokenBatch
from trainer.data.prompts import ALPACA
from trainer.learners.dpo import PreferencePair, pair_logps, preference_loss
from trainer.learners.grpo import RolloutBatch, micro_step
from trainer.losses import aggregate_loss, masked_mean, sft_loss

# what each policy-gradient loss type needs besides the log-probs (`compute_policy_gradient_loss`)
_NEEDS = {
    "no_baseline": ("raw_rewards",),
    "reinforce_with_baseline": ("advantages",),
    "grpo_no_clip": ("advantages", "old_log_probs"),
    "grpo_clip": ("advantages", "old_log_probs"),
}


class _GivenLogProbs:
    """What `micro_step` uses of a `Learner`; its forward returns the given (batch, seq) log-probs."""

    def __init__(self, log_probs: torch.Tensor, world_size: int) -> None:
        self.given = log_probs
        self.device = log_probs.device
        self.accelerator = SimpleNamespace(num_processes=world_size)
        self.loss: torch.Tensor | None = None

    def log_probs(self, tokens: TokenBatch, return_token_entropy: bool = False,
                  temperature: float = 1.0) -> dict[str, torch.Tensor]:
        assert tokens.labels.shape == self.given.shape and temperature == 1.0
        return {"log_probs": self.given, "token_entropy": torch.zeros_like(self.given.detach())}

    def backward(self, loss: torch.Tensor) -> None:
        self.loss = loss.detach()
        torch.autograd.backward(loss)


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
    """CS336 ``grpo_microbatch_train_step``: the GRPO learner's `micro_step` on given log-probs.

    policy_log_probs, old_log_probs: (batch, seq); response_mask: (batch, seq) bool or 0/1;
    raw_rewards / advantages: (batch, 1) or (batch,). Returns ``(loss, metadata)``: the 0-dim scalar that
    was backpropagated (already divided by G or the global token count) and, for ``grpo_clip``,
    ``"clip_fraction"``, the fraction of response tokens whose clip is active.
    """
    given = {"raw_rewards": raw_rewards, "advantages": advantages, "old_log_probs": old_log_probs}
    for name in _NEEDS.get(loss_type, ()):
        if given[name] is None:
            raise ValueError(f"loss_type {loss_type!r} needs {name}, which was not given")
    if loss_type == "grpo_clip" and cliprange is None and (cliprange_low is None or cliprange_high is None):
        raise ValueError("loss_type 'grpo_clip' needs cliprange (or both cliprange_low and cliprange_high)")
    if length_normalization == "constant" and normalize_constant is None:
        raise ValueError("aggregate_loss mode 'constant' needs normalize_constant (e.g. max generation length)")
    b, s = policy_log_probs.shape  # (batch, seq)
    per_row = torch.zeros(b, device=policy_log_probs.device)
    ids = torch.zeros((b, s), dtype=torch.long)
    batch = RolloutBatch(
        tokens=TokenBatch(ids, ids, response_mask, torch.ones_like(ids)),
        raw_rewards=raw_rewards.reshape(-1) if raw_rewards is not None else per_row,  # (batch,)
        advantages=advantages.reshape(-1) if advantages is not None else per_row,  # (batch,)
        rollout_log_probs=torch.zeros((b, s)),  # only for the mismatch metrics (TIS is off)
        old_log_probs=old_log_probs,
    )
    grpo = SimpleNamespace(
        loss_type=loss_type, cliprange=cliprange if cliprange_low is None else cliprange_low,
        cliprange_high=cliprange if cliprange_high is None else cliprange_high, tis_cap=None, max_staleness=0,
        kl_coef=0.0,
        entropy_coef=0.0, length_normalization=length_normalization,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    cfg = SimpleNamespace(grpo=grpo, model=SimpleNamespace(packing=False),
                          rollout=SimpleNamespace(temperature=1.0, max_tokens=1.0 if normalize_constant is None else normalize_constant))
    learner = _GivenLogProbs(policy_log_probs, world_size)
    metrics = micro_step(learner, cfg, batch, torch.arange(b), global_token_count, None)  # type: ignore[arg-type]
    assert learner.loss is not None
    metadata = {}
    if "train/clip_fraction" in metrics:
        metadata["clip_fraction"] = torch.tensor(metrics["train/clip_fraction"], device=learner.device)
    return learner.loss, metadata


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
    """CS336 ``sft_microbatch_train_step``: `trainer.losses.sft_loss` (constant mode by default), backward.

    Returns the backpropagated 0-dim loss and ``"nll_per_token"`` (masked mean NLL of this micro-batch)
    and ``"response_tokens"``.
    """
    # policy_log_probs: (batch, seq); response_mask: (batch, seq) bool or 0/1
    loss = sft_loss(
        policy_log_probs, response_mask, length_normalization,
        gradient_accumulation_steps=gradient_accumulation_steps, normalize_constant=normalize_constant,
        global_token_count=global_token_count, world_size=world_size,
    )
    torch.autograd.backward(loss)
    metadata = {
        "nll_per_token": masked_mean(-policy_log_probs.detach(), response_mask),
        "response_tokens": response_mask.sum().detach(),
    }
    return loss.detach(), metadata


def batched_dpo_loss(
    lm: Any, lm_ref: Any, tokenizer: Any, beta: float, prompts: Sequence[str],
    responses_chosen: Sequence[str], responses_rejected: Sequence[str], template: str = ALPACA,
) -> torch.Tensor:
    """Per-pair DPO losses (batch,) on `lm`'s device: the DPO learner's summed sequence log-probs
    (`pair_logps`, chosen and rejected in one forward per model; the reference under ``no_grad``) and its
    `preference_loss`."""
    if not len(prompts) == len(responses_chosen) == len(responses_rejected):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(responses_chosen)} chosen and "
            f"{len(responses_rejected)} rejected responses"
        )
    pairs = [PreferencePair(*row) for row in zip(prompts, responses_chosen, responses_rejected, strict=True)]
    policy = pair_logps(lm, tokenizer, pairs, template, "dpo")
    with torch.no_grad():
        ref = pair_logps(lm_ref, tokenizer, pairs, template, "dpo")
    return preference_loss(policy, ref, DPOConfig(beta=beta, loss="dpo")).loss  # (n,)


def compute_per_instance_dpo_loss(
    lm: Any, lm_ref: Any, tokenizer: Any, beta: float, prompt: str, response_chosen: str,
    response_rejected: str, template: str = ALPACA,
) -> torch.Tensor:
    """CS336 ``compute_per_instance_dpo_loss``: the DPO loss (0-dim, on `lm`'s device) of one pair."""
    return batched_dpo_loss(lm, lm_ref, tokenizer, beta, [prompt], [response_chosen], [response_rejected],
                            template)[0]


def dpo_batch_loss(per_pair_loss: torch.Tensor, gradient_accumulation_steps: int = 1) -> torch.Tensor:
    """Mean over pairs / grad-accum through `aggregate_loss` (a pair is a one-token "sequence")."""
    per_pair = per_pair_loss.unsqueeze(-1)  # (batch,) -> (batch, 1)
    return aggregate_loss(per_pair, torch.ones_like(per_pair, dtype=torch.bool), "sequence_mean",
                          gradient_accumulation_steps=gradient_accumulation_steps)


def compute_group_normalized_rewards(
    reward_fn: Callable[[str, str], Mapping[str, float]],
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """CS336 ``compute_group_normalized_rewards``: score each response with `reward_fn`, then the GRPO
    learner's `group_normalize` and `reward_metadata`. Returns (advantages (N,), raw rewards (N,), metadata)."""
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError(
            f"got {len(rollout_responses)} responses but {len(repeated_ground_truths)} ground truths"
        )
    if len(rollout_responses) % group_size != 0:
        raise ValueError(
            f"number of responses {len(rollout_responses)} is not divisible by group_size {group_size}"
        )
    scores = [reward_fn(resp, gt) for resp, gt in zip(rollout_responses, repeated_ground_truths, strict=True)]
    raw_rewards = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)  # (N,)
    advantages = group_normalize(raw_rewards, group_size, advantage_eps, normalize_by_std)  # (N,)
    return advantages, raw_rewards, reward_metadata(scores, raw_rewards, group_size)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """CS336 ``compute_entropy``: entropy of the next-token distribution at each position, ``−Σ_v p_v log p_v``.

    Computed on max-shifted logits ``z' = z − max_v z_v``: ``log p = z' − logsumexp(z')``. The shift keeps
    ``log p`` accurate for logits of magnitude 1e4 (``logsumexp(z)`` would round to float32 spacing there,
    ~1e-3), and ``−inf`` logits contribute 0 instead of ``0 · (−inf)``. logits: (..., vocab) → (...) in
    float32 (float64 for float64 input).
    """
    z = logits if logits.dtype == torch.float64 else logits.float()  # (..., vocab)
    shifted = z - z.amax(dim=-1, keepdim=True).detach()  # the max cancels in the value: no gradient
    log_p = (shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)).clamp(min=torch.finfo(z.dtype).min)
    return -(log_p.exp() * log_p).sum(dim=-1)  # (...)
