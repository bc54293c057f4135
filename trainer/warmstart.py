"""Warm start: a short SFT on the training questions' worked solutions before RL, so that a random tiny
policy already produces the answer format (the CPU demo). With ``warmstart.answer_noise`` a fraction of the
demonstrations report a wrong answer after correct reasoning (a sloppy demonstrator): RL then has a
learnable gap to close, reporting the result the policy computed. Response-only loss (CS336
`sft_microbatch_train_step`), its own AdamW at ``warmstart.learning_rate``; the result is saved to
``RUN_DIR/warmstart`` (the KL reference when ``grpo.kl_coef > 0``).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from tqdm.auto import tqdm

from rollout.prompts import format_prompt
from rollout.tasks import Example
from trainer.logprobs import get_response_log_probs
from trainer.session import Session
from trainer.tokenization import tokenize_prompt_and_output
from trainer.train_steps import sft_microbatch_train_step


def r1_zero_target(example: Example, wrong_answer: int | None = None) -> str:
    """The response an r1_zero prompt (ending in ``<think>``) should get for `example`; with
    `wrong_answer`, a sloppy demonstration whose reasoning is right but whose reported answer is off by it."""
    reasoning = example.solution or example.answer
    answer = example.answer if wrong_answer is None else str(int(example.answer) + wrong_answer)
    return f" {reasoning} </think> <answer> {answer} </answer>"


def demonstration(example: Example, noise: float, rng: random.Random) -> str:
    """`r1_zero_target`, with probability `noise` reporting an answer off by 1-9 (integer tasks only)."""
    if noise and rng.random() < noise and example.answer.lstrip("-").isdigit():
        return r1_zero_target(example, rng.choice([-1, 1]) * rng.randint(1, 9))
    return r1_zero_target(example)


def warm_start(s: Session) -> dict[str, float]:
    cfg = s.cfg.warmstart
    examples = s.train_examples()
    rng = random.Random(s.cfg.seed)
    optimizer = torch.optim.AdamW(s.learner.model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="warm start (SFT)", disable=not s.progress_enabled)
    with s.timer("warmstart"):
        for _ in bar:
            batch = rng.sample(examples, min(cfg.batch_size, len(examples)))
            prompts = [format_prompt(s.cfg.data.prompt_template, question=ex.question) for ex in batch]
            targets = [demonstration(ex, cfg.answer_noise, rng) for ex in batch]
            tokens = tokenize_prompt_and_output(prompts, targets, s.learner.tokenizer)
            tokens = {k: v.to(s.learner.device) for k, v in tokens.items()}
            log_probs = get_response_log_probs(s.learner.model, tokens["input_ids"], tokens["labels"])["log_probs"]
            mask = tokens["response_mask"]
            loss, _ = sft_microbatch_train_step(log_probs, mask, 1, normalize_constant=float(mask.sum(-1).max()))
            s.accelerator.clip_grad_norm_(s.learner.model.parameters(), s.cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if s.is_main:
        model: Any = s.learner.unwrapped  # a PreTrainedModel
        model.save_pretrained(s.run_dir / "warmstart")
        s.learner.tokenizer.save_pretrained(s.run_dir / "warmstart")
    s.accelerator.wait_for_everyone()
    metrics = {"warmstart/final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}
    s.tracker.log(metrics, 0)
    return metrics
