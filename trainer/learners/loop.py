"""The one run loop of every mode (GRPO, expert iteration, SFT, DPO).

A mode is a step function plus its set-up (`Mode`); the loop owns what they share: the held-out evaluation
before step 1 (fresh runs), every ``eval.every`` steps and at the end; the checkpoint every
``checkpoint.save_every`` steps and at the end; one reduction of the ranks' metrics per step (the step's
own metrics with its phase times, evaluation and checkpoint included: `Session.reduce_metrics`); logging
every ``logging.every`` steps; the progress bar, or a log line where there is no terminal; the final
checkpoint's upload (``checkpoint.push_to_hub``, `trainer.hub`); on SIGTERM, a checkpoint after the current
step and `Stopped` (`trainer.stop_signal`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from trainer.hub import push_final_checkpoint
from trainer.learner import optimizer_steps
from trainer.session import Session
from trainer.stop_signal import Stopped, StopSignal

logger = logging.getLogger("reasonrl")

StepResult = tuple[dict[str, float], Collection[str]]  # this rank's metrics, the keys among them already global


@dataclass
class Mode:
    """What a mode plugs into the loop.

    `step(n)` trains step n; `evaluate(n)` runs (and logs) the held-out evaluation after step n (0: before
    training) and returns its metrics; `postfix` picks the progress fields from a step's reduced metrics;
    `checkpoint_state()` is the mode's own state saved with every checkpoint (e.g. the question sampler).
    """

    name: str
    total_steps: int
    step: Callable[[int], StepResult]
    evaluate: Callable[[int], dict[str, float]]
    postfix: Callable[[dict[str, float]], dict[str, str]]
    checkpoint_state: Callable[[], dict[str, Any]] = field(default=dict)


def run(s: Session, mode: Mode) -> dict[str, float]:
    """Steps ``trainer_state["step"] + 1 .. total_steps`` of `mode`; returns the last evaluation's metrics."""
    start = int(s.trainer_state["step"])
    s.learner.scheduler.plan(optimizer_steps(s.cfg, mode.total_steps))  # the LR schedule spans the whole run
    final = mode.evaluate(0) if start == 0 else {}
    s.tracker.log(s.reduce_metrics(s.timer.pop()), start)  # the set-up's phase times (warm start, sync, eval)
    bar = tqdm(range(start + 1, mode.total_steps + 1), desc=mode.name, disable=not s.progress_enabled,
               initial=start, total=mode.total_steps)
    with StopSignal() as stop:
        for step in bar:
            metrics, already_global = mode.step(step)
            last = step == mode.total_steps
            if last or (s.cfg.eval.every and step % s.cfg.eval.every == 0):
                final = mode.evaluate(step)
            saved = s.maybe_save(step, last, **mode.checkpoint_state())
            metrics = s.reduce_metrics(metrics | s.timer.pop(), already_global)
            with s.timer("log"):  # reported with the next step
                if step % s.cfg.logging.every == 0:
                    s.tracker.log(metrics, step)
            show_progress(s, bar, mode.name, step, mode.total_steps, mode.postfix(metrics))
            signum = stop.requested(s.accelerator)
            if signum and not last:
                stop_now(s, mode, step, saved, signum)
    if s.cfg.checkpoint.push_to_hub:  # the final checkpoint is written already: a failed upload loses nothing
        push_final_checkpoint(s.accelerator, s.cfg, s.run_dir, mode.total_steps)
    return final


def stop_now(s: Session, mode: Mode, step: int, saved: bool, signum: int) -> None:
    """Save a checkpoint after `step` (unless this step saved one) and raise `Stopped`."""
    if not saved:
        s.save(step, **mode.checkpoint_state())
    name = signal.Signals(signum).name
    raise Stopped(f"stopped on {name} after step {step} of {mode.total_steps}: checkpoint saved; continue with "
                  f"`reasonrl train --resume {s.run_dir}`", signum)


def show_progress(s: Session, bar: Any, desc: str, step: int, total: int, fields: dict[str, str]) -> None:
    """The bar's postfix on a terminal; elsewhere (CI, a log file) one log line per logged step."""
    bar.set_postfix(fields)
    if not s.progress_enabled and s.is_main and step % s.cfg.logging.every == 0:
        logger.info("%s step %d/%d %s", desc, step, total, " ".join(f"{k}={v}" for k, v in fields.items()))
