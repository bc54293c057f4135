"""Checkpoints: atomic, resumable, loadable by `from_pretrained` and by vLLM.

Layout of ``RUN_DIR/checkpoints/step_000010/``:

- ``hf/``: model + tokenizer in HF format (what `reasonrl eval`, vLLM and users load);
- ``state/``: `Accelerator.save_state` (optimizer, scheduler, RNG states of every process; DeepSpeed
  shards when DeepSpeed is on);
- ``trainer_state.json``: step, policy version, data-iterator state, wandb run id;
- ``config.yaml``: the resolved config.

A checkpoint is written into ``step_N.tmp`` and renamed when complete, so a crash mid-save never leaves
a directory that looks finished. Only the newest `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.config import RunConfig, save_config

_PREFIX = "step_"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary ``.tmp`` directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir()
            if p.name.startswith(_PREFIX) and p.suffix != ".tmp" and (p / "trainer_state.json").exists()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Any, model: torch.nn.Module, tokenizer: Any, run_dir: str | Path,
                    step: int, trainer_state: dict[str, Any], config: RunConfig, keep_last: int) -> Path:
    """Write a checkpoint atomically; every process calls this (DeepSpeed gathers collectively)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    accelerator.wait_for_everyone()  # every rank's RNG/optimizer shard is on disk before the rename
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / "hf", state_dict=state_dict)
        tokenizer.save_pretrained(tmp / "hf")
        save_config(config, tmp / "config.yaml")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str | Path) -> dict[str, Any]:
    """Restore optimizer/scheduler/RNG/model state into the prepared objects; returns trainer_state."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    accelerator.load_state(str(path / "state"))
    state: dict[str, Any] = json.loads(state_file.read_text())
    return state
