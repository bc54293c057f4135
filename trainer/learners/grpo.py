"""GRPO learner (Shao et al. 2024, "DeepSeekMath", §4.1) as specified by CS336 assignment 5. Per step:

1. sample ``rollout_batch_size / group_size`` questions, ``group_size`` samples each; 2. rewards [+ DAPO
   overlong shaping, ``overlong_buffer``: `trainer.overlong`], and group-normalised advantages
   ``A = (r − mean_g) / (std_g + eps)`` (unbiased std; ``std_normalization_scope: batch``: the std of the whole
   rollout batch's rewards instead, REINFORCE++ / ScaleRL), or ``r − mean_g`` with ``use_std_normalization:
   false`` (Dr. GRPO); optional DAPO dynamic sampling drops zero-std groups and refills from new questions;
   3. old log-probs, once, only when off-policy (``epochs_per_rollout_batch > 1`` or ``train_batch_size <
   rollout_batch_size``); on-policy the ratio is 1;
4. ``epochs_per_rollout_batch`` epochs of optimizer batches of ``train_batch_size`` in
   ``gradient_accumulation_steps`` micro-batches; per-token loss = policy-gradient loss (`loss_type`)
   [× truncated importance weight min(π_learner/π_rollout, ``tis_cap``)] [+ ``kl_coef`` · k3 KL to the
   frozen initial policy] [− ``entropy_coef`` · entropy], aggregated by `aggregate_loss` [over responses
   that were not cut off, ``mask_truncated``: DAPO overlong filtering]; 5. clip (1.0),
   AdamW; 6. weight sync, checked by the stale-weight probe; 7. logging.

Log-probs and entropies use softmax(logits / ``rollout.temperature``), the sampling distribution. No KL by
default (CS336, Dr. GRPO). Data parallel: every rank draws the same questions, takes its own whole groups.

Asynchronous (``grpo.max_staleness = k ≥ 1``; `trainer.learners.async_rollouts`): step u's batch is sampled
by the engine μ holding the weights after step u−1−k while the learner trains. Objective: decoupled PPO
(Fu et al. 2025, AReaL, arXiv 2505.24298, Eq. 5), per token  −w_t · min(u_t A, clip(u_t, 1−ε, 1+ε_high) A),
u_t = π_θ/π_prox, w_t = π_prox/μ [min(w_t, ``tis_cap``): truncated IS, Yao et al. 2025], π_prox = the
learner's policy at train time (the old log-probs above; π_θ itself, detached, on-policy), μ = the engine's
sampling log-probs (`Sample.logprobs`); other loss types: their per-token loss × w_t. Chosen over clipping
u = π_θ/μ: the trust region stays one update wide around the current policy whatever the lag, and w_t
corrects the staleness (and engine/learner numerics) exactly; it is the synchronous path × the TIS weight.
With several learner ranks rank 0 samples each whole batch as one process would and every rank trains on its
whole groups of it (`share_batch`, `rank_share`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from rollout.engines.protocol import Sample, rollout_metrics
from rollout.reward import RewardResult
from trainer.advantages import group_normalize
from trainer.batch_stats import (
    divide_by_batch_std,
    global_max,
    global_mean,
    global_reward_metrics,
    global_std,
)
from trainer.config import GRPOConfig, RunConfig
from trainer.data.batching import TokenBatch, micro_batch_slices, pack_token_ids, pad_float_rows
from trainer.data.prompts import format_prompt
from trainer.data.sampler import QuestionSampler
from trainer.data.tasks import Example
from trainer.evaluate import sampling_config
from trainer.learner import Learner, global_token_count, load_frozen_reference
from trainer.learners.async_ranks import ONE_PROCESS, evaluate_everywhere, rank_share, share_batch
from trainer.learners.async_rollouts import (
    ProbeExpectation,
    ProducedBatch,
    RolloutProducer,
    RolloutSide,
    WeightSnapshot,
    probe_check,
    restore_pending,
)
from trainer.learners.loop import Mode, StepResult, run
from trainer.learners.warmstart import refuse_under_deepspeed, start_rollouts
from trainer.logprobs import forward_log_probs, length_sorted_order, real_lengths
from trainer.lora import weight_stream
from trainer.losses import aggregate_loss, compute_policy_gradient_loss, k3_kl, masked_mean
from trainer.overlong import mask_truncated, shape_overlong
from trainer.rollout_table import log_rollout_table
from trainer.session import Session
from trainer.sync import StaleWeightProbe, make_probe
from trainer.timing import PhaseTimer

Rollouts = Session | RolloutSide  # what sample-and-score uses: a session, or the producer thread's view

@dataclass
class RolloutBatch:
    """This rank's share of one step's rollouts, as learner tensors (all row-aligned)."""

    tokens: TokenBatch
    raw_rewards: torch.Tensor  # (b,)
    advantages: torch.Tensor  # (b,)
    rollout_log_probs: torch.Tensor  # (b, s) log-probs under the sampling engine (0 off the response)
    old_log_probs: torch.Tensor | None = None  # (b, s), off-policy only


# ---- phase 1-2: sample and score -----------------------------------------------------------------
Groups = tuple[list[Sample], torch.Tensor, list[RewardResult]]  # samples, rewards (N,), scores


def sample_and_score(s: Rollouts, sampler: QuestionSampler[Example], step: int) -> tuple[list[Sample], torch.Tensor,
                                                                                       torch.Tensor, dict[str, float]]:
    """Generate this rank's groups, score them and compute advantages.

    With DAPO dynamic sampling, zero-std groups are dropped and refilled from fresh questions for up to
    ``max_refill_rounds`` rounds; every rank draws the same number of questions each round (so samplers
    stay in step) and any still-missing groups are filled back with dropped ones, keeping batch shapes
    fixed. Reward and rollout statistics cover every group generated in the step, dropped ones included:
    the policy's reward, not the filtered batch's. On the producer thread a round starts only while the
    producer is not closing (`RolloutSide.stop_if_asked`).
    """
    g = s.cfg.grpo
    n_questions = g.rollout_batch_size // g.group_size // s.accelerator.num_processes
    empty: Groups = ([], torch.zeros(0), [])
    kept, dropped, generated = empty, empty, empty
    for round_ in range(1 + (g.max_refill_rounds if g.dynamic_sampling else 0)):
        if isinstance(s, RolloutSide):
            s.stop_if_asked()
        missing = n_questions - len(kept[0]) // g.group_size
        most_missing = global_max(s.accelerator, missing)
        if most_missing == 0:
            break
        new = _sample_groups(s, sampler, most_missing, missing, step, round_)
        generated = _concat(generated, new)
        if g.dynamic_sampling:
            keep = _nonzero_std_groups(new[1], g.group_size)
            dropped, new = _concat(dropped, _select(new, ~keep)), _select(new, keep)
        kept = _concat(kept, new)
    missing_rows = n_questions * g.group_size - len(kept[0])
    samples, rewards, _ = _concat(kept, _select(dropped, torch.arange(len(dropped[0])) < missing_rows))
    by_group = g.use_std_normalization and g.std_normalization_scope == "group"
    advantages = group_normalize(rewards, g.group_size, g.advantage_eps, by_group)
    if g.use_std_normalization and not by_group:
        advantages = divide_by_batch_std(advantages, global_std(s.accelerator, rewards), g.advantage_eps)
    metrics = global_reward_metrics(s.accelerator, generated[2], g.group_size)
    if g.overlong_buffer:
        penalties = [x.extra["overlong_penalty"] for x in generated[0]]
        metrics["reward/overlong_penalty_mean"] = global_mean(s.accelerator, penalties)
    metrics |= rollout_metrics(generated[0], s.timer.seconds["generate"])
    if g.dynamic_sampling:
        metrics["rollout/dropped_zero_std_groups"] = float(len(dropped[0]) // g.group_size)
    return samples, rewards, advantages, metrics


def _sample_groups(s: Rollouts, sampler: QuestionSampler[Example], per_rank: int, n_needed: int, step: int,
                   round_: int) -> Groups:
    """Every rank draws ``per_rank × world`` questions; this rank generates for ``n_needed`` of its slice."""
    g = s.cfg.grpo
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    questions = sampler.draw(per_rank * world)[rank * per_rank : rank * per_rank + n_needed]
    if not questions:
        return [], torch.zeros(0), []
    prompts = [format_prompt(s.cfg.data.prompt_template, question=q.question) for q in questions]
    seed = s.cfg.seed + 1_000 * step + 100 * round_ + rank
    with s.timer("generate"):
        samples = s.engine.generate(prompts, sampling_config(s.cfg.rollout, seed, g.group_size))
    golds = [q.answer for q in questions for _ in range(g.group_size)]
    with s.timer("score"):
        scores = s.scorer.score([x.text for x in samples], golds)
    if g.overlong_buffer:
        scores = shape_overlong(samples, scores, s.cfg.rollout.max_tokens, g.overlong_buffer, g.overlong_penalty)
    for x, sc in zip(samples, scores, strict=True):
        x.extra |= sc.as_dict()  # the reward parts travel with the sample (`trainer.rollout_table`)
    return samples, torch.tensor([sc.reward for sc in scores], dtype=torch.float32), scores


def _nonzero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    grouped = rewards.view(-1, group_size)  # (n_groups, G)
    return (grouped.max(-1).values > grouped.min(-1).values).repeat_interleave(group_size)  # (N,)


def _select(groups: Groups, keep: torch.Tensor) -> Groups:
    idx = keep.nonzero().flatten().tolist()
    return [groups[0][i] for i in idx], groups[1][keep], [groups[2][i] for i in idx]


def _concat(a: Groups, b: Groups) -> Groups:
    return a[0] + b[0], torch.cat([a[1], b[1]]), a[2] + b[2]


def to_batch(samples: list[Sample], rewards: torch.Tensor, advantages: torch.Tensor, pad_id: int,
             truncated_add_no_loss: bool = False) -> RolloutBatch:
    """The learner's tensors of `samples`; with `truncated_add_no_loss` (``grpo.mask_truncated``) the rows
    that hit the length limit have an empty response mask (`mask_truncated`)."""
    tokens = pack_token_ids([x.prompt_ids for x in samples], [x.response_ids for x in samples], pad_id)
    if truncated_add_no_loss:
        mask_truncated(tokens, samples)
    rollout_lp = pad_float_rows([x.logprobs for x in samples], [len(x.prompt_ids) - 1 for x in samples],
                                tokens.labels.shape[1])
    return RolloutBatch(tokens, rewards, advantages, rollout_lp)


# ---- phase 3: old log-probs ----------------------------------------------------------------------
def is_off_policy(g: GRPOConfig) -> bool:
    return g.epochs_per_rollout_batch > 1 or g.train_batch_size < g.rollout_batch_size


@torch.inference_mode()
def compute_old_log_probs(learner: Learner, tokens: TokenBatch, micro_batch_size: int,
                          temperature: float = 1.0) -> torch.Tensor:
    """log π_old(o_t) for every row (0 on padding), computed once per rollout batch; (b, s) on CPU.

    Rows are taken longest first, so each micro-batch holds sequences of similar length."""
    out = torch.zeros(tokens.labels.shape, dtype=torch.float32)  # (b, s)
    order = length_sorted_order(tokens, torch.arange(len(tokens)))
    for sl in micro_batch_slices(len(tokens), micro_batch_size):
        out[order[sl]] = learner.log_probs(tokens.select(order[sl]), temperature=temperature)["log_probs"].float().cpu()
    return out


# ---- phase 4-5: update --------------------------------------------------------------------------
def update_policy(learner: Learner, cfg: RunConfig, batch: RolloutBatch,
                  ref_model: torch.nn.Module | None = None) -> dict[str, float]:
    """``epochs_per_rollout_batch`` passes of optimizer steps over this rank's rollout batch."""
    g, world = cfg.grpo, learner.accelerator.num_processes
    opt_bs, micro_bs = g.train_batch_size // world, g.train_batch_size // g.gradient_accumulation_steps // world
    totals: dict[str, list[float]] = {}
    for _epoch in range(g.epochs_per_rollout_batch):
        for opt_slice in micro_batch_slices(len(batch.tokens), opt_bs):
            metrics = optimizer_step(learner, cfg, batch, opt_slice, micro_bs, ref_model)
            for k, v in metrics.items():
                totals.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in totals.items()}


