"""Colocated vLLM engines in a data-parallel run: each rank's engine on its own GPU, ranks never coupled.

- `engine_gpu` (pure): which GPU an engine runs on; a colocated engine takes the learner's ``cuda:LOCAL_RANK``
  (vLLM's in-process executor would otherwise put every rank's engine on ``cuda:0``).
- `keep_default_group` (pure, a stand-in for vLLM's ``parallel_state``): closing an engine releases vLLM's
  world group, never the learner's default group; `release_gpu_assignment`: nor does it pin later engines of
  the process to its GPU.
- CPU, 2 gloo ranks (`tests/vllm_rank_worker.py`, slow): every rank builds a real tiny vLLM engine after
  accelerate made the default group, so vLLM adopts it (world 2, TP/PP/DP groups of one); rank 0 then
  generates alone while rank 1 waits in a barrier, and the other way round, within a bounded time; every
  rank's samples equal a single process's; after `close` the learner's group still all-reduces.
- GPU (2+ GPUs): a colocated engine built with ``learner_device="cuda:1"`` runs on GPU 1.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import REPO, launch_worlds

from rollout.engines.protocol import SamplingConfig, normalize_device
from rollout.engines.vllm import engine_gpu, keep_default_group, release_gpu_assignment

WORKER = REPO / "tests" / "vllm_rank_worker.py"
TIMEOUT_S = 300


@pytest.mark.parametrize(
    ("device", "learner_device", "current", "want"),
    [
        (None, "cuda:3", 3, "cuda:3"),  # colocated on rank 3: the learner's GPU
        (None, torch.device("cuda", 5), 0, "cuda:5"),  # the learner's device wins over the current one
        (None, None, 2, "cuda:2"),  # no learner device: this process's current GPU (accelerate set it)
        (None, "cuda", 4, "cuda:4"),  # a bare "cuda" is the current device
        (None, "cpu", 1, "cuda:1"),  # a CPU learner with CUDA present: vLLM still runs on a GPU
        (None, "cuda:3", None, None),  # no CUDA: vLLM's CPU backend, no GPU
        (None, None, None, None),
        ("cuda:1", "cuda:0", 0, "cuda:1"),  # dedicated: its own GPU, whatever the learner's
        ("cuda", None, 3, "cuda:3"),  # dedicated bare "cuda": the current device too, as config validation
        ("cuda", None, None, "cuda:0"),  # no CUDA: cuda:0, as normalize_device
    ],
)
def test_engine_gpu(device: str | None, learner_device: Any, current: int | None, want: str | None) -> None:
    got = engine_gpu(device, learner_device, current)
    assert got == (torch.device(want) if want is not None else None)
    assert got is None or got.index is not None  # vLLM's device_ids=[index]


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:2"])
def test_a_dedicated_engine_runs_where_config_validation_checked_it(device: str) -> None:
    """`trainer.cluster.validate_for_cluster` checks a dedicated engine's GPU as `normalize_device` resolves it."""
    for current in (0, 1, 3):
        assert engine_gpu(device, None, current) == normalize_device(device, current)


def test_engine_gpu_rejects_a_non_cuda_dedicated_device() -> None:
    with pytest.raises(ValueError, match="dedicated engine needs a CUDA device"):
        engine_gpu("cpu", None, None)


@pytest.mark.parametrize(
    ("placement", "want_device", "want_learner_device", "want_sleep"),
    [("colocated", None, torch.device("cuda", 3), True), ("dedicated", "cuda:1", None, False)],
)
def test_build_engine_places_vllm_on_the_learners_gpu(
    monkeypatch: pytest.MonkeyPatch, placement: str, want_device: str | None, want_learner_device: Any,
    want_sleep: bool,
) -> None:  # fmt: skip
    """`trainer.engines.build_engine` for learner rank 3 (``cuda:3``): a colocated engine is told the learner's
    device (and sleeps between rollouts); a dedicated one gets its own device only."""
    import rollout.engines.vllm
    from trainer.config_io import config_from_dict
    from trainer.engines import build_engine

    seen: dict[str, Any] = {}
    monkeypatch.setattr(rollout.engines.vllm, "VLLMEngine", lambda path, **kwargs: seen.update(kwargs))
    rollout_cfg = {"placement": placement} | ({"device": "cuda:1"} if placement == "dedicated" else {})
    cfg = config_from_dict({"model": {"path": "m"}, "rollout": rollout_cfg})
    build_engine(cfg, SimpleNamespace(device=torch.device("cuda", 3)))  # type: ignore[arg-type]
    assert seen["device"] == want_device and seen["learner_device"] == want_learner_device
    assert seen["enable_sleep_mode"] is want_sleep


def test_keep_default_group_destroys_only_vllms_world() -> None:
    """vLLM's cleanup ends with ``torch.distributed.destroy_process_group()``; with the learner's group adopted
    it must release vLLM's world coordinator only, then the original function comes back."""
    destroyed: list[str] = []
    world = SimpleNamespace(destroy=lambda: destroyed.append("vllm world"))

    def destroy_distributed_environment() -> None:
        destroyed.append("torch default group")

    ps = SimpleNamespace(
        _WORLD=world, _NODE_COUNT=1, destroy_distributed_environment=destroy_distributed_environment
    )
    ps.cleanup_dist_env_and_memory = lambda: ps.destroy_distributed_environment()
    with keep_default_group(ps):
        ps.cleanup_dist_env_and_memory()
    assert destroyed == ["vllm world"]
    assert ps._WORLD is None and ps._NODE_COUNT is None
    assert ps.destroy_distributed_environment is destroy_distributed_environment


