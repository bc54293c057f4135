"""Supervised fine-tuning learner (``mode: sft``): reasoning SFT (CS336 assignment 5 §4) and packed
instruction tuning (assignment 5 supplement); its step `sft_update` is expert iteration's too.

1. Data (`trainer.data.sft`): reasoning pairs at ``data.sft_path`` (prompt already formatted; loss on the
   response tokens), a seeded ``sft.validation_fraction`` held out first; on the training part
   an empty response (no target token) is skipped (``data/sft_empty_responses``), ``sft.filter_correct``
   keeps the responses the reward grades correct and ``sft.max_examples`` a seeded subset. Or, with
   ``sft.packed``, Alpaca blocks of ``sft.seq_length`` tokens, every token a target.
2. Optimizer batches of ``sft.batch_size`` (seeded shuffle per epoch; the last may be short) in
   ``sft.gradient_accumulation_steps`` micro-batches; loss: token-mean NLL over the whole optimizer batch
   (all micro-batches and ranks: `aggregate_loss` ``"token"``), so the split does not change the gradient.
3. Clip (``optim.max_grad_norm``), the configured optimizer and schedule (`Learner.step`).
4. Before training, every ``eval.every`` steps and at the end: held-out loss (``eval/loss``: each rank
   evaluates its share of the held-out micro-batches, the token sums are added over the ranks) and, with
   ``sft.eval_generation``, generation accuracy (`Session.evaluate`, after a weight sync). Length:
   ``sft.max_steps`` or ``sft.num_epochs`` epochs; resume skips the batches seen (order = f(seed, epoch)).
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Sequence

import torch

from trainer.config import RunConfig
from trainer.data.batching import TokenBatch
from trainer.data.jsonl import DatasetFormatError
from trainer.data.sampler import split_heldout
from trainer.data.sft import GOLD_KEYS, SFTData, SFTExample, packed_data, pair_data, read_sft_examples
from trainer.learner import Learner, global_token_count, heldout_share, sum_over_ranks
from trainer.learners.loop import Mode, StepResult, run
from trainer.logprobs import forward_log_probs, real_lengths
from trainer.losses import sft_loss
from trainer.session import Session

logger = logging.getLogger("reasonrl")


# ---- data ---------------------------------------------------------------------------------------
def filter_correct(s: Session, examples: list[SFTExample]) -> list[SFTExample]:
    """The examples whose response the reward function grades correct against their gold."""
    missing = [ex.where for ex in examples if ex.gold is None]
    if missing:
        raise DatasetFormatError(
            f"{missing[0]}: sft.filter_correct needs a gold {' / '.join(GOLD_KEYS)} field on every line "
            f"({len(missing)} line(s) lack one)"
        )
    scores = s.scorer.score([ex.response for ex in examples], [str(ex.gold) for ex in examples])
    return [ex for ex, sc in zip(examples, scores, strict=True) if sc.answer_reward > 0]


def drop_empty_responses(s: Session, examples: list[SFTExample]) -> list[SFTExample]:
    """The examples with a response. An empty one has no target token: it adds nothing to the token-mean
    NLL, and an optimizer batch of only such examples would have no token to average over. The count is
    logged (``data/sft_empty_responses``) with a warning naming the first few lines."""
    kept = [ex for ex in examples if ex.response]
    empty = [ex.where for ex in examples if not ex.response]
    if empty:
        logger.warning("skipping %d training example(s) with an empty 'response' (%s%s)", len(empty),
                       ", ".join(empty[:3]), ", ..." * (len(empty) > 3))
        s.tracker.log({"data/sft_empty_responses": float(len(empty))}, int(s.trainer_state["step"]))
    return kept


def load_sft_data(s: Session) -> SFTData:
    """Reasoning pairs or packed blocks as configured (module docstring, item 1)."""
    cfg, sft = s.cfg, s.cfg.sft
    if not cfg.data.sft_path:
        raise FileNotFoundError('mode \'sft\' needs data.sft_path (JSONL of {"prompt", "response"})')
    rank, world = s.accelerator.process_index, s.accelerator.num_processes
    examples = read_sft_examples(cfg.data.sft_path)
    if sft.packed:
        if sft.filter_correct:
            raise ValueError("sft.filter_correct needs graded reasoning pairs; set sft.packed: false")
        return packed_data(s.learner.tokenizer, cfg.data.sft_path, sft, cfg.seed, rank, world)
    train_idx, held_idx = split_heldout(len(examples), sft.validation_fraction, cfg.seed)
    train, held = drop_empty_responses(s, [examples[i] for i in train_idx]), [examples[i] for i in held_idx]
    if sft.filter_correct:
        kept = filter_correct(s, train)
        s.tracker.log({"data/sft_examples_before_filter": float(len(train)),
                       "data/sft_examples_correct": float(len(kept))}, int(s.trainer_state["step"]))
        train = kept
    if sft.max_examples is not None and len(train) > sft.max_examples:
        train = random.Random(cfg.seed + 1).sample(train, sft.max_examples)
    if not train:
        raise ValueError(f"{cfg.data.sft_path}: no training examples left after the held-out split / filter")
    return pair_data(s.learner.tokenizer, train, held, sft, cfg.seed, rank, world)


# ---- the SFT step (shared with expert iteration) ------------------------------------------------
def sft_update(learner: Learner, micro_batches: Sequence[TokenBatch]) -> dict[str, float]:
    """One optimizer step of response-only SFT over this rank's micro-batches (module docstring, items 2-3).

    Loss of a micro-batch: ``W · Σ_{i,t} m_it (−log π_θ(y_it)) / N`` with ``N`` the response tokens of the
    whole optimizer batch over all ranks (`sft_loss` ``"token"``); the micro-batch losses sum to the
    token-mean NLL of the optimizer batch. Returns ``train/loss`` (this rank's share of that mean, times
    ``W``: on one process the mean, and the ranks' average is the mean of the whole batch),
    ``train/grad_norm`` (before clipping), ``train/lr``, ``train/response_tokens``.
    """
    world = learner.accelerator.num_processes
    tokens = global_token_count(learner, torch.stack([mb.response_mask.sum() for mb in micro_batches]).sum())
    loss_sum = 0.0
    for i, mb in enumerate(micro_batches):
        with learner.accumulate(is_last_micro_batch=i == len(micro_batches) - 1):
            log_probs = learner.log_probs(mb)["log_probs"]  # (b, s)
            loss = sft_loss(
                log_probs, mb.response_mask.to(learner.device), "token", global_token_count=tokens, world_size=world
            )
            learner.backward(loss)
            loss_sum += float(loss.detach())
    return {
        "train/loss": loss_sum,
        "train/grad_norm": learner.step(),
        "train/lr": float(learner.scheduler.get_last_lr()[0]),
        "train/response_tokens": tokens,
    }


@torch.inference_mode()
def heldout_sums(model: torch.nn.Module, micro_batches: Sequence[TokenBatch],
                 device: torch.device) -> tuple[float, float]:
    """``(Σ m·(−log p), Σ m)`` over the response tokens of `micro_batches`, added up batch by batch."""
    total, count = 0.0, 0.0
    for mb in micro_batches:
        mb = mb.to(device)
        lp = forward_log_probs(model, mb, response_only=True)["log_probs"]  # (b, s)
        mask = mb.response_mask.to(lp.dtype)
        total += float(-(lp * mask).sum())
        count += float(mask.sum())
    return total, count


def heldout_loss(model: torch.nn.Module, micro_batches: Sequence[TokenBatch], device: torch.device) -> float:
    """Token-mean NLL of the response tokens of `micro_batches`: ``Σ m·(−log p) / Σ m``."""
    total, count = heldout_sums(model, micro_batches, device)
    return total / count if count else math.nan


def global_heldout_loss(learner: Learner, micro_batches: Sequence[TokenBatch]) -> float:
    """`heldout_loss` of all of `micro_batches` (the same list on every rank), each rank evaluating only its
    share (`heldout_share`: batches ``rank::world``, stand-in forwards so that every rank runs as many) and
    the ranks' sums added up before dividing: the same value on every rank. Every rank must call it; on
    one process exactly `heldout_loss`."""
    total, count = 0.0, 0.0
    for i, stand_in in heldout_share(learner, len(micro_batches)):
        t, c = heldout_sums(learner.model, [micro_batches[i]], learner.device)
        if not stand_in:
            total, count = total + t, count + c
    total, count = sum_over_ranks(learner, torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / count if count else math.nan


def evaluate_sft(s: Session, data: SFTData, step: int) -> dict[str, float]:
    """Held-out loss and, with ``sft.eval_generation``, held-out generation metrics (module docstring, item 4)."""
    metrics: dict[str, float] = {}
    if data.heldout:
        with s.timer("eval"):
            metrics["eval/loss"] = global_heldout_loss(s.learner, data.heldout)
        s.tracker.log(metrics, step)
    if s.cfg.sft.eval_generation:
        s.sync_weights()
        metrics |= s.evaluate(step)
    return metrics


# ---- the mode ------------------------------------------------------------------------------------
def sft_step(s: Session, micro_batches: Sequence[TokenBatch], step: int, steps_per_epoch: int) -> StepResult:
    """One optimizer step, with the learner's throughput on the real (not stand-in) rows."""
    with s.timer("train"):
        metrics = sft_update(s.learner, micro_batches)
    useful = [mb for mb in micro_batches if mb.response_mask.any()]  # not zero-weight stand-ins
    metrics |= s.learner_throughput([n for mb in useful for n in real_lengths(mb).tolist()])
    metrics["train/epoch"] = (step - 1) // steps_per_epoch
    return metrics, ()


def train_sft(cfg: RunConfig, resume: bool = False) -> dict[str, float]:
    """Run SFT as configured; returns the final held-out metrics (``eval/loss``, ``eval/accuracy`` …)."""
    with Session(cfg, resume) as s:
        data = load_sft_data(s)
        start = int(s.trainer_state["step"])
        s.tracker.log({"data/sft_train_examples": float(data.n_train)}, start)
        batches = data.stream(start)
        return run(s, Mode(
            name="sft", total_steps=cfg.sft.max_steps or cfg.sft.num_epochs * data.steps_per_epoch,
            step=lambda step: sft_step(s, next(batches), step, data.steps_per_epoch),
            evaluate=functools.partial(evaluate_sft, s, data), postfix=lambda m: {"loss": f"{m['train/loss']:.3f}"},
        ))
