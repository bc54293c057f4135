"""Colocated vLLM engines on several learner ranks; launched by ``tests/rollout/engines/test_vllm_ranks.py`` (not a test module).

Run as a plain process (world 1, the reference) and under ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2``
(one gloo world of 2, initialised by accelerate's `Accelerator`, as the learner's is). Every rank builds
the tiny Qwen2 `VLLMEngine` (vLLM's CPU backend, in-process) *after* the default group exists, so vLLM adopts
it, then syncs the same perturbed weights. What each rank generates:

- ``A``: rank 0 alone (as `Session.evaluate` with ranks sharing a server, or fewer questions than ranks) while rank 1
  waits in a barrier of the learner's group;
- ``B``: rank 1 alone, rank 0 waiting;
- ``C``: both ranks, the same prompts.

The world-1 run generates all three. Each rank then closes its engine and checks that the learner's default
group survived (an all-reduce over it). Writes ``OUT/rank<r>.pt``: the world, vLLM's group sizes, the samples
and the all-reduce result. Usage: ``python tests/vllm_rank_worker.py MODEL_DIR OUT_DIR``.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# the learner group's timeout: a rank stuck in a vLLM collective fails its barrier instead of hanging
WAIT_S = 120

PROMPTS = {
    "A": [[5, 6, 7], [8, 9]],
    "B": ["What is 2 + 3?", [11, 12, 13, 14]],
    "C": [[5, 6, 7]],
}


def main(model: str, out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from helpers import perturbed, tiny_vllm_engine

    from rollout.engines.protocol import SamplingConfig
    from rollout.weights import iter_state_dict

    state = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=WAIT_S))])
    rank, world = state.process_index, state.num_processes
    distributed = torch.distributed.is_initialized()
    assert distributed == (world > 1)
    record: dict[str, Any] = {"world": world, "distributed_type": str(state.distributed_type)}

    engine = tiny_vllm_engine(model)
    from vllm.distributed import parallel_state as ps

    record["vllm_groups"] = {
        "world": ps.get_world_group().world_size, "tp": ps.get_tp_group().world_size,
        "pp": ps.get_pp_group().world_size, "dp": ps.get_dp_group().world_size,
    }  # fmt: skip
    engine.update_weights(iter_state_dict(perturbed(model)))
    params = {
        "A": SamplingConfig(max_tokens=12, n=2, seed=3),
        "B": SamplingConfig(max_tokens=12, n=2, seed=4),
        "C": SamplingConfig(max_tokens=12, temperature=0.0, min_tokens=0, stop=()),
    }

    def generate(key: str) -> None:
        samples = engine.generate(PROMPTS[key], params[key])
        record[key] = [(s.prompt_index, s.response_ids, s.logprobs) for s in samples]

    waited: dict[str, float] = {}
    for key, alone in (("A", 0), ("B", 1), ("C", None)):
        if alone is None or rank == alone or not distributed:
            generate(key)
        if distributed:  # the others wait here, in the learner's group, not in any vLLM call
            start = time.perf_counter()
            torch.distributed.barrier()
            waited[key] = time.perf_counter() - start
    record["waited_s"] = waited

    engine.close()
    record["group_after_close"] = torch.distributed.is_initialized()
    if distributed and record["group_after_close"]:
        total = torch.tensor([float(rank + 1)])
        torch.distributed.all_reduce(total)
        record["all_reduce_after_close"] = float(total.item())
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