def test_keep_default_group_matches_vllm() -> None:
    """The names `keep_default_group` relies on exist in the installed vLLM (0.26 and 0.32)."""
    pytest.importorskip("vllm")
    from vllm.distributed import parallel_state as ps

    assert callable(ps.destroy_distributed_environment) and callable(ps.cleanup_dist_env_and_memory)
    assert hasattr(ps, "_WORLD") and hasattr(ps, "_NODE_COUNT")


def test_release_gpu_assignment_lets_a_later_engine_use_another_gpu() -> None:
    """vLLM's worker records ``device_ids`` process-wide and raises on a different value; `VLLMEngine.close`
    releases it (a colocated engine on GPU 0, then a dedicated one on GPU 1, in one process)."""
    pytest.importorskip("vllm")
    from vllm.platforms import interface

    assert interface.get_assigned_physical_gpu_ids() is None
    try:
        interface.set_assigned_physical_gpu_ids([0])
        with pytest.raises(RuntimeError, match="conflicting"):
            interface.set_assigned_physical_gpu_ids([1])
        release_gpu_assignment()
        assert interface.get_assigned_physical_gpu_ids() is None
        interface.set_assigned_physical_gpu_ids([1])
        assert interface.get_assigned_physical_gpu_ids() == [1]
    finally:
        release_gpu_assignment()


# ---- two CPU ranks with real engines ------------------------------------------------------------------------
def _launch(model: str, out: Path) -> dict[int, dict[int, dict[str, Any]]]:
    launch_worlds(WORKER, lambda world: [model, str(out / f"w{world}")], out, TIMEOUT_S)
    return {
        world: {r: torch.load(out / f"w{world}" / f"rank{r}.pt", weights_only=False) for r in range(world)}
        for world in (1, 2)
    }


@pytest.fixture(scope="module")
def runs(
    tiny_qwen2_path: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, dict[int, dict[str, Any]]]:
    pytest.importorskip("vllm")
    return _launch(tiny_qwen2_path, tmp_path_factory.mktemp("vllm_ranks"))


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
def test_two_ranks_adopt_the_learner_group_and_generate_independently(
    runs: dict[int, dict[int, dict[str, Any]]],
) -> None:
    one, two = runs[1][0], runs[2]
    assert one["world"] == 1 and one["vllm_groups"] == {"world": 1, "tp": 1, "pp": 1, "dp": 1}
    for rank in (0, 1):
        assert two[rank]["world"] == 2 and two[rank]["distributed_type"] == "DistributedType.MULTI_CPU"
        # vLLM's world is the learner's group; every parallel group is this rank alone (external DP)
        assert two[rank]["vllm_groups"] == {"world": 2, "tp": 1, "pp": 1, "dp": 1}
    # rank 0 generated alone while rank 1 sat in the barrier, then the other way round: no vLLM collective
    assert "A" in two[0] and "A" not in two[1]
    assert "B" in two[1] and "B" not in two[0]
    assert two[0]["A"] == one["A"] and two[1]["B"] == one["B"]
    assert two[0]["C"] == two[1]["C"] == one["C"]
    assert all(len(one[k]) > 0 for k in "ABC")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
def test_close_keeps_the_learner_group(runs: dict[int, dict[int, dict[str, Any]]]) -> None:
    for rank in (0, 1):
        assert runs[2][rank]["group_after_close"], "closing vLLM destroyed the learner's process group"
        assert runs[2][rank]["all_reduce_after_close"] == 3.0


# ---- GPU ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.vllm
def test_gpu_colocated_engine_runs_on_the_learners_gpu(tiny_qwen2_path: str) -> None:
    """Rank 1 of a data-parallel run: the learner on cuda:1, its colocated engine there too (not cuda:0)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from rollout.engines.vllm import VLLMEngine

    torch.cuda.set_device(1)  # what accelerate does on local rank 1
    free_before = torch.cuda.mem_get_info(0)[0]
    engine = VLLMEngine(tiny_qwen2_path, learner_device="cuda:1", dtype="float32", gpu_memory_utilization=0.2,
                        max_model_len=512, enforce_eager=True)  # fmt: skip
    try:
        assert engine.device == torch.device("cuda", 1) and engine.sleep_supported  # colocated: sleeps
        assert torch.cuda.current_device() == 1
        devices = engine.llm.apply_model(lambda model: {str(p.device) for p in model.parameters()})[0]
        assert devices == {"cuda:1"}
        assert torch.cuda.mem_get_info(0)[0] > free_before - (256 << 20)  # GPU 0 got no weights / KV cache
        greedy = SamplingConfig(max_tokens=8, temperature=0.0, min_tokens=0, stop=())
        assert len(engine.generate([[5, 6, 7]], greedy)[0].response_ids) == 8
    finally:
        engine.close()
        torch.cuda.set_device(0)
