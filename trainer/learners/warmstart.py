"""The start of a rollout mode (GRPO, expert iteration): the optional warm start, then the first weight sync.

Warm start: a short SFT on the training questions' worked solutions before RL, so that a random tiny
policy already produces the answer format (the CPU demo). With ``warmstart.sloppy_fraction`` that fraction
of the demonstrations leave out the ``<answer>`` tags (a sloppy demonstrator), so the warm-started policy
often answers in a form the reward does not accept: a gap RL can close within minutes on a CPU.
Response-only loss (`sft_loss`, CS336 §4.3), its own AdamW at ``warmstart.learning_rate``, clipped by
torch's ``clip_grad_norm_`` (accelerate's would unscale the learner optimizer's fp16 loss scaler, which this
loop never scales: an error under ``--mixed_precision fp16``); the result is saved to ``RUN_DIR/warmstart``
(the KL reference when ``grpo.kl_coef > 0``).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from trainer.checkpoint import save_model_folder
from trainer.config import ConfigError
from trainer.data.prompts import format_prompt
from trainer.data.sampler import QuestionSampler
from trainer.data.tasks import Example
from trainer.data.tokenization import tokenize_prompt_and_output
from trainer.logprobs import get_response_log_probs
from trainer.lora import save_hf
from trainer.losses import sft_loss
from trainer.session import Session

logger = logging.getLogger("reasonrl")


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


def refuse_under_deepspeed(steps: int, accelerator: Any) -> None:
    """`check_warm_start` for the launched accelerator (a `Session`'s ``before_load`` check)."""
    check_warm_start(steps, getattr(accelerator.state, "deepspeed_plugin", None) is not None)


def start_rollouts(s: Session) -> QuestionSampler[Example]:
    """The question sampler (restored on resume); on a fresh run the warm start first. The engine gets the
    learner's weights either way; a resumed engine holds the checkpoint's policy version, not a fresh count."""
    sampler = QuestionSampler(s.train_examples(), s.cfg.seed)
    if "sampler" in s.trainer_state:
        sampler.load_state_dict(s.trainer_state["sampler"])
    start = int(s.trainer_state["step"])
    if start == 0 and s.cfg.warmstart.steps:
        warm_start(s)
    s.sync_weights(int(s.trainer_state["policy_version"]) if start else None)  # resumed: the checkpoint's version
    return sampler


def warm_start(s: Session) -> dict[str, float]:
    """``warmstart.steps`` SFT steps on r1_zero demonstrations (module docstring); logs the final loss."""
    cfg = s.cfg.warmstart
    examples = s.train_examples()
    rng = random.Random(s.cfg.seed)
    optimizer = torch.optim.AdamW(s.learner.model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="warm start (SFT)", disable=not s.progress_enabled)
    with s.timer("warmstart"):
        for i in bar:
            batch = rng.sample(examples, min(cfg.batch_size, len(examples)))
            prompts = [format_prompt(s.cfg.data.prompt_template, question=ex.question) for ex in batch]
            targets = [r1_zero_target(ex, sloppy=rng.random() < cfg.sloppy_fraction) for ex in batch]
            tokens = tokenize_prompt_and_output(prompts, targets, s.learner.tokenizer)
            tokens = {k: v.to(s.learner.device) for k, v in tokens.items()}
            log_probs = get_response_log_probs(s.learner.model, tokens["input_ids"], tokens["labels"])["log_probs"]
            mask = tokens["response_mask"]
            loss = sft_loss(log_probs, mask, "constant", normalize_constant=float(mask.sum(-1).max()))
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(s.learner.model.parameters(), s.cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if not s.progress_enabled and s.is_main and (i + 1) % max(1, cfg.steps // 10) == 0:  # no terminal
                logger.info("warm start (SFT) step %d/%d loss=%.3f", i + 1, cfg.steps, losses[-1])

    def write(folder: Path) -> None:
        save_hf(s.learner.unwrapped, folder)  # under model.lora: merged (the KL reference)
        s.learner.tokenizer.save_pretrained(folder)

    save_model_folder(s.accelerator, s.learner.unwrapped, write, s.run_dir / "warmstart", "warm-start model")
    metrics = {"warmstart/final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}
    s.tracker.log(metrics, 0)
    return metrics
