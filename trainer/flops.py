"""Model FLOPs and model-FLOPs utilisation (MFU) of the learner, as in PaLM (Chowdhery et al. 2022, App. B).

A training step (forward + backward) on a sequence of ``T`` tokens costs
``6·N·T + 12·L·d·T²`` FLOPs for a transformer with ``N`` matmul parameters, ``L`` layers and width ``d``:
``6N`` per token for the weight matmuls (2 forward, 4 backward) plus ``12·L·d·T`` per token for the
attention scores and values (PaLM's count, which ignores the causal mask). ``N`` is every parameter except
the input-embedding table when it is not tied to the output projection (a lookup, not a matmul).
Attention is counted per sequence on its real length, so padding is never counted as useful work: a layout
that wastes compute on padding shows as lower MFU.

``MFU = achieved model FLOP/s / peak FLOP/s``. The peak is ``logging.peak_tflops`` when set, else looked up
from the CUDA device name (dense bf16 tensor-core peaks below); unknown devices and CPUs report no MFU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters used in matmuls: all of them but an untied input-embedding table (ZeRO-3 aware)."""
    total = sum(_numel(p) for p in model.parameters())
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    output = get_out() if callable(get_out) else None
    if embedding is None or (output is not None and output.weight is embedding.weight):
        return total
    return total - _numel(embedding.weight)


def _numel(p: torch.Tensor) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it away (`ds_numel`)."""
    return int(getattr(p, "ds_numel", p.numel()))


def train_flops(n_params: int, n_layers: int, hidden: int, sequence_lengths: Iterable[int]) -> float:
    """Forward + backward model FLOPs of sequences of the given real lengths (module docstring)."""
    lengths = [int(t) for t in sequence_lengths]
    return float(6 * n_params * sum(lengths) + 12 * n_layers * hidden * sum(t * t for t in lengths))


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """The device's peak TFLOP/s: `configured`, else the table above by CUDA device name, else None."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


class FlopCounter:
    """Model FLOP/s and MFU of a learner phase: ``metrics(lengths, seconds, passes)`` for one rank's sequences."""

    def __init__(self, model: torch.nn.Module, device: torch.device, configured_peak_tflops: float | None = None):
        config = getattr(model, "config", None)
        self.n_params = matmul_parameters(model)
        self.n_layers = int(getattr(config, "num_hidden_layers", 0))
        self.hidden = int(getattr(config, "hidden_size", 0))
        self.peak = peak_tflops(device, configured_peak_tflops)

    def metrics(self, sequence_lengths: Iterable[int], seconds: float, passes: int = 1) -> dict[str, float]:
        """``train/model_tflops_per_s`` of this rank, and ``train/mfu`` where the peak is known."""
        flops = passes * train_flops(self.n_params, self.n_layers, self.hidden, sequence_lengths)
        achieved = flops / max(seconds, 1e-9) / 1e12
        out = {"train/model_tflops_per_s": achieved}
        if self.peak:
            out["train/mfu"] = achieved / self.peak
        return out
