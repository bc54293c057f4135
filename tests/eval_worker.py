"""Held-out evaluation under data parallelism; launched by ``tests/trainer/test_dp_eval.py`` (not a test module).

Run as a plain process (world 1, the reference) and under ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2``
(one gloo world of 2). Each builds a `Session` for the tiny GRPO config on the HF engine and runs
`Session.evaluate` once (7 questions, N samples each, at temperature 1). Rank 0 writes the run under
``OUT_DIR/run`` and ``OUT_DIR/shares.json``: how many samples each rank's engine drew.
Usage: ``python tests/eval_worker.py MODEL_DIR OUT_DIR WORLD N``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = 7


def main(model_path: str, out_dir: str, world: int, samples_per_question: int) -> None:
    from accelerate.utils import gather_object

    from trainer.config_io import load_config
    from trainer.session import Session

    out = Path(out_dir)
    cfg = load_config(REPO / "configs" / "grpo_tiny_cpu.yaml", [
        f"model.path={model_path}", f"output_dir={out / 'run'}", "rollout.engine=hf", "warmstart.steps=0",
        f"eval.limit={QUESTIONS}", "eval.max_tokens=8", "eval.temperature=1.0", "reward.num_workers=1",
        "logging.progress=false", f"eval.samples_per_question={samples_per_question}",
    ])  # fmt: skip
    with Session(cfg) as s:
        if s.accelerator.num_processes != world:
            raise SystemExit(f"expected world size {world}, accelerate sees {s.accelerator.num_processes}")
        s.evaluate(0)
        sampled = int(s.engine.metrics.get("rollout/samples", 0))  # this rank's last generation
        shares = gather_object([sampled]) if world > 1 else [sampled]
        if s.is_main:
            (out / "shares.json").write_text(json.dumps(shares))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
