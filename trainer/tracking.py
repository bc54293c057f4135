"""Metric tracking: a local ``metrics.jsonl`` always, plus wandb (online/offline) or nothing.

No caller asks "is wandb on?": `make_tracker` returns an object with `log`, `log_table`, `log_rollouts`
and `finish` whatever the mode; on ranks other than the main one it is a `NullTracker`, so only the main
process writes anything. Training rollouts (`log_rollouts`) always land in ``RUN_DIR/rollouts/step_N.jsonl``
as well, like the evaluation samples in ``RUN_DIR/eval/``. Metric names are namespaced (``train/…``, ``eval/…``, ``rollout/…``, ``time/…``,
``reward/…``); wandb gets two step axes, ``train_step`` for training and ``eval_step`` for evaluation.
A tracker that fails (network, disk, wandb bug) is logged once and disabled; training goes on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_EVAL_PREFIXES = ("eval/",)


class Tracker:
    """Writes metrics.jsonl; subclasses add a remote backend."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_id: str | None = None
        self._local_ok = True

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        if self._local_ok:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:  # a full or vanished disk must not stop training
                logger.warning("%s: cannot write metrics (%s); local metrics stop here, training goes on",
                               self.path, err)
                self._local_ok = False
        self._remote_log(metrics, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """A sample table (eval generations, training rollouts) on the axis of its name's namespace
        (``eval/…``: eval_step, else train_step); only remote backends show it."""

    def log_rollouts(self, rows: list[dict[str, Any]], step: int) -> Path | None:
        """Training rollouts of `step`: ``RUN_DIR/rollouts/step_N.jsonl`` always, and the ``rollout/samples``
        table; returns the JSONL path (None if it could not be written: logged, training goes on)."""
        path = self.run_dir / "rollouts" / f"step_{step:06d}.jsonl"
        written: Path | None = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in rows))
        except OSError as err:  # like metrics.jsonl: a full or vanished disk must not stop training
            logger.warning("%s: cannot write rollouts (%s); training goes on", path, err)
            written = None
        self.log_table("rollout/samples", rows, step)
        return written

    def finish(self) -> None:
        """Flush and close the remote backend."""

    def _remote_log(self, metrics: dict[str, float], step: int) -> None:
        """Send to the remote backend (none here)."""


class WandbTracker(Tracker):
    """wandb in online or offline mode; disabled (with one warning) on its first failure."""

    def __init__(self, run_dir: str | Path, mode: str, project: str, name: str | None,
                 config: dict[str, Any], resume_id: str | None = None) -> None:
        super().__init__(run_dir)
        self._run: Any = None
        try:
            import wandb

            self._run = wandb.init(
                project=project, name=name, mode=mode,  # type: ignore[arg-type]  # config-validated
                dir=str(run_dir), config=config, id=resume_id, resume="allow" if resume_id else None,
            )
            self._run.define_metric("train_step")
            self._run.define_metric("eval_step")
            for prefix in ("train", "rollout", "time", "reward"):
                self._run.define_metric(f"{prefix}/*", step_metric="train_step")
            self._run.define_metric("eval/*", step_metric="eval_step")
            self.run_id = self._run.id
        except Exception as err:  # a tracker must never stop training
            self._fail(err)

    def _remote_log(self, metrics: dict[str, float], step: int) -> None:
        if self._run is None:
            return
        axis = "eval_step" if any(k.startswith(_EVAL_PREFIXES) for k in metrics) else "train_step"
        try:
            self._run.log({**metrics, axis: step})
        except Exception as err:
            self._fail(err)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if self._run is None or not rows:
            return
        try:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=list[str | int](columns), data=[[r[c] for c in columns] for r in rows])
            axis = "eval_step" if name.startswith(_EVAL_PREFIXES) else "train_step"
            self._run.log({name: table, axis: step})
        except Exception as err:
            self._fail(err)

    def finish(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as err:
            self._fail(err)
        self._run = None

    def _fail(self, err: Exception) -> None:
        logger.warning("wandb disabled after error (metrics.jsonl still written): %s", err)
        self._run = None


def make_tracker(run_dir: str | Path, mode: str, project: str = "reasonrl", name: str | None = None,
                 config: dict[str, Any] | None = None, resume_id: str | None = None) -> Tracker:
    """The tracker for `mode` ("online", "offline" or "disabled": metrics.jsonl only)."""
    if mode == "disabled":
        return Tracker(run_dir)
    return WandbTracker(run_dir, mode, project, name, config or {}, resume_id)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (for plotting and tests). A torn last line (the run was killed
    while writing it) is left out; an undecodable line elsewhere is a `ValueError` naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            if line.strip():
                records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
    return records


def trim_metrics(run_dir: str | Path, last_step: int) -> int:
    """Before a run resumes from its step-`last_step` checkpoint: drop the records the interrupted run logged
    for later steps (the resumed run logs those steps again) and a torn last line, so that each step is in
    metrics.jsonl once and appends start on a fresh line. Other lines stay as they are. Returns how many
    records were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    text = path.read_text()
    lines = text.splitlines()
    kept = [line for number, line in enumerate(lines, 1) if _kept(line, number == len(lines), last_step)]
    if len(kept) < len(lines) or not text.endswith("\n"):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def _kept(line: str, last: bool, last_step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return not last  # a torn write ends the file; anything else is left for a reader to report
    step = record.get("step") if isinstance(record, dict) else None
    return not (isinstance(step, int) and step > last_step)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class NullTracker(Tracker):
    """For non-main ranks: logs nothing anywhere."""

    def __init__(self) -> None:
        self.run_id = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Drop the metrics."""

    def log_rollouts(self, rows: list[dict[str, Any]], step: int) -> Path | None:
        """Drop the rollouts."""
        return None