def optimizer_step(learner: Learner, cfg: RunConfig, batch: RolloutBatch, opt_slice: slice, micro_bs: int,
                   ref_model: torch.nn.Module | None) -> dict[str, float]:
    """One optimizer step over rows `opt_slice`, accumulated over micro-batches of `micro_bs` rows."""
    rows = torch.arange(len(batch.tokens))[opt_slice]
    if cfg.grpo.sort_by_length:
        rows = length_sorted_order(batch.tokens, rows)
    # at least 1: with grpo.mask_truncated a batch can hold no response token (its loss is 0 in every mode)
    token_count = max(global_token_count(learner, batch.tokens.response_mask[opt_slice]), 1.0)
    sums: dict[str, float] = {}
    micro = micro_batch_slices(len(rows), micro_bs)
    for i, sl in enumerate(micro):
        index = rows[sl]
        with learner.accumulate(is_last_micro_batch=i == len(micro) - 1):
            for k, v in micro_step(learner, cfg, batch, index, token_count, ref_model).items():
                sums[k] = sums.get(k, 0.0) + v / len(micro)
    sums["train/grad_norm"] = learner.step()
    sums["train/lr"] = float(learner.scheduler.get_last_lr()[0])
    return sums


def micro_step(learner: Learner, cfg: RunConfig, batch: RolloutBatch, index: torch.Tensor, global_tokens: float,
               ref_model: torch.nn.Module | None) -> dict[str, float]:
    """Forward, per-token loss (PG [× TIS] [+ KL] [− entropy]), aggregate, backward; returns metrics."""
    g, device = cfg.grpo, learner.device
    mb = batch.tokens.select(index).to(device)
    mask = mb.response_mask
    out = learner.log_probs(mb, return_token_entropy=True, temperature=cfg.rollout.temperature)
    log_probs, entropy = out["log_probs"], out["token_entropy"]  # (b, s) each
    old = batch.old_log_probs[index].to(device) if batch.old_log_probs is not None else log_probs.detach()
    per_token, meta = compute_policy_gradient_loss(
        log_probs, g.loss_type, raw_rewards=batch.raw_rewards[index, None].to(device),
        advantages=batch.advantages[index, None].to(device), old_log_probs=old, cliprange=g.cliprange,
        cliprange_low=g.cliprange, cliprange_high=g.cliprange_high or g.cliprange, response_mask=mask,
    )
    rollout_lp = batch.rollout_log_probs[index].to(device)
    # engine vs learner: synchronous, at the sampling weights (numerics only); asynchronous, `old` is the current
    # (proximal) policy, so train/mismatch_kl_* measures the policy lag plus the numerics
    metrics = mismatch_metrics(old, rollout_lp, mask)
    if g.tis_cap is not None or g.max_staleness:
        per_token = per_token * behaviour_weight(old, rollout_lp, g.tis_cap)
    if ref_model is not None and g.kl_coef > 0:
        kl = k3_kl(log_probs, _ref_log_probs(ref_model, mb, cfg.model.packing, cfg.rollout.temperature))
        per_token = per_token + g.kl_coef * kl
        metrics["train/kl"] = float(masked_mean(kl.detach(), mask, empty_is_zero=True))
    if g.entropy_coef > 0:
        per_token = per_token - g.entropy_coef * entropy
    loss = aggregate_loss(per_token, mask, g.length_normalization,
                          gradient_accumulation_steps=g.gradient_accumulation_steps,
                          normalize_constant=float(cfg.rollout.max_tokens), global_token_count=global_tokens,
                          world_size=learner.accelerator.num_processes)
    learner.backward(loss)
    metrics["train/loss"] = float(loss.detach()) * g.gradient_accumulation_steps
    metrics["train/entropy"] = float(masked_mean(entropy.detach(), mask, empty_is_zero=True))
    if "clipped" in meta:
        metrics["train/clip_fraction"] = float(masked_mean(meta["clipped"].float(), mask, empty_is_zero=True))
    return metrics


