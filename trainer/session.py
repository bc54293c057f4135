"""The resources of one training run: run directory, learner, tracker, reward scorer, rollout engine,
evaluation, checkpoint/resume, and cleanup in `close` (engines closed, trackers finished, process group
destroyed) even when training fails. The reward sandbox (a worker pool) and the rollout engine start on
first use, so the modes that never score or generate (DPO; SFT without filtering or generation metrics)
never start them. The step loop is `trainer.learners.loop`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rollout.engines.protocol import RolloutEngine
from rollout.reward.pool import RewardScorer
from trainer.checkpoint import (
    StorageError,
    check_writable,
    gather_failures,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from trainer.cluster import validate_for_cluster
from trainer.config import RunConfig
from trainer.config_io import save_config
from trainer.data.checks import check_data, context_limit, drop_long_prompts, task_columns, task_name
from trainer.data.prompts import is_chat_template, register_chat_template, register_template
from trainer.data.tasks import Example, load_task
from trainer.engines import node_learner_devices, shares_engine
from trainer.evaluate import (
    entropy_passes,
    eval_share,
    report,
    response_entropy,
    sample_records,
    sampling_config,
)
from trainer.flops import FlopCounter
from trainer.hub import check_hub_on_every_rank
from trainer.learner import Learner, make_accelerator
from trainer.rank_metrics import combine_rank_metrics
from trainer.sync import StaleWeightProbe
from trainer.timing import PhaseTimer
from trainer.tracking import NullTracker, Tracker, make_tracker, trim_metrics

logger = logging.getLogger("reasonrl")


class Session:
    """One training run. Use as a context manager: ``with Session(cfg) as s: ...``.

    `before_load` runs a mode's own checks that need the launched accelerator (e.g. DeepSpeed or not)
    after the cluster checks and before anything is loaded."""

    def __init__(self, cfg: RunConfig, resume: bool = False,
                 before_load: Callable[[Accelerator], None] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        set_seed(cfg.seed)
        check_new_run(self.run_dir, resume)
        check_data(cfg)  # data first: a bad file is an error before anything is loaded or written
        for name, template in cfg.data.templates.items():
            register_template(name, template)
        self.accelerator = make_accelerator()
        _check_world(self.accelerator.num_processes)
        validate_for_cluster(cfg, self.accelerator.num_processes, node_learner_devices(self.accelerator))
        if before_load is not None:
            before_load(self.accelerator)
        check_writable(self.accelerator, self.run_dir)
        check_hub_on_every_rank(self.accelerator, cfg.checkpoint.push_to_hub)  # offline/no token: before loading
        self.learner = Learner(cfg.model, cfg.optim, self.accelerator)
        for name in {cfg.data.prompt_template, cfg.dpo.template}:  # `chat*`: the model's own chat template
            if is_chat_template(name):
                register_chat_template(name, self.learner.tokenizer)
        self.flops = FlopCounter(self.learner.unwrapped, self.learner.device, cfg.logging.peak_tflops)
        self.timer = PhaseTimer()
        self.trainer_state: dict[str, Any] = {"step": 0, "policy_version": 0}
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if resume and checkpoint is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.run_dir / 'checkpoints'}")
        if checkpoint is not None:
            self.trainer_state = load_checkpoint(self.accelerator, checkpoint)
            logger.info("resumed from %s (step %d)", checkpoint, self.trainer_state["step"])
        self.tracker = self._make_tracker(checkpoint is not None)
        self._scorer: RewardScorer | None = None
        self._engine: RolloutEngine | None = None
        self._train_examples: list[Example] | None = None
        self._eval_examples: list[Example] | None = None
        self._probe: StaleWeightProbe | None = None

    # ---- set-up -------------------------------------------------------------------------------------
    def _make_tracker(self, resumed: bool) -> Tracker:
        if not self.accelerator.is_main_process:
            return NullTracker()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        if resumed:
            dropped = trim_metrics(self.run_dir, int(self.trainer_state["step"]))
            if dropped:
                logger.info("metrics.jsonl: dropped %d record(s) logged after the checkpoint (logged again now)",
                            dropped)
        log = self.cfg.logging
        return make_tracker(self.run_dir, log.wandb_mode, log.project, log.run_name,
                            self.cfg.model_dump(mode="json"), self.trainer_state.get("wandb_run_id"))

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def progress_enabled(self) -> bool:
        return self.cfg.logging.progress and self.is_main and sys.stderr.isatty() and not os.environ.get("CI")

    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine, built on first use and kept in sync with the learner's weights."""
        if self._engine is None:
            from trainer.engines import build_engine

            self._engine = build_engine(self.cfg, self.learner)
        return self._engine

    @property
    def scorer(self) -> RewardScorer:
        """The reward module's isolated worker pool, started on first use."""
        if self._scorer is None:
            r = self.cfg.reward
            self._scorer = RewardScorer(r.fn, timeout_s=r.timeout_s, num_workers=r.num_workers)
        return self._scorer

    def train_examples(self) -> list[Example]:
        """The training questions, less those too long for the engine's context (`usable_prompts`)."""
        if self._train_examples is None:
            d = self.cfg.data
            examples = load_task(task_name(self.cfg), d.train_source, "train", d.train_limit, self.cfg.seed,
                                 task_columns(self.cfg))
            self._train_examples = self.usable_prompts(examples, d.train_source, "data/skipped_long_prompts")
        return self._train_examples

    def eval_examples(self) -> list[Example]:
        if self._eval_examples is None:
            d = self.cfg.data
            limit = self.cfg.eval.limit or d.eval_limit
            examples = load_task(task_name(self.cfg), d.eval_source, "test", limit, self.cfg.seed, task_columns(self.cfg))
            self._eval_examples = self.usable_prompts(examples, d.eval_source, "data/skipped_long_eval_prompts")
        return self._eval_examples

    def usable_prompts(self, examples: list[Example], source: str | None, metric: str) -> list[Example]:
        """`examples` whose prompt leaves the rollout engine room for a response, checked before the engine sees
        them (`trainer.data.checks.drop_long_prompts`); the skipped are counted in `metric`. A remote server's
        limit is its own (``--max-model-len``), known only from the server: its (cheap) client is built first."""
        known = self._engine is not None or self.cfg.rollout.placement == "remote"
        engine_limit = self.engine.max_model_len if known else None
        limit = context_limit(self.cfg, self.learner.unwrapped.config, engine_limit)
        kept, skipped = drop_long_prompts(examples, self.cfg.data.prompt_template, self.learner.tokenizer, limit,
                                          self.cfg.data.max_skipped_fraction, source or task_name(self.cfg))
        self.tracker.log({metric: float(skipped)}, int(self.trainer_state["step"]))
        return kept

    # ---- shared phases ----------------------------------------------------------------------------
    def sync_weights(self, version: int | None = None) -> dict[str, float]:
        """Push the learner's weights into the rollout engine and check them with the probe. `version`: the
        policy version the engine takes for them (a resumed run's); None = the engine's next."""
        from trainer.sync import make_probe, sync_weights

        if self._probe is None:
            self._probe = make_probe(self.cfg, self.learner)
        with self.timer("sync"):
            metrics = sync_weights(self.engine, self.learner, self.cfg, self._probe, version)
        self.trainer_state["policy_version"] = self.engine.policy_version
        return metrics

    def rollouts_done(self) -> None:
        """Between rollouts a colocated engine gives its accelerator memory (weights, KV cache) back to the
        learner (`rollout.sleep_between_rollouts`); the next sync or generate wakes it. A no-op where sleep
        frees nothing (CPU, an HF engine sharing the learner's module)."""
        if self._engine is not None:  # each engine knows whether it may sleep (config, device, ownership)
            self._engine.sleep()

    def evaluate(self, step: int, tag: str = "") -> dict[str, float]:
        """Held-out evaluation, logged by the main process, with per-sample JSONL under run_dir/eval/. Ranks with
        engines of their own each sample a contiguous share of the questions, seeded as one process would
        (`eval_share`); ranks sharing one rollout server leave it to rank 0. Token entropy needs a learner
        forward pass; under ZeRO-3 that pass is collective, so every rank runs as many (`entropy_passes`)."""
        _ = self.engine  # built on every rank: a vLLM engine's start-up is collective over the learner's ranks
        world = self.accelerator.num_processes
        share = eval_share(len(self.eval_examples()), world, self.accelerator.process_index,
                           shares_engine(self.cfg, world))
        records, seconds = self._eval_records(share, step)
        metrics, failure = {}, None
        if world > 1:
            from accelerate.utils import gather_object

            records = [r for rank_records in gather_object([records]) for r in rank_records]  # rank-major
        if self.is_main:
            try:
                metrics = report(records, self.run_dir / "eval" / f"step_{step:06d}{tag}.jsonl", seconds)
            except StorageError as err:  # every rank raises it (no rank left waiting at the barrier)
                failure = str(err)
            else:
                self.tracker.log(metrics, step)
                self.tracker.log_table("eval/samples", records[: self.cfg.eval.log_samples], step)
        failures = gather_failures(self.accelerator, failure)  # also the barrier after evaluation
        if failures:
            raise StorageError(failures[0])
        return metrics

    def _eval_records(self, share: range, step: int) -> tuple[list[dict[str, Any]], list[float]]:
        """This rank's records for the questions in `share` (none: nothing sampled) and its phase seconds."""
        policy, passes = self._entropy_policy()
        if not share:  # (response_entropy runs under inference mode itself)
            if policy is not None:
                response_entropy(policy, [], self.learner.tokenizer.pad_token_id, passes=passes)
            return [], [0.0, 0.0, 0.0]
        sampling = replace(sampling_config(self.cfg.eval, self.cfg.seed + step, self.cfg.eval.samples_per_question),
                           first_index=share.start)
        examples = self.eval_examples()[share.start : share.stop]
        with self.timer("eval"), torch.inference_mode():
            out = sample_records(self.engine, examples, self.cfg.data.prompt_template, sampling, self.scorer,
                                 policy, self.learner.tokenizer.pad_token_id, passes)
        self.rollouts_done()
        return out

    def _entropy_policy(self) -> tuple[torch.nn.Module | None, int]:
        """The model that scores held-out token entropy (None: ``eval.token_entropy`` is off) and the number of
        passes every rank must run (0: as many as its own samples need)."""
        if not self.cfg.eval.token_entropy:
            return None, 0
        if not self.learner.sharded:
            return self.learner.unwrapped, 0  # plain module: no DDP buffer broadcast, ranks independent
        world = self.accelerator.num_processes  # ZeRO-3: the forwards gather from every rank, an idle one included
        return self.learner.model, entropy_passes(len(self.eval_examples()), world, shares_engine(self.cfg, world),
                                                  samples_per_question=self.cfg.eval.samples_per_question)

    def reduce_metrics(self, metrics: dict[str, float], already_global: Collection[str] = ()) -> dict[str, float]:
        """Every rank's metrics combined into one record (`trainer.rank_metrics`: totals summed, the rest
        averaged over the ranks that report them); keys in `already_global` are taken as they are."""
        if self.accelerator.num_processes == 1:
            return metrics
        from accelerate.utils import gather_object

        return combine_rank_metrics(gather_object([metrics]), already_global)

    def learner_throughput(self, sequence_lengths: list[int], passes: int = 1) -> dict[str, float]:
        """Real tokens/s, model TFLOP/s and MFU of the last ``train`` phase, which ran `passes` times over
        sequences of these real lengths (this rank's)."""
        seconds = max(self.timer.last.get("train", 0.0), 1e-9)
        tokens_per_s = sum(sequence_lengths) * passes / seconds
        return {"train/learner_tokens_per_s": tokens_per_s} | self.flops.metrics(sequence_lengths, seconds, passes)

    def save(self, step: int, **state: Any) -> None:
        self.trainer_state.update(state, step=step, wandb_run_id=self.tracker.run_id)
        with self.timer("save"):
            save_checkpoint(self.accelerator, self.learner.model, self.learner.tokenizer, self.run_dir, step,
                            self.trainer_state, self.cfg, self.cfg.checkpoint.keep_last)

    def maybe_save(self, step: int, last: bool, **state: Any) -> bool:
        """A checkpoint at the last step and every ``checkpoint.save_every`` steps; whether this step saved one."""
        every = self.cfg.checkpoint.save_every
        due = bool(last or (every and step % every == 0))
        if due:
            self.save(step, **state)
        return due

    # ---- cleanup ----------------------------------------------------------------------------------
    def close(self) -> None:
        for closer in (self._close_engine, self._close_scorer, self.tracker.finish, self.learner.end_distributed):
            try:
                closer()
            except Exception as err:  # keep closing the rest
                logger.warning("cleanup step %s failed: %s", getattr(closer, "__name__", closer), err)

    def _close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def _close_scorer(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_new_run(run_dir: Path, resume: bool) -> None:
    """A run directory that already holds a run is continued only with ``--resume``."""
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(
            f"output_dir={run_dir} already holds a run: pass --resume {run_dir} to continue it, "
            "or choose another output_dir"
        )


def _check_world(num_processes: int) -> None:
    """A launcher that started several processes which each became a world of one would train N copies."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={launched} but accelerate built a world of 1 process: on CPU set ACCELERATE_USE_CPU=true "
            "(torchrun) or use `accelerate launch --multi_gpu --num_processes N` (see launch/cpu_2proc.yaml)"
        )
