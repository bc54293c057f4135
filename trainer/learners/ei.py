"""Expert iteration (``mode: ei``): STaR-style rejection-sampling fine-tuning (Zelikman et al. 2022;
CS336 assignment 5 §5). For each of ``ei.n_ei_steps`` steps:

1. draw ``ei.questions_per_step`` training questions (`QuestionSampler`), formatted with
   ``data.prompt_template``; 2. sample ``ei.group_size`` responses each (``rollout.*`` sampling);
3. keep the responses whose answer reward is 1 (duplicates kept; ``ei/kept``);
4. ``ei.ei_epochs`` epochs of the SFT step (`trainer.learners.sft.sft_update`: response-only token-mean
   NLL, optimizer batches of ``ei.batch_size`` in ``ei.gradient_accumulation_steps`` micro-batches) on the
   kept samples, from the current policy (CS336), not the base model as in STaR; no correct sample, no
   update; 5. weight sync; 6. log ``ei/kept``, ``ei/kept_fraction``, ``ei/questions_solved`` and the mean
   over all sampled responses of each one's mean token entropy (``ei/response_entropy``).

An optional warm start (`trainer.learners.warmstart`) runs before step 1. Data parallel: every rank draws
the same questions and samples its share; the kept samples are gathered, and every rank trains on its rows
of them (`deal_micro_batches`: zero-weight stand-ins keep the ranks' passes equal).
"""

from __future__ import annotations

import functools

from rollout.engines.protocol import Sample, rollout_metrics
from trainer.config import RunConfig
from trainer.data.batching import deal_micro_batches, pack_micro_batches, pack_token_ids
from trainer.data.prompts import format_prompt
from trainer.data.sampler import QuestionSampler, epoch_batches
from trainer.data.tasks import Example
from trainer.evaluate import response_entropy, sampling_config
from trainer.learners.loop import Mode, StepResult, run
from trainer.learners.sft import sft_update
from trainer.learners.warmstart import refuse_under_deepspeed, start_rollouts
from trainer.session import Session


def sample_and_filter(
    s: Session, sampler: QuestionSampler[Example], step: int
) -> tuple[list[Sample], dict[str, float]]:
    """Phases 1-3: this rank's share of the questions, ``group_size`` samples each, the correct ones kept.

    Returns (kept samples of all ranks, metrics).
    """
    ei, acc = s.cfg.ei, s.accelerator
    questions = sampler.draw(ei.questions_per_step)[acc.process_index :: acc.num_processes]
    prompts = [format_prompt(s.cfg.data.prompt_template, question=q.question) for q in questions]
    with s.timer("generate"):
        samples = s.engine.generate(
            prompts, sampling_config(s.cfg.rollout, s.cfg.seed + 1_000 * step + acc.process_index, ei.group_size)
        )
    with s.timer("score"):
        scores = s.scorer.score(
            [x.text for x in samples], [q.answer for q in questions for _ in range(ei.group_size)]
        )
    correct = [sc.answer_reward > 0 for sc in scores]
    kept = [x for x, ok in zip(samples, correct, strict=True) if ok]
    with s.timer("entropy"):
        entropy = response_entropy(s.learner.model, samples, s.learner.tokenizer.pad_token_id)
    metrics = rollout_metrics(samples, s.timer.seconds.get("generate", 0.0)) | s.scorer.metrics()
    solved = sum(any(correct[i * ei.group_size : (i + 1) * ei.group_size]) for i in range(len(questions)))
    metrics |= {
        "ei/kept": float(len(kept)),
        "ei/kept_fraction": len(kept) / len(samples),
        "ei/questions_solved": solved / len(questions),
        "ei/response_entropy": sum(entropy) / len(entropy),
    }
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        kept = gather_object(kept)
        metrics["ei/kept"] = float(len(kept))
    return kept, metrics


def sft_on_kept(s: Session, kept: list[Sample], step: int) -> dict[str, float]:
    """Phase 4: ``ei_epochs`` epochs of the SFT step over the kept samples; mean train metrics."""
    ei, acc = s.cfg.ei, s.accelerator
    pad = s.learner.tokenizer.pad_token_id
    totals: dict[str, list[float]] = {}
    for epoch in range(ei.ei_epochs):
        for rows in epoch_batches(len(kept), ei.batch_size, s.cfg.seed * 100_003 + 1_000 * step + epoch):
            micro_rows = deal_micro_batches(
                rows, ei.gradient_accumulation_steps, acc.process_index, acc.num_processes
            )
            micro = pack_micro_batches(
                micro_rows,
                lambda m: pack_token_ids([kept[i].prompt_ids for i in m], [kept[i].response_ids for i in m], pad),
            )
            for k, v in sft_update(s.learner, micro).items():
                totals.setdefault(k, []).append(v)
    metrics = {k: sum(v) / len(v) for k, v in totals.items()}
    metrics["train/optimizer_steps"] = float(len(totals.get("train/loss", [])))
    return metrics


def ei_step(s: Session, sampler: QuestionSampler[Example], step: int) -> StepResult:
    """One expert-iteration step: sample → filter → SFT → sync; this rank's metrics, the global keys."""
    kept, metrics = sample_and_filter(s, sampler, step)
    s.rollouts_done()
    if kept:
        with s.timer("train"):
            metrics |= sft_on_kept(s, kept, step)
        metrics |= s.sync_weights()
    return metrics, ("ei/kept",)  # kept: gathered over ranks already


def train_ei(cfg: RunConfig, resume: bool = False) -> dict[str, float]:
    """Run expert iteration as configured; returns the final evaluation metrics."""
    with Session(cfg, resume, before_load=functools.partial(refuse_under_deepspeed, cfg.warmstart.steps)) as s:
        sampler = start_rollouts(s)
        return run(s, Mode(
            name="ei", total_steps=cfg.ei.n_ei_steps, step=lambda step: ei_step(s, sampler, step),
            evaluate=s.evaluate,
            postfix=lambda m: {"kept": str(int(m["ei/kept"])), "entropy": f"{m['ei/response_entropy']:.2f}"},
            checkpoint_state=lambda: {"sampler": sampler.state_dict()},
        ))
