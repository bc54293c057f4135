"""`reasonrl train --dry-run`: what a run would do, checked before any accelerator time is spent.

Runs the checks a training run makes before it trains, and those it makes only later (the context check of
every question, the world-size split), without loading weights, starting an engine or writing anything:

- config: as training loads it (``--resume``: the run's saved config and the overrides), and the batch
  split over ``--world-size`` ranks (`trainer.cluster.validate_for_cluster`; the target node's GPU count is
  not known here and not checked);
- model: the tokenizer and the model's config only; parameters counted on the meta device;
- data (GRPO, EI): every training and held-out question formatted with the prompt template and tokenized:
  prompt lengths, and those too long for the engine's context skipped as training skips them (an error
  past ``data.max_skipped_fraction``, as in training); a warning counts the prompts that leave less than
  ``rollout.max_tokens`` (held-out: ``eval.max_tokens``) of the context, whose responses the engine cuts
  short. SFT/DPO files are read and checked as training does;
- schedule (GRPO, EI): steps, rollouts and questions per step, passes over the training questions, optimizer
  steps; for GRPO, who samples the rollouts (each rank, or rank 0 alone when asynchronous) and from where;
- golds: one spanning several lines is a warning (the whole worked solution was read: a wrong
  ``data.answer_parser`` or ``answer_column``); with a built-in grader, up to `GOLD_SAMPLE` golds, each
  written as the reward's ideal response (``</think> <answer>GOLD</answer>`` for r1_zero, ``\\boxed{GOLD}``
  for question_only), must score answer reward 1: a gold the grader cannot match against itself is a reward
  no sample can earn;
- output: a new run directory, a run that only ``--resume`` may continue, or one that cannot be written.

Prints one report; bad input raises the error training would raise, so the exit status says whether the run
would start.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.config import RunConfig

GOLD_SAMPLE = 64  # golds graded against themselves (each takes the grader milliseconds)
IDEAL = {"r1_zero": "</think> <answer>{}</answer>", "question_only": "\\boxed{{{}}}"}
PLENTY_OF_GPUS = 1 << 16  # the target node's device count is unknown here: never the limiting check


def dry_run(cfg: RunConfig, resume: bool = False, world_size: int = 1) -> list[str]:
    """The report's lines; raises what training would raise before it trains (`ConfigError`, `FileExistsError`,
    `DatasetFormatError`, ...)."""
    from trainer.cluster import validate_for_cluster
    from trainer.data.checks import check_data

    lines = [f"config: mode {cfg.mode}, world size {world_size}, seed {cfg.seed}"]
    validate_for_cluster(cfg, world_size, [f"cuda:{i}" for i in range(world_size)], cuda_devices=PLENTY_OF_GPUS)
    lines += output_lines(Path(cfg.output_dir), resume)
    check_data(cfg)
    tokenizer, model_config = model_lines(cfg, lines)
    if cfg.mode in ("grpo", "ei"):
        train = usable_questions(cfg, tokenizer, model_config, "train", lines)
        eval_examples = usable_questions(cfg, tokenizer, model_config, "test", lines)
        lines += schedule_lines(cfg, len(train))
        lines += rollout_lines(cfg, world_size) if cfg.mode == "grpo" else []
        lines += reward_lines(cfg, [*train, *eval_examples])
    return lines


def output_lines(run_dir: Path, resume: bool) -> list[str]:
    """Where the run writes, refused as `trainer.session.Session` refuses it, but without writing a probe."""
    from trainer.checkpoint import StorageError
    from trainer.session import check_new_run

    check_new_run(run_dir, resume)
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"output_dir={run_dir}: {existing} is not a writable directory; choose a writable "
                           "output_dir")
    state = "continues its newest checkpoint" if resume else "new run" if existing != run_dir else "new run, folder exists"
    return [f"output: {run_dir} ({state}; writable)"]


def model_lines(cfg: RunConfig, lines: list[str]) -> tuple[Any, Any]:
    """Load the tokenizer and the model's config (no weights); the model line is appended to `lines`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.data.prompts import is_chat_template, register_chat_template, register_template
    from trainer.learner import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path)
    try:
        model_config = AutoConfig.from_pretrained(cfg.model.path)
    except OSError as err:
        raise FileNotFoundError(f"model.path={cfg.model.path!r}: its config could not be read: {err}") from err
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            model_config).parameters())
    for name, template in cfg.data.templates.items():
        register_template(name, template)
    for name in {cfg.data.prompt_template, cfg.dpo.template}:
        if is_chat_template(name):
            register_chat_template(name, tokenizer)
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.dtype]
    lines.append(f"model: {cfg.model.path} ({model_config.model_type}, {_count(params)} parameters, "
                 f"{_count(params * width)}B of {cfg.model.dtype} weights; weights not loaded)")
    return tokenizer, model_config


