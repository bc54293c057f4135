"""`reasonrl demo` (`make demo`): the embedded CPU default, end to end, with no downloads.

Builds the tiny Qwen2 + tokenizer under ``.tiny/`` (once), runs ``configs/grpo_tiny_cpu.yaml`` (SFT warm
start on synthetic arithmetic, then GRPO with vLLM rollouts), and prints held-out accuracy before and after
GRPO as a table, a plot of the curves, and the wall time with the torch thread count.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from trainer.config import ConfigError, RunConfig
from trainer.config_io import load_config
from trainer.learners.grpo import train_grpo
from trainer.tools.plot import plot_run
from trainer.tools.tiny import build_tiny
from trainer.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "grpo_tiny_cpu.yaml"
DEMO_MARKER = "reasonrl_demo.json"  # in a run directory a demo wrote: the next demo may replace it


def before_after_table(run_dir: str | Path) -> str:
    evals = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    if len(evals) < 2:
        raise RuntimeError(f"{run_dir}: expected evaluations before and after GRPO, found {len(evals)}")
    first, last = evals[0], evals[-1]
    rows = [("accuracy", "eval/accuracy"), ("format rate", "eval/format_rate"), ("mean length", "eval/mean_length")]
    lines = [f"{'held-out':<14}{'after SFT warm start':>22}{'after GRPO (step ' + str(last['step']) + ')':>24}"]
    lines += [f"{name:<14}{first[key]:>22.3f}{last[key]:>24.3f}" for name, key in rows]
    return "\n".join(lines)


def check_demo_out(out: str | Path) -> None:
    """The demo replaces its run directory: refuse, before anything is deleted, any `out` other than a new or
    empty folder or one an earlier demo wrote (it holds ``DEMO_MARKER``). A training run of your own (one with a
    ``config.yaml`` and checkpoints) is refused like any other folder."""
    path = Path(out)
    if not path.exists() or (path.is_dir() and (not any(path.iterdir()) or written_by_a_demo(path))):
        return
    if not path.is_dir():
        what = "a file"
    elif (path / "config.yaml").is_file():
        what = "a reasonrl run that no demo wrote"
    else:
        what = "a folder holding other files"
    raise FileExistsError(f"--out {out}: {what}; the demo deletes its run directory before it starts and deletes "
                          f"only one an earlier demo wrote (it holds {DEMO_MARKER}): give a new or empty folder")


def written_by_a_demo(path: Path) -> bool:
    """`path` holds ``DEMO_MARKER``, or is an unmarked run of the tiny model that ``make demo`` wrote before
    the demos marked their folders (its saved config: the demo's built-in ``tiny-qwen2``, ``output_dir`` itself)."""
    if (path / DEMO_MARKER).is_file():
        return True
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
        model, out = Path(saved["model"]["path"]), Path(saved["output_dir"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False
    return model.name == "tiny-qwen2" and out.resolve() == path.resolve()


def claim_demo_out(out: str | Path, demo: str) -> None:
    """Replace `out` (which `check_demo_out` accepted) with an empty folder marked as a demo's, so the next demo
    may replace it; marked before training starts, so an interrupted demo is replaced too."""
    shutil.rmtree(out, ignore_errors=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / DEMO_MARKER).write_text(json.dumps({"written_by": demo}) + "\n")


def check_demo_overrides(overrides: list[str] | None) -> None:
    moved = [o for o in overrides or [] if o.split("=", 1)[0] == "output_dir"]
    if moved:
        raise ConfigError([f"{moved[0]}: the demo's run directory is --out"], "command line")


def demo_config(out: str | Path, overrides: list[str] | None = None, tiny_root: str | Path = ".tiny") -> RunConfig:
    """The demo's config, after refusing an `out` it may not replace and a mistyped override: nothing is built,
    deleted or loaded before these checks."""
    check_demo_out(out)
    check_demo_overrides(overrides)
    tiny = Path(tiny_root) / "tiny-qwen2"
    return load_config(DEMO_CONFIG, [f"output_dir={out}", f"model.path={tiny}", *(overrides or [])])


def run_demo(out: str = "runs/demo", overrides: list[str] | None = None, tiny_root: str | Path = ".tiny") -> str:
    cfg = demo_config(out, overrides, tiny_root)
    tiny = Path(tiny_root) / "tiny-qwen2"
    if not (tiny / "config.json").exists():
        build_tiny(tiny_root)
    claim_demo_out(out, "reasonrl demo")
    start = time.perf_counter()
    train_grpo(cfg)
    table = before_after_table(out)
    print(table)
    print(f"curves: {plot_run(out)}")
    print(f"demo: {time.perf_counter() - start:.0f} s for the warm start and {cfg.grpo.n_grpo_steps} GRPO steps, "
          f"{_torch_threads()} torch thread(s) (OMP_NUM_THREADS chooses; trainer.threads)")
    return table


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
