"""Build the configured rollout engine for a learner (the weight sync into it is `trainer.sync`).

Placement (``rollout.placement``; the rules are checked by `trainer.config`, see its module docstring):

- ``colocated``: vLLM in the learner's process and device (sleeps between rollouts on CUDA), or the HF
  engine sharing the learner's live module (``rollout.engine: hf``, colocated only; no copy, so a sync only
  advances the policy version and the probe checks the shared module against itself). Under DeepSpeed
  ZeRO-3, where each rank holds only a shard of the learner, the HF engine holds a whole copy instead, which
  every sync fills from the gathered weights. One engine per rank.
- ``dedicated``: vLLM on its own device (``rollout.device``, e.g. ``cuda:1``; required); world size 1.
- ``remote``: a rollout server (`reasonrl rollout-server`) at ``rollout.server_url``; weights go through
  ``rollout.weight_transfer_dir`` (shared storage) or, with ``rollout.weight_transfer`` gloo / nccl, are
  broadcast to the server (`rollout.transfer`). All ranks share the one server (`shares_engine`): only rank
  0's client sends weights.
"""

from __future__ import annotations

from typing import Any

from rollout.engines.protocol import RolloutEngine, normalize_device
from trainer.config import RunConfig
from trainer.learner import Learner, load_model, whole_loading


def build_engine(cfg: RunConfig, learner: Learner) -> RolloutEngine:
    r = cfg.rollout
    if r.placement == "remote":
        from rollout.engines.remote import RemoteEngine

        if not r.server_url or (r.weight_transfer == "filesystem" and not r.weight_transfer_dir):  # not assert: -O
            raise ValueError("rollout.placement=remote needs rollout.server_url and rollout.weight_transfer_dir "
                             "(or rollout.weight_transfer=gloo|nccl)")
        accelerator = learner.accelerator
        sends = accelerator.is_main_process or not shares_engine(cfg, accelerator.num_processes)
        return RemoteEngine(r.server_url, weights_dir=r.weight_transfer_dir, bucket_mb=r.sync_bucket_mb,
                            sleep_between_rollouts=r.sleep_between_rollouts, sends_weights=sends,
                            timeout_s=r.request_timeout_s, inflight=cfg.grpo.inflight_weight_updates,
                            weight_transfer=r.weight_transfer)
    if r.engine == "hf":
        from rollout.engines.hf import HFEngine

        if learner.sharded:  # ZeRO-3: each rank generates alone, so from a whole copy that syncs receive
            with whole_loading(learner.accelerator):
                return HFEngine(load_model(cfg.model, learner.device).eval(), learner.tokenizer)
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


def shares_engine(cfg: RunConfig, world_size: int) -> bool:
    """All learner ranks use one engine (a remote server): only rank 0 may send it weights."""
    return cfg.rollout.placement == "remote" and world_size > 1


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
