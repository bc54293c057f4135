"""Ragged-batch data-parallel worker launched by ``tests/trainer/data/test_rank_micro_batches.py`` (not a test module).

Run once as a plain process (world 1, the reference) and once under
``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2`` (gloo DDP, world 2). Each case runs expert
iteration's SFT phase, the real `trainer.learners.ei.sft_on_kept`, on a fresh `Learner` (tiny GPT-2,
fp32, same seed) over a kept set whose size does not split evenly over the ranks:

- ``kept1``: 1 kept sample (fewer rows than ranks: rank 1 has no row at all), batch 4, 4 accumulation steps;
- ``kept5``: 5 kept samples in one batch of 8, 4 accumulation steps (rank 0: 3 micro-batches, rank 1: 2);
- ``kept5_short``: 5 kept samples, batches of 4 (the last holds 1 row), 2 accumulation steps, 2 epochs.

It records the parameters after the case, every gradient the optimizer stepped with (after the DDP
all-reduce and clipping), and per rank the forward passes and the metrics. The process group has a 60 s
timeout, so a rank left waiting in a collective fails instead of hanging. Rank 0 writes ``OUT/results.pt``.
Usage: ``python tests/ragged_worker.py MODEL_DIR OUT_DIR WORLD``.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (kept samples, ei.batch_size, ei.gradient_accumulation_steps, ei.ei_epochs)
CASES = {"kept1": (1, 4, 4, 1), "kept5": (5, 8, 4, 1), "kept5_short": (5, 4, 2, 2)}
LR = 2e-4


def kept_samples(n: int, vocab: int) -> list[Any]:
    """`n` seeded (prompt, response) samples of different lengths, the same on every rank."""
    from rollout.engines.protocol import Sample

    gen = torch.Generator().manual_seed(7 + n)
    out = []
    for i in range(n):
        prompt = torch.randint(10, vocab, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
        response = torch.randint(10, vocab, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen)
        out.append(Sample(i, prompt.tolist(), response.tolist(), "", [0.0] * len(response), "stop", 0))
    return out


def run_case(model_path: str, acc: Any, kept: int, batch_size: int, gas: int, epochs: int) -> dict[str, Any]:
    from accelerate.utils import gather_object

    from trainer.config_io import config_from_dict
    from trainer.learner import Learner
    from trainer.learners.ei import sft_on_kept

    cfg = config_from_dict({
        "seed": 0, "mode": "ei",
        "model": {"path": model_path, "dtype": "float32"},
        "optim": {"learning_rate": LR},
        "ei": {"batch_size": batch_size, "gradient_accumulation_steps": gas, "ei_epochs": epochs},
        "logging": {"wandb_mode": "disabled", "progress": False},
    })  # fmt: skip
    torch.manual_seed(0)
    learner = Learner(cfg.model, cfg.optim, acc)
    grads: list[torch.Tensor] = []

    def record_grad(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        flat = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads.append(torch.cat(flat).detach().clone())

    learner.optimizer.optimizer.register_step_pre_hook(record_grad)
    forwards = 0
    log_probs = learner.log_probs

    def counted(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        nonlocal forwards
        forwards += 1
        return log_probs(*args, **kwargs)

    learner.log_probs = counted  # type: ignore[method-assign]
    session = types.SimpleNamespace(cfg=cfg, accelerator=acc, learner=learner)
    before = torch.cat([p.detach().flatten().clone() for p in learner.unwrapped.parameters()])
    metrics = sft_on_kept(session, kept_samples(kept, len(learner.tokenizer)), step=1)  # type: ignore[arg-type]
    after = torch.cat([p.detach().flatten().clone() for p in learner.unwrapped.parameters()])
    result = {
        "params_before": before, "params": after, "grads": grads,
        "rank_forwards": gather_object([forwards]),
        "rank_metrics": gather_object([metrics]),
        "rank_param_sum": gather_object([float(after.double().sum())]),
    }  # fmt: skip
    learner.release_wrapper()  # before the process group goes (`Learner.release_wrapper`)
    return result


def main(model_path: str, out_dir: str, world: int) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))])
    if acc.num_processes != world:
        raise SystemExit(f"expected world size {world}, accelerate sees {acc.num_processes}")
    results: dict[str, Any] = {"world": acc.num_processes, "distributed_type": str(acc.distributed_type)}
    for name, case in CASES.items():
        results[name] = run_case(model_path, acc, *case)
    out = Path(out_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(results, out / "results.pt")
    acc.wait_for_everyone()
    acc.free_memory()
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # an abrupt exit, as in tests/dp_worker.py (a gloo teardown hang was seen there once)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
