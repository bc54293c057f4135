"""Warm start: a short SFT on the training questions' worked solutions before RL, so that a random tiny
policy already produces the answer format (the CPU demo). With ``warmstart.sloppy_fraction`` that fraction of
the demonstrations leave out the ``<answer>`` tags (a sloppy demonstrator), so the warm-started policy
often answers in a form the reward does not accept: a gap RL can close within minutes on a CPU. Response-only loss (CS336
`sft_microbatch_train_step`), its own AdamW at ``warmstart.learning_rate``; the result is saved to
``RUN_DIR/warmstart`` (the KL reference when ``grpo.kl_coef > 0``).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from tqdm.auto import tqdm

from trainer.config import ConfigError
from trainer.data.prompts import format_prompt
from trainer.data.tasks import Example
from trainer.data.tokenization import tokenize_prompt_and_output
from trainer.logprobs import get_response_log_probs
from trainer.session import Session
from trainer.train_steps import sft_microbatch_train_step


def r1_zero_target(example: Example, sloppy: bool = False) -> str:
    """The response an r1_zero prompt (ending in ``<think>``) should get for `example`; a `sloppy` one
    states the right answer without the ``<answer>`` tags, which the r1_zero reward scores 0."""
    reasoning = example.solution or example.answer
    if sloppy:
        return f" {reasoning} </think> {example.answer}"
    return f" {reasoning} </think> <answer> {example.answer} </answer>"


def check_warm_start(steps: int, deepspeed: bool) -> None:
    """The warm start is the CPU demo's plain PyTorch loop (its own AdamW): refused under DeepSpeed, whose
    engine needs its own backward and step and partitions the parameters (ZeRO-3)."""
    if steps and deepspeed:
        raise ConfigError([
            f"warmstart.steps={steps} under DeepSpeed: the warm start is the CPU demo's plain PyTorch loop; "
            "set warmstart.steps=0 and start GRPO from an SFT checkpoint (mode: sft) instead"], "config")


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
            targets = [r1_zero_target(ex, sloppy=rng.random() < cfg.sloppy_fraction) for ex in batch]
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
