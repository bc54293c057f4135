"""The ``gloo`` weight-transfer backend of vLLM's weight-transfer engines: the server side, over TCP, on CPU.

vLLM's weight-transfer protocol (``/init_weight_transfer_engine``, then per update ``/start_weight_update``,
``/update_weights`` while the trainer broadcasts every tensor in the announced order, ``/finish_weight_update``)
ships with ``nccl`` (GPU) and ``ipc`` backends. `GlooWeightTransferEngine` is the same engine with the NCCL
communicator replaced by a gloo process group (`rollout.transfer.gloo_group`): it runs wherever the worker's
weights live in host memory (vLLM's CPU worker inherits the weight-transfer hooks of the GPU worker), and the
learner needs no storage shared with the server. Start and finish keep vLLM's layerwise reload of
checkpoint-format weights (as ``reload_weights`` does), so CPU-repacked layers are rebuilt.

`register` is a vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml): every vLLM
process of an environment where reasonrl is installed knows the backend name ``gloo``; the engine module is
imported only when a server is started with ``--weight-transfer-config '{"backend": "gloo"}'`` (what
``reasonrl rollout-server --weight-transfer gloo`` passes).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

from rollout.transfer import BACKEND_GLOO, gloo_group


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's dense NCCL engine (update info, layerwise start / finish) over a gloo group instead."""

    timeout_s = 600.0  # a trainer that stops sending mid-update: the worker's broadcast fails after this

    def init_transfer_engine(self, init_info: Any) -> None:
        """Join the trainer's group (the trainer is rank 0) at ``rank_offset`` + this worker's rank across the
        data-parallel replicas, as vLLM's NCCL engine numbers its workers."""
        config = self.parallel_config
        rank = init_info.rank_offset + config.data_parallel_index * config.world_size + config.rank
        self.model_update_group = gloo_group(  # a gloo ProcessGroup in PyNccl's place
            init_info.master_address, init_info.master_port, rank, init_info.world_size, self.timeout_s
        )

    def receive_weights(self, update_info: Any) -> None:
        """Receive each announced tensor (broadcast from rank 0) and load it at once (one tensor in memory)."""
        group = self.model_update_group
        if group is None:
            raise RuntimeError(
                "gloo weight transfer not initialized: call /init_weight_transfer_engine first"
            )
        for name, dtype_name, shape in zip(
            update_info.names, update_info.dtype_names, update_info.shapes, strict=True
        ):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name))
            group.broadcast(weight, 0).wait()  # ProcessGroup.broadcast(tensor, root)
            self.model.load_weights([(name, weight)])  # type: ignore[operator]

    def shutdown(self) -> None:
        self.model_update_group = None


def register() -> None:
    """vLLM general plugin: make ``gloo`` a weight-transfer backend (lazily imported; safe to call twice)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND_GLOO not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND_GLOO, __name__, "GlooWeightTransferEngine")
