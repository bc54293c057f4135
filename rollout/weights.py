"""The weight stream from a learner to a rollout engine, and its check (no vLLM import here).

Weights travel as an iterator of (HF state-dict name, tensor), one tensor at a time, so no second full copy
of the state dict is built. `WeightStream` is the typed one the trainer sends: names, dtypes and full shapes
up front (`metadata`), the policy version it carries, and ZeRO-3 gathers of ``bucket_mb`` at a time (a
collective: ranks that send nothing call `drain`). Engines accept any (name, tensor) iterable and check it
with `WeightCheck`; `iter_state_dict` is the one state-dict walk (tied weights under every name).

Naive twin of the streamed paths: the whole state dict at once, e.g.
``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(model.state_dict().items())})`` or
``save_file(model.state_dict(), ...)``; tests check that both give bit-identical engine weights and files.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MB = 1 << 20
Pairs = Iterable[tuple[str, torch.Tensor]]


def _walk(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """State-dict keys in ``state_dict()`` order with the live parameter / buffer objects (not detached:
    ZeRO-3 keeps ``ds_id`` / ``ds_shape`` on them)."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for name, param in module._parameters.items():
            if param is not None:
                yield prefix + name, param
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield prefix + name, buffer


def iter_state_dict(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``model.state_dict()`` as (name, tensor) pairs without building the dict or copying tensors.

    Exactly the keys of ``state_dict()`` in the same order: parameters and persistent buffers, tied weights
    under every name (``lm_head.weight`` as well as ``model.embed_tokens.weight``; vLLM's in-place reload
    keeps the old values of a tied ``lm_head`` it is not sent). Naive twin: ``iter(model.state_dict().items())``.
    """
    for name, tensor in _walk(model):
        yield name, tensor.detach()


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and full (unpartitioned) shape of one state-dict entry."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class WeightStream:
    """A learner's state dict as a re-iterable (name, tensor) stream, ZeRO-3 aware (see the module doc).

    A plain module yields views of its tensors (no copy). Under DeepSpeed ZeRO-3 (parameters carry
    ``ds_id``) parameters are gathered ``bucket_mb`` at a time with ``GatheredParameters`` and yielded as
    clones (an engine may hold a tensor past its bucket); deepspeed is imported only then.

    Args:
        model: the *unwrapped* module (HF parameter names), e.g. ``accelerator.unwrap_model(model)``.
        bucket_mb: gather granularity under ZeRO-3 (MiB); ignored for plain modules.
        version: the policy version the receiving engine takes for these weights; None = its next one.
    """

    def __init__(self, model: torch.nn.Module, bucket_mb: float = 256, version: int | None = None) -> None:
        if version is not None and version < 0:
            raise ValueError(f"WeightStream: version={version} must be >= 0")
        self.model = model
        self.bucket_bytes = int(bucket_mb * MB)
        self.version = version

    @property
    def is_zero3(self) -> bool:
        return any(hasattr(p, "ds_id") for p in self.model.parameters())

    def metadata(self) -> list[TensorMeta]:
        """What iteration yields, in order, without gathering (ZeRO-3 full shapes come from ``ds_shape``)."""
        return [TensorMeta(n, t.dtype, tuple(getattr(t, "ds_shape", t.shape))) for n, t in _walk(self.model)]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        entries = list(_walk(self.model))
        if not any(hasattr(t, "ds_id") for _, t in entries):
            for name, tensor in entries:
                yield name, tensor.detach()
            return
        import deepspeed  # only under ZeRO-3

        for bucket in _split(entries, self.bucket_bytes):
            params = list({id(t): t for _, t in bucket if hasattr(t, "ds_id")}.values())
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else nullcontext()
            with gather:
                for name, tensor in bucket:
                    yield name, (tensor.detach().clone() if hasattr(tensor, "ds_id") else tensor.detach())

    def drain(self) -> None:
        """Run the gathers without sending (ranks other than the sender, under ZeRO-3)."""
        for _ in self:
            pass


def next_version(weights: Pairs, current: int) -> int:
    """The policy version an engine at `current` takes for `weights`: the stream's own, else ``current + 1``."""
    if isinstance(weights, WeightStream) and weights.version is not None:
        return weights.version
    return current + 1


class WeightCheck:
    """Checks (name, shape) pairs against the `expected` names and shapes of a weight sync's receiver.

    The one check of every engine's ``update_weights``: a name not in `expected`, a shape other than the
    expected one, or a name sent twice is wrong, and so is a name of `expected` never sent. `listing` checks a
    whole listing (a stream's `metadata`); `stream` passes pairs through unbuffered and cuts the stream at the
    first bad one; `drain` then checks the rest without loading it (a ZeRO-3 stream gathers collectively, so
    every rank keeps iterating in step). With `expected` None only repeated names are errors.

    Args:
        expected: name -> shape of the receiver (`VLLMEngine`: the checkpoint's; `HFEngine`: its model's).
        what: the receiver in messages (``... is not a weight of this checkpoint``).
        aliases: name -> the name whose tensor it shares (tied weights): sending any name of such a group
            covers all of them. None: every name must be sent itself.
    """

    def __init__(
        self,
        expected: dict[str, tuple[int, ...]] | None,
        *,
        what: str = "checkpoint",
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.expected = expected
        self.what = what
        self.aliases = aliases or {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.errors: list[str] = []
        self.unknown: list[str] = []  # names sent that `expected` lacks
        self.num_passed = 0  # pairs `stream` let through before the cut
        self._rest: Iterator[tuple[str, torch.Tensor]] | None = None

    def add(self, name: str, shape: tuple[int, ...]) -> bool:
        """Record one pair; False (and an entry in `errors`) if it is wrong."""
        error = None
        want = self.expected.get(name) if self.expected is not None else shape
        if name in self.shapes:
            error = f"{name} was sent twice"
        elif want is None:
            error = f"{name} (shape {shape}) is not a weight of this {self.what}"
            self.unknown.append(name)
        elif shape != want:
            error = f"{name} has shape {shape}, the {self.what}'s is {want}"
        self.shapes.setdefault(name, shape)
        if error is not None:
            self.errors.append(error)
        return error is None

    def listing(self, pairs: Iterable[tuple[str, tuple[int, ...]]]) -> str | None:
        """Check a whole (name, shape) listing; `problem`."""
        for name, shape in pairs:
            self.add(name, shape)
        return self.problem()

    def stream(self, pairs: Pairs) -> Iterator[tuple[str, torch.Tensor]]:
        """`pairs` while they are right; the first wrong one is not yielded and ends the stream."""
        source = iter(pairs)
        for name, tensor in source:
            if not self.add(name, tuple(tensor.shape)):
                self._rest = source
                return
            self.num_passed += 1
            yield name, tensor

    def drain(self) -> None:
        """Check what is left of a stream `stream` cut, loading nothing."""
        rest, self._rest = self._rest, None
        for name, tensor in rest or ():
            self.add(name, tuple(tensor.shape))

    def missing(self) -> list[str]:
        """The names of `expected` not sent, neither themselves nor through an alias."""
        sent = {self.aliases.get(n, n) for n in self.shapes}
        return [n for n in self.expected or () if self.aliases.get(n, n) not in sent]

    def problem(self) -> str | None:
        """The bad pairs and the names never sent, in words; None if all is well."""
        parts = self.errors[:10] + ([f"{len(self.errors) - 10} more"] if len(self.errors) > 10 else [])
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            parts.append(
                f"no tensor sent for {len(missing)} of the {self.what}'s {len(self.expected or ())} names: {shown}"
            )
            if any(n.startswith("lm_head.") for n in missing):
                parts[-1] += (
                    " (a tied lm_head is a state-dict name of its own, which named_parameters() leaves out: "
                    "send rollout.weights.iter_state_dict or WeightStream)"
                )
        return "; ".join(parts) or None


def checkpoint_shapes(hf_config: Any, *, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]] | None:
    """State-dict name -> shape of the HF model `hf_config` describes: what a learner's `iter_state_dict`
    yields (tied ``lm_head.weight`` included), the `WeightCheck` of an engine that holds no HF module. Built on
    the meta device (no memory; ~0.1 s for 1.5B). None, with a warning, where transformers cannot build it."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                copy.deepcopy(hf_config), trust_remote_code=trust_remote_code
            )
    except Exception as exc:  # any failure only disables the up-front check of names
        logger.warning("cannot build %s from its config (%s); weight syncs are checked against the first full "
                       "sync's names and shapes instead", type(hf_config).__name__, exc)
        return None
    return {name: tuple(t.shape) for name, t in iter_state_dict(model)}


def parameter_digests(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of the raw bytes of each of `model`'s named parameters (e.g. inside a vLLM worker: exact weight comparisons).

    The digest of vLLM 0.32's ``compute_weight_checksums`` worker RPC for plain (unquantised) tensors, under
    the bare parameter name instead of 0.32's ``dp0:pp0:pcp0:tp0:``-prefixed one (tested equal on 0.32).
    """
    return {
        name: hashlib.sha256(
            p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data
        ).hexdigest()
        for name, p in model.named_parameters()
    }


def _full_nbytes(t: torch.Tensor) -> int:
    return int(getattr(t, "ds_numel", t.numel())) * t.element_size()


def _split(pairs: Pairs, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
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
    pairs: Pairs, device: torch.device | str | None, dtype: torch.dtype | None, bucket_bytes: int
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
            (n, t.to(device=target, dtype=dtype if t.is_floating_point() else None, non_blocking=True))
            if needs(t)
            else (n, t)
            for n, t in bucket
        ]
        if target is not None and target.type == "cuda":
            torch.cuda.current_stream(target).synchronize()
        yield from converted
        del converted


class ByteCounter:
    """Wraps a (name, tensor) iterable and counts the bytes that pass through."""

    def __init__(self, pairs: Pairs) -> None:
        self._pairs = pairs
        self.num_bytes = 0
        self.num_tensors = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._pairs:
            self.num_bytes += tensor.numel() * tensor.element_size()
            self.num_tensors += 1
            yield name, tensor


def write_safetensors_shards(pairs: Pairs, out_dir: str | Path, bucket_bytes: int = 256 * MB) -> int:
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


def sync_metrics(seconds: float, num_bytes: int) -> dict[str, float]:
    """Weight-sync metrics: seconds, GB moved and GB/s (1 GB = 1e9 bytes)."""
    gb = num_bytes / 1e9
    return {
        "rollout/sync_s": seconds,
        "rollout/sync_gb": gb,
        "rollout/sync_gb_per_s": gb / seconds if seconds > 0 else 0.0,
    }
