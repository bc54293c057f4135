"""Rollout-engine placement rules (`trainer.config.placement_problems`, `trainer.cluster.validate_for_cluster`)
and the shared-engine weight sync (`trainer.sync.sync_weights`): pure config and fakes, no GPU (fake
``cuda:N`` strings)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import trainer.engines as engines
import trainer.sync as sync
from rollout.engines.protocol import normalize_device
from rollout.weights import WeightStream, next_version
from trainer.cluster import validate_for_cluster
from trainer.config import ConfigError, RunConfig
from trainer.config_io import config_from_dict

# one rank's batch arithmetic that splits over any world size used here
GRPO = {"rollout_batch_size": 32, "group_size": 4, "train_batch_size": 32, "gradient_accumulation_steps": 4}


def config(**rollout: Any) -> RunConfig:
    return config_from_dict({"model": {"path": "m"}, "grpo": GRPO, "rollout": rollout})


def problems(**rollout: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(**rollout)
    return info.value.problems


def cluster_problems(cfg: RunConfig, world_size: int, devices: list[str], cuda_devices: int = 8) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_for_cluster(cfg, world_size, devices, cuda_devices=cuda_devices)
    return info.value.problems


# ---- load-time rules -------------------------------------------------------------------------------------
def test_valid_placements_load() -> None:
    config()
    config(engine="hf")
    config(placement="dedicated", device="cuda:1")
    config(placement="remote", server_url="http://h:8000", weight_transfer_dir="/shared/w")


@pytest.mark.parametrize("placement", ["dedicated", "remote"])
def test_hf_engine_is_colocated_only(placement: str) -> None:
    (problem, *_) = problems(engine="hf", placement=placement, device="cuda:1", server_url="http://h:8000",
                             weight_transfer_dir="/w")
    assert f"rollout.engine=hf with rollout.placement={placement}" in problem
    assert "Set rollout.placement=colocated" in problem


def test_dedicated_needs_a_device() -> None:
    assert problems(placement="dedicated") == [
        "rollout.placement=dedicated needs rollout.device, the engine's own GPU (e.g. cuda:1, not a learner's): "
        "set it, or use rollout.placement=colocated to share the learner's GPU (sleep/wake)"
    ]


@pytest.mark.parametrize("device", ["cpu", "gpu1", "cuda:x", "1"])
def test_dedicated_device_must_be_cuda(device: str) -> None:
    (problem,) = problems(placement="dedicated", device=device)
    assert problem.startswith(f"rollout.device={device!r}: a dedicated engine is vLLM on its own GPU")


def test_remote_needs_server_url_and_weight_transfer_dir() -> None:
    found = problems(placement="remote")
    assert len(found) == 2
    assert "rollout.placement=remote needs rollout.server_url" in found[0]
    assert "rollout.placement=remote needs rollout.weight_transfer_dir" in found[1]
    assert "serves with --weights-dir" in found[1]  # names the server option the directory pairs with
    (only,) = problems(placement="remote", server_url="http://h:8000")
    assert "weight_transfer_dir" in only
    assert "rollout.weight_transfer=gloo (CPU) or nccl (GPU)" in only  # the way without shared storage
    for backend in ("gloo", "nccl"):  # a broadcast needs no directory
        cfg = config(placement="remote", server_url="http://h:8000", weight_transfer=backend)
        assert cfg.rollout.weight_transfer == backend and cfg.rollout.weight_transfer_dir is None


def test_placement_problems_are_reported_with_field_errors() -> None:
    """A field error elsewhere does not hide the placement problems (collected together, like batch checks)."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"path": "m"}, "grpo": GRPO, "optim": {"learning_rate": -1},
                          "rollout": {"placement": "dedicated", "engine": "hf", "bogus": 1}})
    text = str(info.value)
    assert "optim.learning_rate=-1" in text
    assert "rollout.bogus: unknown key" in text
    assert "rollout.engine=hf with rollout.placement=dedicated" in text
    assert "rollout.placement=dedicated needs rollout.device" in text
    assert len(info.value.problems) == 4


def test_probe_mean_threshold_reaches_the_probe() -> None:
    assert config().rollout.probe_mean_threshold is None
    assert any("probe_mean_threshold" in p for p in problems(probe_mean_threshold=0))
    tokenizer = lambda text, add_special_tokens: {"input_ids": [1, 2, 3]}  # noqa: E731
    learner: Any = SimpleNamespace(tokenizer=tokenizer, accelerator=SimpleNamespace(mixed_precision="no"))
    probe = sync.make_probe(config(probe_threshold=0.7, probe_mean_threshold=0.2), learner)
    assert (probe.max_threshold, probe.mean_threshold) == (0.7, 0.2)
    default = sync.make_probe(config(), learner)  # bf16 engine: the dtype defaults
    assert (default.max_threshold, default.mean_threshold) == (1.0, 0.05)


