"""GRPO step benchmark: seconds per step by phase (generate / score / old log-probs / train / sync / log).

Usage::

    python benchmarks/grpo_step.py                                   # CPU: configs/grpo_tiny_cpu.yaml, 8 steps
    python benchmarks/grpo_step.py --config configs/grpo_qwen2.5_math_1.5b_gsm8k.yaml --steps 5 \\
        model.path=/path/to/qwen2.5-math-1.5b-shaped-model           # GPU

Runs `train_grpo` for ``--steps`` steps (no warm start, evaluation only at the end, no checkpoints) and
prints the mean seconds of each phase over the steps after the first (which includes engine start-up and
compilation), plus rollout and learner throughput; the step total leaves out the final evaluation (which
the last step's record carries). ``log`` is the previous step's logging. Extra arguments are config
overrides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ["generate", "score", "old_log_probs", "train", "sync", "log"]


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "grpo_tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from trainer.config_io import load_config
    from trainer.learners.grpo import train_grpo
    from trainer.tools.tiny import build_tiny
    from trainer.tracking import read_metrics

    out = Path(tempfile.mkdtemp(prefix="grpo_bench_"))
    overrides = [f"output_dir={out / 'run'}", f"grpo.n_grpo_steps={args.steps}", "warmstart.steps=0",
                 "eval.every=0", "eval.limit=8", "logging.progress=false", "checkpoint.save_every=0"]
    if args.config.endswith("grpo_tiny_cpu.yaml") and not any(o.startswith("model.path=") for o in args.overrides):
        overrides.append(f"model.path={build_tiny(out / 'tiny')['tiny-qwen2']}")
    cfg = load_config(args.config, overrides + args.overrides)
    train_grpo(cfg)
    steps = [r for r in read_metrics(out / "run") if "time/train" in r][1:]
    if not steps:
        raise SystemExit("need --steps >= 2 (the first step is excluded)")

    def mean(key: str) -> float:
        return statistics.mean(float(r.get(key, 0.0)) for r in steps)

    total = statistics.mean(float(r["time/step"]) - float(r.get("time/eval", 0.0)) - float(r.get("time/save", 0.0))
                            for r in steps)
    print(f"\nGRPO step phases, mean of steps 2..{args.steps} ({cfg.grpo.rollout_batch_size} rollouts, "
          f"group {cfg.grpo.group_size}, max_tokens {cfg.rollout.max_tokens}, engine {cfg.rollout.engine})")
    print(f"{'phase':<16}{'seconds':>10}{'share':>9}")
    for phase in PHASES:
        seconds = mean(f"time/{phase}")
        print(f"{phase:<16}{seconds:>10.3f}{seconds / total:>9.1%}")
    print(f"{'step':<16}{total:>10.3f}")
    mfu = f"   MFU {mean('train/mfu'):.1%}" if "train/mfu" in steps[0] else ""
    print(f"rollout output tok/s {mean('rollout/output_tokens_per_s'):,.0f}   "
          f"learner tok/s {mean('train/learner_tokens_per_s'):,.0f}   "
          f"model TFLOP/s {mean('train/model_tflops_per_s'):,.2f}{mfu}")


if __name__ == "__main__":
    main()
