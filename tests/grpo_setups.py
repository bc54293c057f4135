"""Small GRPO runs shared by the learner, asynchronous-GRPO and rollout-table tests: the tiny config with
quick overrides, its remote-placement variant, a random rollout batch, the LoRA override, and the CPU
demo's learning margins (their derivation is in tests/trainer/learners/test_grpo_learns.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import REPO

from trainer.config import RunConfig
from trainer.config_io import load_config
from trainer.data.batching import pack_token_ids
from trainer.learners.grpo import RolloutBatch
from trainer.tracking import read_metrics

TINY_CONFIG = REPO / "configs" / "grpo_tiny_cpu.yaml"
LORA = "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, up_proj]}"
REMOTE = ("rollout.engine=vllm", "rollout.placement=remote", "rollout.server_url=http://127.0.0.1:9",
          "rollout.sleep_between_rollouts=false")
SEEDS = (0, 1, 2)
MIN_MEAN_GAIN = 0.05
MIN_FORMAT_GAIN = 0.15


def small_config(model_path: str, out: Path, *extra: str) -> RunConfig:
    """The tiny GRPO config on the HF engine: 4 steps of 16 rollouts (groups of 4), 8 new tokens, no warm start."""
    return load_config(TINY_CONFIG, [
        f"model.path={model_path}", f"output_dir={out}", "rollout.engine=hf", "warmstart.steps=0",
        "grpo.n_grpo_steps=4", "grpo.rollout_batch_size=16", "grpo.group_size=4", "grpo.train_batch_size=16",
        "grpo.gradient_accumulation_steps=2", "rollout.max_tokens=8", "eval.max_tokens=8", "eval.limit=8",
        "eval.every=0", "reward.num_workers=1", "logging.progress=false", *extra,
    ])


def remote_config(model: str, out: Path, *extra: str) -> RunConfig:
    """`small_config` with a remote rollout server (an unreachable URL: tests replace the engine)."""
    return small_config(model, out, *REMOTE, f"rollout.weight_transfer_dir={out / 'weights'}", *extra)


def random_rollout_batch(seed: int = 0) -> RolloutBatch:
    """4 rollouts of different prompt/response lengths, random advantages and old log-probs."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 900, (int(n),), generator=gen).tolist() for n in (5, 3, 7, 4)]
    responses = [torch.randint(2, 900, (int(n),), generator=gen).tolist() for n in (6, 2, 4, 8)]
    tokens = pack_token_ids(prompts, responses, pad_id=1)
    return RolloutBatch(tokens, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.randn(4, generator=gen),
                        torch.zeros(tokens.labels.shape), torch.randn(tokens.labels.shape, generator=gen) - 3)


def before_after(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The evaluations at step 0 and step 30 of a learning run."""
    evals = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 30]
    return evals[0], evals[-1]