# ---- cluster rules -------------------------------------------------------------------------------------------
def test_bare_cuda_is_the_current_device() -> None:
    assert normalize_device("cuda") == torch.device("cuda", 0)  # no CUDA here: index 0
    assert normalize_device(torch.device("cuda", 3)) == torch.device("cuda:3")
    assert normalize_device("cpu") == torch.device("cpu")
    assert normalize_device("cuda", 2) == torch.device("cuda:2")  # a given current device (vLLM's engine_gpu)
    assert normalize_device("cuda:1", 2) == torch.device("cuda:1")


def test_dedicated_on_the_single_gpu_learners_bare_cuda_is_rejected() -> None:
    """accelerate reports a single-process GPU learner as ``cuda``: the same GPU as ``cuda:0``."""
    (problem,) = cluster_problems(config(placement="dedicated", device="cuda:0"), 1, ["cuda"])
    assert problem.startswith("rollout.device=cuda:0 is also a learner device (learners on cuda:0)")
    (problem,) = cluster_problems(config(placement="dedicated", device="cuda"), 1, ["cuda:0"])
    assert problem.startswith("rollout.device=cuda (= cuda:0) is also a learner device")


def test_dedicated_checks_every_ranks_learner_device() -> None:
    """Rank 1 (learner cuda:1) must reject an engine on rank 0's learner GPU: it gets the node's whole list."""
    found = cluster_problems(config(placement="dedicated", device="cuda:0"), 2, ["cuda:1", "cuda:0"])
    assert any("rollout.device=cuda:0 is also a learner device (learners on cuda:0, cuda:1)" in p for p in found)


def test_dedicated_needs_world_size_1() -> None:
    (problem,) = cluster_problems(config(placement="dedicated", device="cuda:2"), 2, ["cuda:0", "cuda:1"])
    assert problem.startswith("rollout.placement=dedicated with world size 2: rollout.device=cuda:2 names one GPU")
    assert "rollout.placement=remote" in problem
    validate_for_cluster(config(placement="dedicated", device="cuda:1"), 1, ["cuda:0"], cuda_devices=2)


def test_dedicated_device_must_exist_on_the_node() -> None:
    cfg = config(placement="dedicated", device="cuda:2")
    (problem,) = cluster_problems(cfg, 1, ["cuda:0"], cuda_devices=2)
    assert problem == "rollout.device=cuda:2: this node has 2 CUDA device(s) (cuda:0..cuda:1)"
    (problem,) = cluster_problems(cfg, 1, ["cpu"], cuda_devices=0)
    assert "this node has no CUDA device" in problem


def test_remote_with_several_ranks_must_not_sleep_the_shared_server() -> None:
    remote = {"placement": "remote", "server_url": "http://h:8000", "weight_transfer_dir": "/w"}
    (problem,) = cluster_problems(config(**remote), 2, ["cuda:0", "cuda:1"])
    assert problem.endswith("Set rollout.sleep_between_rollouts=false")
    validate_for_cluster(config(**remote, sleep_between_rollouts=False), 2, ["cuda:0", "cuda:1"])
    validate_for_cluster(config(**remote), 1, ["cuda:0"])


def test_asynchronous_grpo_must_not_sleep_the_remote_server() -> None:
    """The server generates while the learner trains: a sleep between rollouts would abort the producer's
    requests. The default (sleep on) is refused with the setting to change; off, or synchronous, loads."""
    remote = {"placement": "remote", "server_url": "http://h:8000", "weight_transfer_dir": "/w"}
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"path": "m"}, "grpo": GRPO | {"max_staleness": 1}, "rollout": remote})
    (problem,) = info.value.problems
    assert "grpo.max_staleness=1 with rollout.sleep_between_rollouts=true" in problem
    assert problem.endswith("Set rollout.sleep_between_rollouts=false")
    config_from_dict({"model": {"path": "m"}, "grpo": GRPO | {"max_staleness": 1},
                      "rollout": remote | {"sleep_between_rollouts": False}})
    config(**remote)


# ---- learner devices and the shared-engine sync ------------------------------------------------------------
def test_node_learner_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    single: Any = SimpleNamespace(device=torch.device("cuda"), num_processes=1)
    assert engines.node_learner_devices(single) == ["cuda:0"]
    # rank 3 = local rank 1 on the node whose ranks start at 2; ranks 0-1 are another node's
    everyone = [(0, "cuda:0"), (0, "cuda:1"), (2, "cuda:0"), (2, "cuda:1")]
    gathered: list[Any] = []
    monkeypatch.setattr("accelerate.utils.gather_object", lambda obj: gathered.append(obj) or everyone)
    rank3: Any = SimpleNamespace(device=torch.device("cuda:1"), num_processes=4, process_index=3,
                                 local_process_index=1)
    assert engines.node_learner_devices(rank3) == ["cuda:0", "cuda:1"]
    assert gathered == [[(2, "cuda:1")]]