def behaviour_weight(prox_log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor,
                     cap: float | None) -> torch.Tensor:
    """w = π_prox/μ = exp(log π_prox − log μ), truncated at `cap` (None: untruncated), detached; (b, s)."""
    weight = torch.exp(prox_log_probs - behaviour_log_probs)
    return (weight if cap is None else weight.clamp(max=cap)).detach()


def mismatch_metrics(learner_lp: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Rollout-vs-learner log-prob mismatch: k1 and k3 KL(π_rollout‖π_learner) estimates on sampled tokens."""
    r = learner_lp - rollout_lp
    return {"train/mismatch_kl_k1": float(masked_mean(-r, mask, empty_is_zero=True)),
            "train/mismatch_kl_k3": float(masked_mean(k3_kl(rollout_lp, learner_lp), mask, empty_is_zero=True))}


@torch.no_grad()
def _ref_log_probs(ref_model: torch.nn.Module, mb: TokenBatch, packed: bool, temperature: float = 1.0) -> torch.Tensor:
    return forward_log_probs(ref_model, mb, packed=packed, temperature=temperature, response_only=True)["log_probs"]


# ---- the loop -----------------------------------------------------------------------------------
def policy_lag(s: Session, samples: list[Sample]) -> dict[str, float]:
    """Policy versions between the engine now and the oldest sample trained on."""
    return {"rollout/policy_lag": float(s.engine.policy_version - min(x.policy_version for x in samples))}


def grading_health(s: Rollouts) -> dict[str, float]:
    """The reward pool's own counters: timeouts, errors, worker restarts, grading latency p50/p99."""
    return {k: v for k, v in s.scorer.metrics().items()
            if k.endswith(("timeouts", "errors", "worker_restarts", "_ms"))}


def grpo_step(s: Session, sampler: QuestionSampler[Example], step: int,
              ref_model: torch.nn.Module | None) -> StepResult:
    """One GRPO step: sample → score → old log-probs → update → sync → log. Returns this rank's metrics
    and the keys among them that are global already (the reward statistics of every rank's rollouts)."""
    samples, rewards, advantages, metrics = sample_and_score(s, sampler, step)
    s.rollouts_done()
    log_rollout_table(s, step, samples, rewards, advantages)
    already_global = [k for k in metrics if k.startswith("reward/")]
    metrics |= policy_lag(s, samples) | grading_health(s)
    batch = to_batch(samples, rewards, advantages, s.learner.tokenizer.pad_token_id, s.cfg.grpo.mask_truncated)
    metrics |= learn(s, batch, ref_model)
    metrics |= s.sync_weights()
    return metrics, already_global


def learn(s: Session, batch: RolloutBatch, ref_model: torch.nn.Module | None) -> dict[str, float]:
    """Old log-probs (off-policy only), the update, and the learner's throughput over it."""
    g = s.cfg.grpo
    if is_off_policy(g):
        with s.timer("old_log_probs"):
            micro = g.train_batch_size // g.gradient_accumulation_steps // s.accelerator.num_processes
            batch.old_log_probs = compute_old_log_probs(s.learner, batch.tokens, micro, s.cfg.rollout.temperature)
    with s.timer("train"):
        metrics = update_policy(s.learner, s.cfg, batch, ref_model)
    return metrics | s.learner_throughput(real_lengths(batch.tokens).tolist(), passes=g.epochs_per_rollout_batch)


def async_grpo_step(s: Session, producer: RolloutProducer | None, probe: StaleWeightProbe, step: int,
                    ref_model: torch.nn.Module | None) -> StepResult:
    """One asynchronous step: take the producer's batch (waiting: ``time/wait_rollouts``; with several ranks,
    rank 0's, shared, and this rank's slice of it) → old log-probs → update → hand the new weights to the
    producer (``time/sync``: the CPU snapshot; every rank takes part, rank 0 hands it over) → log."""
    with s.timer("wait_rollouts"):
        produced = share_batch(s.accelerator, producer, step)
    version = int(s.trainer_state["policy_version"])  # the learner's weights: those after step - 1
    metrics = dict(produced.metrics) | staleness(version, produced.samples, s.cfg.grpo.max_staleness)
    already_global = list(metrics)  # of the whole batch, the same on every rank
    mine = rank_share(produced, s.accelerator.process_index, s.accelerator.num_processes)
    log_rollout_table(s, step, mine.samples, mine.rewards, mine.advantages)
    batch = to_batch(mine.samples, mine.rewards, mine.advantages, s.learner.tokenizer.pad_token_id,
                     s.cfg.grpo.mask_truncated)
    metrics |= learn(s, batch, ref_model)
    with s.timer("sync"):
        hand_over(s, producer, probe, version + 1, step)
    s.trainer_state["policy_version"] = version + 1
    return metrics, already_global


def hand_over(s: Session, producer: RolloutProducer | None, probe: StaleWeightProbe, version: int, step: int) -> None:
    """The weights after `step` as a `WeightSnapshot` for rank 0's producer. Every rank runs the probe's forward
    and reads the weight stream (under ZeRO-3 both gather collectively); the other ranks keep no copy."""
    model = s.learner.unwrapped
    expected = ProbeExpectation.of(probe, s.engine, model)  # reads the engine's limits only
    if producer is not None:
        producer.hand_weights(WeightSnapshot(model, s.cfg.rollout.sync_bucket_mb, version, step, expected))
        return
    for _ in weight_stream(model, s.cfg.rollout.sync_bucket_mb, None):  # in step with rank 0's gathers
        pass


def staleness(learner_version: int, samples: list[Sample], max_staleness: int) -> dict[str, float]:
    """Versions between the learner's weights and the rollouts': ``rollout/policy_lag`` (the oldest token's),
    ``rollout/policy_lag_mean`` (over samples, each by its first token) and ``rollout/policy_lag_token_mean``
    (over response tokens; lower than the sample mean where weights were taken in flight), and
    ``rollout/mixed_version_fraction`` (samples drawn by more than one version). A token more than
    `max_staleness` behind, or ahead of the learner, is a bug in the producer's schedule, never trained on."""
    token_lags = [learner_version - v for x in samples for v in x.token_versions()]
    lags = [learner_version - x.policy_version for x in samples]
    low, high = min(lags + token_lags), max(lags + token_lags)
    if high > max_staleness or low < 0:
        raise RuntimeError(f"rollouts {low}..{high} versions behind the learner (version "
                           f"{learner_version}); grpo.max_staleness={max_staleness}")
    return {"rollout/policy_lag": float(high), "rollout/policy_lag_mean": sum(lags) / len(lags),
            "rollout/policy_lag_token_mean": sum(token_lags) / max(1, len(token_lags)),
            "rollout/mixed_version_fraction": sum(len(x.version_spans) > 1 for x in samples) / len(samples)}


def train_grpo(cfg: RunConfig, resume: bool = False) -> dict[str, float]:
    """Run GRPO as configured; returns the final evaluation metrics. On resume the asynchronous checkpoint's
    pending batches go through `restore_pending` in either loop: served where this run's
    ``grpo.max_staleness`` allows them, else dropped with the sampler back before them."""
    with Session(cfg, resume, before_load=functools.partial(refuse_under_deepspeed, cfg.warmstart.steps)) as s:
        sampler = start_rollouts(s)
        pending = restore_pending(s.trainer_state, sampler, cfg.grpo.max_staleness, cfg.grpo.n_grpo_steps)
        ref_model = _reference_model(s) if cfg.grpo.kl_coef > 0 else None
        if cfg.grpo.max_staleness:
            return _train_async(s, sampler, ref_model, pending)
        return run(s, Mode(
            name="grpo", total_steps=cfg.grpo.n_grpo_steps, step=lambda step: grpo_step(s, sampler, step, ref_model),
            evaluate=s.evaluate, postfix=_postfix, checkpoint_state=lambda: {"sampler": sampler.state_dict()},
        ))


def _postfix(m: dict[str, float]) -> dict[str, str]:
    return {"reward": f"{m['reward/reward_mean']:.3f}", "loss": f"{m['train/loss']:.3f}"}


def _train_async(s: Session, sampler: QuestionSampler[Example], ref_model: torch.nn.Module | None,
                 pending: list[ProducedBatch]) -> dict[str, float]:
    """The loop with a `RolloutProducer` generating ahead on rank 0 (first serving the checkpoint's `pending`
    batches); evaluation runs on its thread (the engine's), and on the other ranks' learner threads."""
    total, start = s.cfg.grpo.n_grpo_steps, int(s.trainer_state["step"])
    probe = make_probe(s.cfg, s.learner)
    producer = None
    if s.accelerator.process_index == 0:
        side = RolloutSide(s.cfg, ONE_PROCESS, s.engine, s.scorer, PhaseTimer())
        producer = RolloutProducer(side, sampler, _sample_for_producer, probe_check(probe), start=start,
                                   total=total, max_staleness=s.cfg.grpo.max_staleness, pending=pending,
                                   inflight=s.cfg.grpo.inflight_weight_updates)
    taken = [start]

    def step(n: int) -> StepResult:
        taken[0] = n
        return async_grpo_step(s, producer, probe, n, ref_model)

    def checkpoint_state() -> dict[str, Any]:  # called after every step; only saved steps need the batches
        n, every = taken[0], s.cfg.checkpoint.save_every
        due = n == total or (every and n % every == 0)
        return producer.checkpoint_state(n) if due and producer is not None else {}

    def evaluate(n: int) -> dict[str, float]:
        return evaluate_everywhere(s.accelerator, producer, lambda: s.evaluate(n))

    try:
        return run(s, Mode(name="grpo", total_steps=total, step=step, evaluate=evaluate, postfix=_postfix,
                           checkpoint_state=checkpoint_state))
    finally:
        if producer is not None:
            producer.close()


def _sample_for_producer(side: RolloutSide, sampler: QuestionSampler[Example],
                         step: int) -> tuple[list[Sample], torch.Tensor, torch.Tensor, dict[str, float]]:
    samples, rewards, advantages, metrics = sample_and_score(side, sampler, step)
    return samples, rewards, advantages, metrics | grading_health(side)


def _reference_model(s: Session) -> torch.nn.Module:
    """The frozen initial policy (after the warm start, if any) for the KL penalty."""
    model_cfg = s.cfg.model
    if s.cfg.warmstart.steps:
        model_cfg = model_cfg.model_copy(update={"path": str(s.run_dir / "warmstart")})
    return load_frozen_reference(model_cfg, s.learner.device, s.accelerator)
