"""Helpers shared by several test files (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]


def repo_pythonpath() -> str:
    """PYTHONPATH for a subprocess: the repository first, then whatever this process was given (the lent GPU
    machine's carried wheels live there)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


LAUNCH_VARS = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ACCELERATE_USE_CPU",
    "CUDA_VISIBLE_DEVICES",
}


def launch_env(cpu_ddp: bool) -> dict[str, str]:
    """Environment for a launched CPU run: no inherited launcher variables, one thread, wandb off; with
    `cpu_ddp` accelerate makes the torchrun processes one gloo world."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": repo_pythonpath()}  # fmt: skip
    if cpu_ddp:  # without it accelerate runs each CPU process as its own world of 1 (silently)
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def session_pids(sid: int) -> list[int]:
    """Pids still in session `sid` (the launcher was started in a new session: all its descendants)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            alive.append(int(stat.parent.name))
    return alive


def perturbed(path: str, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """The tiny model after a pretend training step: every weight plus N(0, scale²) noise."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def capture_grads_at_step(learner: Any) -> dict[str, torch.Tensor]:
    """Make `learner.step` first copy every gradient into the returned dict (what the optimizer sees)."""
    captured: dict[str, torch.Tensor] = {}
    original_step = learner.step

    def capture_then_step() -> float:
        captured.update({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None})
        return float(original_step())

    learner.step = capture_then_step
    return captured


def tiny_vllm_engine(path: str) -> Any:
    """An in-process float32 `VLLMEngine` of the tiny Qwen2 with a small fixed KV cache (quick start-up)."""
    from rollout.vllm_engine import VLLMEngine

    return VLLMEngine(path, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_model_len=512)


def vllm_at_least(major: int, minor: int) -> bool:
    """Whether the installed vLLM is release `major.minor` or newer (CI: 0.32; the lent GPU: 0.26)."""
    import vllm
    from packaging.version import Version

    return Version(vllm.__version__).release[:2] >= (major, minor)