class _Engine:
    """Records the streams it is sent; advances its version as every engine does (`next_version`)."""

    def __init__(self, version: int) -> None:
        self._version = version
        self.streams: list[WeightStream] = []
        self.metrics = {"rollout/sync_s": 1.0, "rollout/output_tokens_per_s": 2.0}

    @property
    def policy_version(self) -> int:
        return self._version

    def update_weights(self, weights: Any) -> None:
        list(weights)
        self.streams.append(weights)
        self._version = next_version(weights, self._version)


def _sync(cfg: RunConfig, rank: int, world: int, engine: _Engine, version: int | None = None) -> dict[str, float]:
    barriers.clear()
    accelerator = SimpleNamespace(num_processes=world, is_main_process=rank == 0,
                                  wait_for_everyone=lambda: barriers.append(rank))
    learner: Any = SimpleNamespace(accelerator=accelerator, unwrapped=torch.nn.Linear(2, 2))
    probe: Any = lambda engine, model: SimpleNamespace(metrics=lambda: {"rollout/probe_ok": 1.0})  # noqa: E731
    return sync.sync_weights(engine, learner, cfg, probe, version)  # type: ignore[arg-type]


barriers: list[int] = []
REMOTE = {"placement": "remote", "server_url": "http://h:8000", "weight_transfer_dir": "/w"}


def test_shared_remote_engine_every_rank_takes_rank_0s_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks, one server: every rank's engine gets the learner's stream (only rank 0's client sends it,
    `test_shared_remote_engine_only_rank_0_sends`), stamped with rank 0's next version (broadcast first),
    and the barrier holds rank 1 until the server has the weights."""
    broadcasts: list[int] = []
    rank0_version = 6

    def broadcast(value: int) -> int:
        broadcasts.append(value)
        return rank0_version

    monkeypatch.setattr(sync, "broadcast_from_main", broadcast)
    cfg = config(**REMOTE, sleep_between_rollouts=False)
    rank0 = _Engine(5)
    metrics = _sync(cfg, 0, 2, rank0)
    assert (len(rank0.streams), rank0.streams[0].version, rank0.policy_version, barriers) == (1, 6, 6, [0])
    assert metrics == {"rollout/sync_s": 1.0, "rollout/probe_ok": 1.0}
    rank1 = _Engine(2)  # a stale local count: it takes rank 0's
    _sync(cfg, 1, 2, rank1)
    assert (len(rank1.streams), rank1.policy_version, barriers) == (1, 6, [1])
    assert broadcasts == [6, 3]


def test_shared_remote_engine_only_rank_0_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """`build_engine` gives rank 0 the sending client of the shared server, the other ranks clients that only
    read the stream; a remote engine of its own (world size 1) sends."""
    built: list[dict[str, Any]] = []
    monkeypatch.setattr("rollout.engines.remote.RemoteEngine", lambda url, **kwargs: built.append(kwargs))
    cfg = config(**REMOTE, sleep_between_rollouts=False)
    for rank, world in ((0, 2), (1, 2), (0, 1)):
        learner: Any = SimpleNamespace(accelerator=SimpleNamespace(num_processes=world, is_main_process=rank == 0))
        engines.build_engine(cfg, learner)
    assert [kwargs["sends_weights"] for kwargs in built] == [True, False, True]


@pytest.mark.parametrize(("rollout", "world"), [({}, 2), (REMOTE, 1)])
def test_own_engines_are_synced_on_every_rank(monkeypatch: pytest.MonkeyPatch, rollout: dict[str, str],
                                              world: int) -> None:
    def no_broadcast(value: int) -> int:
        raise AssertionError("no shared engine: no broadcast")

    monkeypatch.setattr(sync, "broadcast_from_main", no_broadcast)
    for rank in range(world):
        engine = _Engine(0)
        _sync(config(**rollout), rank, world, engine)
        assert (len(engine.streams), engine.policy_version, barriers) == (1, 1, [])


def test_a_resumed_sync_takes_the_checkpoints_version() -> None:
    """The engine takes the version the learner asks for (a resumed run's checkpoint), not its next one."""
    engine = _Engine(0)
    _sync(config(), 0, 1, engine, version=9)
    assert engine.policy_version == 9


def test_broadcast_from_main_in_one_process() -> None:
    assert sync.broadcast_from_main(4) == 4


def test_build_engine_refuses_remote_without_weight_transfer_dir() -> None:
    cfg = config(**REMOTE)
    cfg.rollout.weight_transfer_dir = None  # validation already rejects this; build_engine must too
    with pytest.raises(ValueError, match="weight_transfer_dir"):
        engines.build_engine(cfg, None)  # type: ignore[arg-type]
