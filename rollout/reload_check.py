"""Checks a weight reload must pass before the rollout server hands it to vLLM.

vLLM's ``reload_weights`` empties the model's parameters and refills them from the files it finds: a path
with no or the wrong tensors leaves parameters unfilled (meta tensors) while ``/health`` still answers, and
the next generation kills the engine. So a reload directory must

- resolve (symlinks followed) to a directory inside the server's weights directory (``--weights-dir``):
  ``../`` escapes and symlinks out, of the directory or of any shard in it, are refused;
- hold ``*.safetensors`` shards whose headers are well formed and describe their data exactly (no truncated
  or overlapping tensor data: what vLLM would fail on midway);
- name every parameter of the served model once (a tied alias such as ``lm_head.weight`` may come along),
  no unknown tensor, each with the served model's shape and a floating dtype where the model's is floating.

The served model's names and shapes are those of its Hugging Face model class built on the meta device from
the checkpoint's config (what the learner trains and sends; no weights are read). Only headers are read.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

# bytes per element of the safetensors dtype tags, and the floating-point ones
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# torch dtype names a collective update may announce (`rollout.transfer.update_info`): floating or not
TORCH_DTYPES = {
    "float64": True, "float32": True, "float16": True, "bfloat16": True,
    "float8_e4m3fn": True, "float8_e5m2": True,
    "int64": False, "int32": False, "int16": False, "int8": False, "uint8": False, "bool": False,
}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20


class ReloadRefused(ValueError):
    """A reload request that must not reach vLLM; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelLayout:
    """Names and shapes a reload must carry: `shapes` of every state-dict entry, and `groups`, the names of
    each parameter (tied aliases together), of which a reload must carry at least one."""

    shapes: dict[str, tuple[int, ...]]
    floating: frozenset[str]
    groups: tuple[tuple[str, ...], ...]


def served_model_layout(model: str, trust_remote_code: bool = False) -> ModelLayout:
    """`ModelLayout` of the Hugging Face causal LM at `model` (a path or hub id), built without weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=trust_remote_code
        )
    state = module.state_dict()
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return ModelLayout(
        shapes={name: tuple(t.shape) for name, t in state.items()},
        floating=frozenset(name for name, t in state.items() if t.is_floating_point()),
        groups=tuple(tuple(names) for names in groups.values()),
    )


def resolve_reload_dir(weights_path: str, weights_dir: str | None) -> tuple[Path, Path]:
    """(`weights_path` resolved, the weights directory resolved); relative paths are taken inside the
    weights directory. Raises `ReloadRefused` (403 outside it or no ``--weights-dir``; 404 no directory)."""
    if weights_dir is None:
        raise ReloadRefused(
            "this rollout server was started without --weights-dir: weight reloads are off", 403
        )
    root = Path(weights_dir).resolve()
    target = (root / weights_path).resolve()  # an absolute weights_path replaces root
    if not target.is_relative_to(root):
        raise ReloadRefused(
            f"weights_path {weights_path!r} resolves to {target}, outside the server's weights directory "
            f"{root} (--weights-dir)",
            403,
        )
    if not target.is_dir():
        raise ReloadRefused(f"weights_path {weights_path!r}: no directory {target}", 404)
    return target, root


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype tag, shape)} from a safetensors file's header; `ReloadRefused` (422) unless the header
    is well formed and its tensors tile the data exactly as the format requires (each span the size its dtype
    and shape need, back to back from 0, ending at the end of the file: no truncated or overlapping data)."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
        entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        spans = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
                raise ValueError(f"{name}: {end - begin} bytes for {dtype} {list(shape)}")
            entries[name] = (dtype, shape)
            spans.append((begin, end))
        position = 0
        for begin, end in sorted(spans):
            if begin != position:
                raise ValueError(f"data at byte {begin} where {position} was expected (overlap or gap)")
            position = end
        actual, expected = path.stat().st_size, 8 + size + position
        if actual != expected:
            raise ValueError(f"{actual} bytes where its header describes {expected}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as err:
        raise ReloadRefused(f"{path.name}: not a valid safetensors file ({err})", 422) from None
    return entries


def check_reload_dir(target: Path, root: Path, layout: ModelLayout) -> None:
    """Raise `ReloadRefused` unless the shards in `target` are a complete copy of `layout` (module doc)."""
    shards = sorted(target.glob("*.safetensors"))
    if not shards:
        raise ReloadRefused(f"{target} holds no *.safetensors shards", 422)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in shards:
        if not shard.resolve().is_relative_to(root):
            raise ReloadRefused(
                f"{shard} links to {shard.resolve()}, outside the weights directory {root}", 403
            )
        for name, entry in read_header(shard).items():
            if name in found:
                raise ReloadRefused(f"{target}: tensor {name!r} is in more than one shard", 422)
            found[name] = entry
    check_tensors(found, FLOAT_DTYPES, layout, str(target))


def check_update_info(info: object, layout: ModelLayout) -> None:
    """Raise `ReloadRefused` unless `info`, the ``update_info`` of a collective weight update (names,
    ``dtype_names`` such as ``bfloat16``, shapes; `rollout.transfer`), announces a complete copy of `layout`."""
    if not isinstance(info, dict):
        raise ReloadRefused("update_weights: update_info must be an object", 400)
    names, dtypes, shapes = info.get("names"), info.get("dtype_names"), info.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not (
        len(names) == len(dtypes) == len(shapes)
    ):
        raise ReloadRefused(
            "update_weights: update_info needs names, dtype_names and shapes, lists of one length", 400
        )
    for field, values in (("names", names), ("dtype_names", dtypes)):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise ReloadRefused(
                    f"update_weights: update_info.{field}[{i}] must be a string, not {_short(value)}", 422
                )
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        if (
            dtype not in TORCH_DTYPES
            or not isinstance(shape, list)
            or not all(type(d) is int for d in shape)  # not bool: True would pass as a dimension of 1
        ):
            raise ReloadRefused(f"update_weights: {name!r} has dtype {dtype!r} and shape {shape!r}", 422)
        if name in found:
            raise ReloadRefused(f"update_weights: tensor {name!r} is announced twice", 422)
        found[name] = (dtype, tuple(shape))
    check_tensors(found, {d for d, floating in TORCH_DTYPES.items() if floating}, layout, "update_weights")


def check_tensors(
    found: dict[str, tuple[str, tuple[int, ...]]], floating: Collection[str], layout: ModelLayout, what: str
) -> None:
    """Raise `ReloadRefused` unless `found` ({name: (dtype, shape)}) names every parameter of `layout` (a
    tied alias may come along), nothing else, each with its shape, and a dtype in `floating` where the
    model's is floating point."""
    unknown = sorted(set(found) - set(layout.shapes))
    problems = [f"unknown tensors: {_few(unknown)}"] if unknown else []
    for name, (dtype, shape) in found.items():
        want = layout.shapes.get(name)
        if want is not None and shape != want:
            problems.append(f"{name} has shape {list(shape)}, the served model's is {list(want)}")
        if name in layout.floating and dtype not in floating:
            problems.append(f"{name} has dtype {dtype}, the served model's is floating point")
    missing = [names[0] for names in layout.groups if not any(n in found for n in names)]
    if missing:
        problems.append(f"{len(missing)} of the served model's parameters missing: {_few(missing)}")
    if problems:
        raise ReloadRefused(f"{what} does not match the served model: " + "; ".join(problems[:5]), 422)


def _short(value: object, limit: int = 80) -> str:
    """`value`'s repr, cut to `limit` characters (a request's value quoted in a refusal)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _few(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
