"""Streaming, bucketed weight sync from a learner to a rollout engine (no vLLM import here).

The learner's weights reach an engine as an iterator of (HF name, tensor): the engine consumes one tensor
at a time, so no second full copy of the state dict is ever built.

- `ModelWeights(model, bucket_mb)`: the learner's state dict as a re-iterable stream. A plain module yields
  views of its tensors (no copy). Under DeepSpeed ZeRO-3 (parameters carry ``ds_id``) parameters are
  gathered ``bucket_mb`` at a time with ``deepspeed.zero.GatheredParameters`` and yielded as clones, so at
  most one bucket is gathered at once; deepspeed is imported only when such parameters exist. The gather is
  a collective: every rank iterates (``ModelWeights(model).drain()`` on ranks that send nothing).
- `convert_bucketed(pairs, device, dtype, bucket_bytes)`: casts / moves tensors to the engine's device and
  dtype a bucket at a time (a dedicated-GPU engine); tensors already right pass through uncopied.
- `write_safetensors_shards(pairs, out_dir, bucket_bytes)`: the filesystem transfer mode; one
  ``bucket_bytes`` shard in memory at a time.

Naive twin of all of these: the whole state dict at once (under ZeRO-3 a full gathered copy on the
sender, e.g. ``accelerator.get_state_dict(model)``), loaded in one piece:
``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state_dict.items())})`` or
``save_file(state_dict, dir/"model.safetensors")``. Tests check the streamed paths give the engine
bit-identical weights (vLLM's per-parameter checksums) and files to the naive one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

MB = 1 << 20


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and full (unpartitioned) shape of one state-dict entry."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class WeightStream(Protocol):
    """Weights with their metadata up front (what vLLM's NCCL transfer needs); `ModelWeights` is one."""

    def metadata(self) -> list[TensorMeta]: ...

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]: ...


def _entries(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """State-dict keys (tied weights under every name) with the live parameter / buffer objects."""
    out: list[tuple[str, torch.Tensor]] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        out.extend((prefix + n, p) for n, p in module._parameters.items() if p is not None)
        out.extend(
            (prefix + n, b)
            for n, b in module._buffers.items()
            if b is not None and n not in module._non_persistent_buffers_set
        )
    return out


def _full_nbytes(t: torch.Tensor) -> int:
    numel = int(getattr(t, "ds_numel", t.numel()))
    return numel * t.element_size()


class ModelWeights:
    """A learner's state dict as a re-iterable (name, tensor) stream, ZeRO-3 aware. See the module doc.

    Args:
        model: the *unwrapped* module (HF parameter names), e.g. ``accelerator.unwrap_model(model)``.
        bucket_mb: gather granularity under ZeRO-3 (MiB). Ignored for plain modules (nothing to gather).
    """

    def __init__(self, model: torch.nn.Module, bucket_mb: float = 256) -> None:
        self.model = model
        self.bucket_bytes = int(bucket_mb * MB)

    @property
    def is_zero3(self) -> bool:
        return any(hasattr(p, "ds_id") for p in self.model.parameters())

    def metadata(self) -> list[TensorMeta]:
        """What iteration yields, in order, without gathering (ZeRO-3 full shapes come from ``ds_shape``)."""
        return [
            TensorMeta(n, t.dtype, tuple(getattr(t, "ds_shape", t.shape))) for n, t in _entries(self.model)
        ]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        entries = _entries(self.model)
        if not any(hasattr(t, "ds_id") for _, t in entries):
            for name, tensor in entries:
                yield name, tensor.detach()
            return
        import deepspeed  # only under ZeRO-3

        for bucket in _split(entries, self.bucket_bytes):
            params = list({id(t): t for _, t in bucket if hasattr(t, "ds_id")}.values())
            gather = (
                deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else nullcontext()
            )
            with gather:
                # Clones: the engine may hold a tensor past this bucket (vLLM buffers a layer until complete).
                for name, tensor in bucket:
                    yield name, (tensor.detach().clone() if hasattr(tensor, "ds_id") else tensor.detach())

    def drain(self) -> None:
        """Run the gathers without sending (ranks other than the sender, under ZeRO-3)."""
        for _ in self:
            pass


def _split(
    pairs: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of about `bucket_bytes` (a tensor larger than a bucket is a bucket alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in pairs:
        nbytes = _full_nbytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def convert_bucketed(
    pairs: Iterable[tuple[str, torch.Tensor]],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    bucket_bytes: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `pairs` on `device` / in `dtype` (floating tensors only), converting a bucket at a time.

    Tensors already on the device and in the dtype are yielded as they are (no copy). Naive twin:
    ``((n, t.to(device, dtype)) for n, t in pairs)``.
    """
    target = torch.device(device) if device is not None else None

    def needs(t: torch.Tensor) -> bool:
        wrong_device = target is not None and t.device != target
        wrong_dtype = dtype is not None and t.is_floating_point() and t.dtype != dtype
        return wrong_device or wrong_dtype

    for bucket in _split(pairs, bucket_bytes):
        converted = [
            (
                n,
                t.to(device=target, dtype=dtype if t.is_floating_point() else None, non_blocking=True)
                if needs(t)
                else t,
            )
            for n, t in bucket
        ]
        if target is not None and target.type == "cuda":
            torch.cuda.current_stream(target).synchronize()
        yield from converted
        del converted


class ByteCounter:
    """Wraps a (name, tensor) iterable and counts the bytes that pass through."""

    def __init__(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._pairs = pairs
        self.num_bytes = 0
        self.num_tensors = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._pairs:
            self.num_bytes += tensor.numel() * tensor.element_size()
            self.num_tensors += 1
            yield name, tensor


def write_safetensors_shards(
    pairs: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, bucket_bytes: int = 256 * MB
) -> int:
    """Write `pairs` as ``model-00000.safetensors``, ... shards of about `bucket_bytes`; returns bytes written.

    Written into ``out_dir.tmp`` and renamed to `out_dir` when complete, so a reader never sees half a
    checkpoint. Every name is written (tied aliases too: vLLM reloads need ``lm_head.weight``).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = 0
    for index, bucket in enumerate(_split(pairs, bucket_bytes)):
        shard = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in bucket}
        save_file(shard, str(tmp / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
        written += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return written
