"""Build the configured rollout engine for a learner, and sync weights into it with the stale-weight probe.

Placement (``rollout.placement``):

- ``colocated``: vLLM in the learner's process and device (sleeps between rollouts on CUDA), or the HF
  engine sharing the learner's live module (``rollout.engine: hf``; no copy, so a sync only bumps the
  policy version and the probe checks the shared module against itself);
- ``dedicated``: vLLM on its own device (``rollout.device``, e.g. ``cuda:1``);
- ``remote``: a rollout server (`reasonrl rollout-server`) at ``rollout.server_url``; weights go through
  ``rollout.weight_transfer_dir`` (filesystem mode, shared storage) or NCCL.
"""

from __future__ import annotations

from typing import Any

from rollout.engine import RolloutEngine
from rollout.probe import StaleWeightProbe
from trainer.config import RunConfig
from trainer.learner import DTYPES, Learner


def build_engine(cfg: RunConfig, learner: Learner) -> RolloutEngine:
    r = cfg.rollout
    if r.placement == "remote":
        from rollout.server import RemoteEngine

        return RemoteEngine(r.server_url or "", transfer="filesystem" if r.weight_transfer_dir else "nccl", weights_dir=r.weight_transfer_dir,
                            bucket_mb=r.sync_bucket_mb, sleep_between_rollouts=r.sleep_between_rollouts)
    if r.engine == "hf":
        from rollout.hf_engine import HFEngine

        return HFEngine(learner.unwrapped, learner.tokenizer)
    from rollout.vllm_engine import VLLMEngine

    on_cuda = learner.device.type == "cuda"
    return VLLMEngine(
        cfg.model.path, device=r.device if r.placement == "dedicated" else None, dtype=engine_dtype(cfg),
        gpu_memory_utilization=r.gpu_memory_utilization, max_model_len=r.max_model_len, seed=cfg.seed,
        enable_sleep_mode=r.sleep_between_rollouts and on_cuda and r.placement == "colocated",
        enforce_eager=r.enforce_eager, sync_bucket_mb=r.sync_bucket_mb,
    )


def engine_dtype(cfg: RunConfig) -> str:
    return cfg.rollout.dtype or cfg.model.dtype


def make_probe(cfg: RunConfig, learner: Learner) -> StaleWeightProbe:
    """The probe's default threshold follows the engine's dtype (bf16 kernels differ from the learner's)."""
    return StaleWeightProbe(tokenizer=learner.tokenizer, max_threshold=cfg.rollout.probe_threshold,
                            dtype=DTYPES[engine_dtype(cfg)], on_mismatch=cfg.rollout.probe_action)


def sync_and_probe(engine: RolloutEngine, learner: Learner, cfg: RunConfig,
                   probe: StaleWeightProbe | None = None) -> dict[str, float]:
    """Stream the learner's weights into `engine`, then compare log-probs on the probe sequence."""
    engine.update_weights(learner.weights(cfg.rollout.sync_bucket_mb))
    probe = probe or make_probe(cfg, learner)
    result = probe(engine, learner.unwrapped)
    metrics: dict[str, Any] = dict(getattr(engine, "metrics", {}))
    return {k: float(v) for k, v in metrics.items() if k.startswith("rollout/sync")} | result.metrics()