def usable_questions(cfg: RunConfig, tokenizer: Any, model_config: Any, split: str, lines: list[str]) -> list[Any]:
    """The split's questions that leave the engine room for a response (as `Session.usable_prompts` keeps
    them); a data line with their count, the skipped and the prompt lengths is appended to `lines`."""
    from trainer.data.checks import context_limit, drop_long_prompts, prompt_lengths, task_columns, task_name
    from trainer.data.tasks import load_task

    d = cfg.data
    source = d.train_source if split == "train" else d.eval_source
    limit = d.train_limit if split == "train" else cfg.eval.limit or d.eval_limit
    examples = load_task(task_name(cfg), source, split, limit, cfg.seed, task_columns(cfg))
    context = context_limit(cfg, model_config)
    every = prompt_lengths(examples, d.prompt_template, tokenizer, context)  # each prompt tokenized once
    kept, skipped = drop_long_prompts(examples, d.prompt_template, tokenizer, context, d.max_skipped_fraction,
                                      source or task_name(cfg), lengths=every)
    length_of = dict(zip(examples, every, strict=True))  # Example is frozen: equal questions, equal lengths
    lengths = [length_of[ex] for ex in kept]
    where = "the server's --max-model-len, checked at start" if cfg.rollout.placement == "remote" else context
    name = "train" if split == "train" else "held-out"
    lines.append(f"data ({name}): {len(kept):,} questions from {source or task_name(cfg)}, {skipped} skipped as "
                 f"too long (context {where}); prompt tokens median {statistics.median(lengths or [0]):.0f}, max "
                 f"{max(lengths, default=0)}")
    budget, key = (cfg.rollout.max_tokens, "rollout") if split == "train" else (cfg.eval.max_tokens, "eval")
    cramped = 0
    if context is not None and cfg.rollout.placement != "remote":  # a server's own limit is read at start
        cramped = sum(n + budget > context for n in lengths)
    if cramped:
        lines.append(f"warning: {cramped} of {len(kept):,} {name} prompts leave fewer than {key}.max_tokens={budget} "
                     f"tokens of the {context}-token context: their responses end early (finish_reason length)")
    return kept


def schedule_lines(cfg: RunConfig, n_train: int) -> list[str]:
    """Steps, rollouts, questions drawn and optimizer steps of a GRPO or EI run."""
    from trainer.learner import optimizer_steps

    if cfg.mode == "grpo":
        g = cfg.grpo
        steps, questions, rollouts = g.n_grpo_steps, g.rollout_batch_size // g.group_size, g.rollout_batch_size
        updates = f"{optimizer_steps(cfg, steps):,} optimizer steps"
    else:
        e = cfg.ei
        steps, questions, rollouts = e.n_ei_steps, e.questions_per_step, e.questions_per_step * e.group_size
        updates = "optimizer steps: as many as the filtered samples make"
    drawn = steps * questions
    warm = (f"; first a {cfg.warmstart.steps}-step SFT warm start (batch {cfg.warmstart.batch_size})"
            if cfg.warmstart.steps else "")
    return [f"schedule: {steps} steps x {rollouts} rollouts ({questions} questions x {rollouts // questions}) = "
            f"{drawn:,} questions drawn, {drawn / max(n_train, 1):.2f} passes over the training questions; "
            f"{updates}{warm}"]


def rollout_lines(cfg: RunConfig, world_size: int) -> list[str]:
    """Who samples a GRPO step's rollouts, and how many each learner rank trains on."""
    g, r = cfg.grpo, cfg.rollout
    questions = g.rollout_batch_size // g.group_size
    learners = "each rank" if world_size > 1 else "the learner"
    where = {"colocated": f"vLLM colocated with {learners}" if r.engine == "vllm" else "the learner's own module (HF)",
             "dedicated": f"vLLM on {r.device}", "remote": f"the rollout server at {r.server_url}"}[r.placement]
    if g.max_staleness:
        many = world_size > 1
        return [f"rollouts: asynchronous (grpo.max_staleness={g.max_staleness}): "
                f"{'rank 0' if many else 'a producer thread'} samples each step's {g.rollout_batch_size} rollouts "
                f"from {where} while {'the ranks train' if many else 'the learner trains'} on an earlier step's"
                + (f"; each of {world_size} ranks trains on {g.rollout_batch_size // world_size}" if many else "")]
    who = f"each of {world_size} ranks samples" if world_size > 1 else "the learner samples"
    return [f"rollouts: {who} {questions // world_size} questions x {g.group_size} per step from {where}, then "
            "trains on them"]


def reward_lines(cfg: RunConfig, examples: Sequence[Any]) -> list[str]:
    """Golds that span lines (a gold is one answer: the whole solution was read), and the built-in grader's
    score of each sampled gold written as its ideal response (answer reward 1 expected)."""
    multiline = [ex.answer for ex in examples if "\n" in ex.answer.strip()]
    warnings = [f"warning: {len(multiline)} of {len(examples)} golds span several lines (e.g. "
                f"{multiline[0][:60]!r}): a gold is one answer, not a worked solution; check data.answer_parser / "
                "data.answer_column"] if multiline else []
    return _self_graded(cfg, examples) + warnings


def _self_graded(cfg: RunConfig, examples: Sequence[Any]) -> list[str]:
    from rollout.reward.custom import CombinedReward, reward_fn_from_spec

    fn = reward_fn_from_spec(cfg.reward.fn)  # custom modules were imported at config load already
    first = fn.terms[0].fn if isinstance(fn, CombinedReward) else str(cfg.reward.fn)  # the task's grader
    if first not in IDEAL:
        return [f"reward: {first} (your own function: not graded against the golds here)"]
    sample = list(examples)[:: max(1, len(examples) // GOLD_SAMPLE)][:GOLD_SAMPLE]
    missed = [ex.answer for ex in sample if fn(IDEAL[first].format(ex.answer), ex.answer).answer_reward != 1.0]
    line = f"reward: {first}: {len(sample) - len(missed)}/{len(sample)} sampled golds, written as its ideal response, score 1"
    if not missed:
        return [line]
    shown = ", ".join(repr(a[:60]) for a in missed[:3])
    return [line, f"warning: the grader cannot match {len(missed)} gold(s) against themselves (e.g. {shown}): no "
            "sample can earn their reward; check data.answer_parser / data.answer_column"]


def _count(n: float) -> str:
    """1234567 -> '1.23 M', 3.1e9 -> '3.10 G'."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} "
