"""Build the configured rollout engine for a learner, and sync weights into it with the stale-weight probe.

Placement (``rollout.placement``; the rules are checked by `trainer.config`, see its module docstring):

- ``colocated``: vLLM in the learner's process and device (sleeps between rollouts on CUDA), or the HF
  engine sharing the learner's live module (``rollout.engine: hf``, colocated only; no copy, so a sync only
  bumps the policy version and the probe checks the shared module against itself). One engine per rank.
- ``dedicated``: vLLM on its own device (``rollout.device``, e.g. ``cuda:1``; required); world size 1.
- ``remote``: a rollout server (`reasonrl rollout-server`) at ``rollout.server_url``; weights go through
  ``rollout.weight_transfer_dir`` (filesystem mode, shared storage; required: the trainer side of NCCL
  transfer is not wired). All ranks share the one server: only rank 0 sends weights (`sync_and_probe`).
"""

from __future__ import annotations

from typing import Any

from rollout.engines.protocol import RolloutEngine, normalize_device
from rollout.probe import StaleWeightProbe
from trainer.config import RunConfig
from trainer.learner import DTYPES, Learner


def build_engine(cfg: RunConfig, learner: Learner) -> RolloutEngine:
    r = cfg.rollout
    if r.placement == "remote":
        from rollout.engines.remote import RemoteEngine

        if not (r.server_url and r.weight_transfer_dir):  # config validation rejects this; not assert: -O
            raise ValueError("rollout.placement=remote needs rollout.server_url and rollout.weight_transfer_dir")
        return RemoteEngine(r.server_url, transfer="filesystem", weights_dir=r.weight_transfer_dir,
                            bucket_mb=r.sync_bucket_mb, sleep_between_rollouts=r.sleep_between_rollouts)
    if r.engine == "hf":
        from rollout.engines.hf import HFEngine

        return HFEngine(learner.unwrapped, learner.tokenizer)
    from rollout.engines.vllm import VLLMEngine

    on_cuda = learner.device.type == "cuda"
    dedicated = r.placement == "dedicated"
    return VLLMEngine(  # colocated: on the learner's own GPU (cuda:LOCAL_RANK), not vLLM's default cuda:0
        cfg.model.path, device=r.device if dedicated else None,
        learner_device=None if dedicated else learner.device, dtype=engine_dtype(cfg),
        gpu_memory_utilization=r.gpu_memory_utilization, max_model_len=r.max_model_len, seed=cfg.seed,
        enable_sleep_mode=r.sleep_between_rollouts and on_cuda and r.placement == "colocated",
        enforce_eager=r.enforce_eager, sync_bucket_mb=r.sync_bucket_mb,
    )


def engine_dtype(cfg: RunConfig) -> str:
    return cfg.rollout.dtype or cfg.model.dtype


def make_probe(cfg: RunConfig, learner: Learner) -> StaleWeightProbe:
    """The probe's default thresholds follow the engine's dtype (bf16 kernels differ from the learner's)."""
    return StaleWeightProbe(tokenizer=learner.tokenizer, max_threshold=cfg.rollout.probe_threshold,
                            mean_threshold=cfg.rollout.probe_mean_threshold,
                            dtype=DTYPES[engine_dtype(cfg)], on_mismatch=cfg.rollout.probe_action)


def node_learner_devices(accelerator: Any) -> list[str]:
    """Every learner rank's device on this node, indexed (``cuda:N``), for `validate_for_cluster`.

    A collective with several processes (call on every rank): each rank's own device, normalised where it
    lives (a bare ``cuda`` is that process's current device), is gathered with the node's first global rank
    (``process_index - local_process_index``, the same for all ranks of a node under torchrun / accelerate)."""
    own = str(normalize_device(accelerator.device))
    if accelerator.num_processes == 1:
        return [own]
    from accelerate.utils import gather_object

    node = accelerator.process_index - accelerator.local_process_index
    pairs = gather_object([(node, own)])
    return sorted({device for n, device in pairs if n == node})


def shares_engine(cfg: RunConfig, world_size: int) -> bool:
    """All learner ranks use one engine (a remote server): only rank 0 may send it weights."""
    return cfg.rollout.placement == "remote" and world_size > 1


def sync_and_probe(engine: RolloutEngine, learner: Learner, cfg: RunConfig,
                   probe: StaleWeightProbe | None = None) -> dict[str, float]:
    """Stream the learner's weights into `engine`, then compare log-probs on the probe sequence. Call on every
    rank.

    Each rank syncs its own engine, except where the ranks share one (`shares_engine`: a remote server with
    several ranks). There rank 0 alone sends; the others iterate the same weight stream without sending
    (`ModelWeights.drain`: under ZeRO-3 every bucket's gather is a collective) and then take rank 0's policy
    version from a broadcast, which also holds them until the server has the new weights. Every rank then
    probes (the learner's forward is collective under ZeRO-3, and a stale engine must stop every rank alike).
    If rank 0's send fails, the other ranks wait in the gather or broadcast until the process group's
    timeout.
    """
    weights = learner.weights(cfg.rollout.sync_bucket_mb)
    accelerator = learner.accelerator
    shared = shares_engine(cfg, accelerator.num_processes)
    if shared and not accelerator.is_main_process:
        weights.drain()
    else:
        engine.update_weights(weights)
    if shared:
        engine.policy_version = broadcast_from_main(engine.policy_version)
    probe = probe or make_probe(cfg, learner)
    result = probe(engine, learner.unwrapped)
    metrics: dict[str, Any] = dict(getattr(engine, "metrics", {}))
    return {k: float(v) for k, v in metrics.items() if k.startswith("rollout/sync")} | result.metrics()


def broadcast_from_main(value: int) -> int:
    """Rank 0's `value` on every rank (a collective)."""
    from accelerate.utils import broadcast_object_list

    return int(broadcast_object_list([value], from_process=0)[0])
