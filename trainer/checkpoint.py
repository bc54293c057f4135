"""Checkpoints: atomic, resumable, loadable by `from_pretrained` and by vLLM.

Layout of ``RUN_DIR/checkpoints/step_000010/``:

- ``hf/``: model + tokenizer in HF format (what `reasonrl eval`, vLLM and users load); under ``model.lora``
  the merged model (base + adapters folded in, base names);
- ``adapter/`` (``model.lora`` only): the adapter, ``adapter_model.safetensors`` + ``adapter_config.json``
  (``PeftModel.from_pretrained(base, path)``);
- ``state/``: `Accelerator.save_state` (model, optimizer, scheduler, RNG states of every process; DeepSpeed
  shards when DeepSpeed is on): what `--resume` restores, adapters included;
- ``trainer_state.json``: step, policy version, data-iterator state, wandb run id;
- ``config.yaml``: the resolved config.

A checkpoint is written into ``step_N.tmp`` and renamed when complete, so a crash mid-save never leaves
a directory that looks finished. Only the newest `keep_last` checkpoints are kept, deleted only after the
new one is complete. A write that fails (no space, a file-size limit, a read-only or unwritable directory)
removes ``step_N.tmp`` and raises one `StorageError` on every rank, naming the path and the cause (for no
space: about how much the checkpoint needs and how much is free); the previous checkpoint stays resumable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from trainer.config import RunConfig
from trainer.config_io import save_config

if TYPE_CHECKING:  # torch is imported where a checkpoint is written, not by the command line's error handling
    import torch

_PREFIX = "step_"
_STEP = re.compile(_PREFIX + r"\d+")
_MB = 1024 * 1024
# What the writers raise for a failed write: OSError (Python's own files), RuntimeError (torch.save's C++ zip
# writer: "unexpected pos", "iostream error", "cannot be opened"), SafetensorError ("... (os error 28)").
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class StorageError(OSError):
    """A write under the run directory failed; the message names the path and the cause."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:06d}"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed as it is (damaged, or saved over other training data)."""


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first by step (``step_N.tmp`` and ``step_N.old`` folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP.fullmatch(p.name) and (p / "trainer_state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def check_writable(accelerator: Any, run_dir: str | Path) -> None:
    """The main process creates `run_dir` if needed and writes (then removes) a probe file in it and in its
    ``checkpoints/``; every rank raises the same `StorageError` if that fails. So a read-only or unwritable
    run directory is one message before anything is loaded or trained, not a failure at the first log line
    or checkpoint. A run directory this call created is removed again on failure."""
    run_dir = Path(run_dir)

    def probe() -> None:
        created = not run_dir.exists()
        for directory in (run_dir, run_dir / "checkpoints"):
            if directory != run_dir and not directory.exists():
                continue
            if directory.exists() and not directory.is_dir():
                raise StorageError(f"output_dir={run_dir}: {directory} is a file, not a directory; choose another "
                                   "output_dir")
            try:
                directory.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe"):
                    pass
            except OSError as err:
                if created:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise StorageError(f"output_dir={run_dir}: cannot write to {directory}: {_cause(err, directory)}; "
                                   "choose a writable output_dir") from None

    messages = _together(accelerator, probe if accelerator.is_main_process else None, str)
    if messages:
        raise StorageError(messages[0])


def save_checkpoint(accelerator: Any, model: torch.nn.Module, tokenizer: Any, run_dir: str | Path,
                    step: int, trainer_state: dict[str, Any], config: RunConfig, keep_last: int) -> Path:
    """Write a checkpoint atomically; every process calls this (DeepSpeed gathers collectively). Each phase
    ends with every rank learning whether any rank's write failed (`_phase`), so all raise together."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process
    previous = latest_checkpoint(run_dir)  # every rank: each names it in the error it raises

    def needed() -> int:
        return _tree_bytes(previous) if previous is not None else estimate_checkpoint_bytes(accelerator, model)

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_main() -> None:
        from trainer.lora import ADAPTER_DIR, is_lora, save_adapter, save_hf

        unwrapped = accelerator.unwrap_model(model)
        save_hf(unwrapped, tmp / "hf", state_dict)  # under model.lora: the merged model
        if is_lora(unwrapped):
            save_adapter(unwrapped, tmp / ADAPTER_DIR)
        tokenizer.save_pretrained(tmp / "hf")
        save_config(config, tmp / "config.yaml")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        replace_folder(tmp, final)

    _phase(accelerator, prepare if main else None, tmp, run_dir, previous, needed)
    with _tied_head_notice_dropped(accelerator.unwrap_model(model)):
        _phase(accelerator, lambda: accelerator.save_state(str(tmp / "state")), tmp, run_dir, previous, needed)
    state_dict = accelerator.get_state_dict(model)  # collective under DeepSpeed ZeRO-3: every rank
    _phase(accelerator, write_main if main else None, tmp, run_dir, previous, needed)
    if main:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class TiedHeadNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" warning when every tensor it names is one
    of `tied` (the input and output embeddings of a model with ``tie_word_embeddings``): safetensors stores a
    shared tensor once, and loading ties the head again, so resuming is exact (tests/trainer/test_checkpoint_tied.py
    and the resume tests). Any other shared tensor keeps the warning."""

    def __init__(self, tied: set[str]) -> None:
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        found = re.search(r"Removed shared tensor \{(.*)\} while saving", record.getMessage())
        if not found or not self.tied:
            return True
        removed = [name.strip().strip("'\"") for name in found.group(1).split(",")]
        return not all(name.endswith(tuple(self.tied)) for name in removed)


def tied_embedding_names(model: torch.nn.Module) -> set[str]:
    """The weight names of the input and output embeddings if they are one tensor, else the empty set."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out is not None else None
    embed = get_in() if get_in is not None else None
    if head is None or embed is None or head.weight is not embed.weight:
        return set()
    names = {module: name for name, module in model.named_modules()}
    return {f"{names[embed]}.weight", f"{names[head]}.weight"}


@contextlib.contextmanager
def _tied_head_notice_dropped(model: torch.nn.Module) -> Iterator[None]:
    notice = TiedHeadNotice(tied_embedding_names(model))
    accelerate_log = logging.getLogger("accelerate.utils.other")
    accelerate_log.addFilter(notice)
    try:
        yield
    finally:
        accelerate_log.removeFilter(notice)


def replace_folder(new: Path, final: Path) -> None:
    """Rename the complete folder `new` to `final`. An existing `final` is first renamed to ``FINAL.old`` and
    removed only after, so a crash at any point leaves the old or the new folder complete under one of the
    two names (never only a partial one)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_model_folder(accelerator: Any, model: torch.nn.Module, write: Callable[[Path], None], final: Path,
                      what: str) -> None:
    """Write a model folder (the warm start's, DPO's ``best/``) atomically on the main process: `write` fills
    ``FINAL.tmp``, which then replaces `final`. Every process calls this; a failed write is the same
    `StorageError` on every rank, naming `what`, the path and the cause; the partial ``.tmp`` is removed and an
    earlier `final` is left as it was."""
    tmp = final.with_name(final.name + ".tmp")

    def run() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        replace_folder(tmp, final)

    def describe(err: Exception) -> str:
        return _failure_message(err, tmp, lambda: _model_bytes(model), what)

    messages = _together(accelerator, run if accelerator.is_main_process else None, describe)
    if messages:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"{messages[0]}; the partial {tmp.name} was removed")


def _phase(accelerator: Any, write: Callable[[], None] | None, tmp: Path, run_dir: str | Path,
           previous: Path | None, needed: Callable[[], int]) -> None:
    """Run this rank's `write` (None: nothing to write here); every rank learns of any rank's failure
    (`_together`). On a failure the main process removes the partial `tmp`, and every rank raises the same
    `StorageError`."""
    messages = _together(accelerator, write, lambda err: _failure_message(err, tmp, needed))
    if not messages:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = (f"the last complete checkpoint, {previous.name}, is untouched: `reasonrl train --resume {run_dir}` "
            "continues from it" if previous is not None else "no earlier checkpoint exists")
    raise StorageError(f"{messages[0]}; the partial {tmp.name} was removed; {kept}")


def _together(accelerator: Any, write: Callable[[], None] | None, describe: Callable[[Exception], str]) -> list[str]:
    """Run this rank's `write` (None: nothing to write on this rank), then share with every rank what failed
    anywhere, `describe`d (one `gather_object`, which is also a barrier): an empty list when nothing did. A
    rank must not raise alone, or the others would wait for it at the next collective forever."""
    message = None
    if write is not None:
        try:
            write()
        except _WRITE_ERRORS as err:
            message = describe(err)
    return gather_failures(accelerator, message)


def gather_failures(accelerator: Any, message: str | None) -> list[str]:
    """Every rank's failure message (None: this rank's part went well), on every rank; a collective."""
    if accelerator.num_processes == 1:
        return [message] if message else []
    from accelerate.utils import gather_object

    return [m for m in gather_object([message]) if m]


def write_failure(err: OSError, what: str, path: Path) -> StorageError:
    """'cannot write WHAT PATH: CAUSE' for a failed write outside a checkpoint (e.g. evaluation samples)."""
    return StorageError(f"cannot write {what} {path}: {_cause(err, path)}")


def _failure_message(err: Exception, tmp: Path, needed: Callable[[], int], what: str = "checkpoint") -> str:
    """'cannot write WHAT PATH: CAUSE' for a failed write (WHAT: checkpoint, best model, ...), the cause read from the error where it has one
    (errno, or "os error N" in a writer's message) and otherwise from the file system (free space, the
    file-size limit, a write probe)."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(err))
        code = int(found.group(1)) if found else None
    if code is None:
        code = _diagnose(tmp)
    path = getattr(err, "filename", None) or tmp
    if code == errno.ENOSPC:
        free = _free_bytes(tmp) + (_tree_bytes(tmp) if tmp.is_dir() else 0)  # once the partial one is removed
        return (f"cannot write {what} {path}: no space left on device (the {what} needs about "
                f"{needed() / _MB:.1f} MB; {free / _MB:.1f} MB free)")
    if code is not None:
        return f"cannot write {what} {path}: {_cause(OSError(code, os.strerror(code)), tmp)}"
    return f"cannot write {what} {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _diagnose(tmp: Path) -> int | None:
    """The errno behind a write error that carries none (torch.save's C++ writer): a full file system, a file
    at the process's file-size limit, or a directory that refuses a new file."""
    if _free_bytes(tmp) < _MB:
        return errno.ENOSPC
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and any(p.stat().st_size >= limit for p in tmp.rglob("*") if p.is_file()):
        return errno.EFBIG
    for directory in [tmp, *tmp.rglob("*")]:
        if directory.is_dir():
            try:
                with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe"):
                    pass
            except OSError as probe:
                return probe.errno
    return None


def _cause(err: OSError, where: Path) -> str:
    """The cause of a failed write in words, with what to do where that is clear."""
    reason = (err.strerror or str(err)).lower()
    if err.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        cap = f" of {limit} bytes" if limit != resource.RLIM_INFINITY else ""
        return f"{reason} (a file reached the process's file-size limit{cap}, `ulimit -f`)"
    if err.errno == errno.ENOSPC:
        return f"{reason} ({_free_bytes(where) / _MB:.1f} MB free)"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{reason} (the directory is not writable)"
    return reason


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (its nearest existing ancestor)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def estimate_checkpoint_bytes(accelerator: Any, model: torch.nn.Module) -> int:
    """About the size of a checkpoint: the parameters twice (``hf/`` and ``state/``) and the optimizer state."""
    import torch

    params = _model_bytes(model)
    optimizer = sum(v.numel() * v.element_size() for opt in getattr(accelerator, "_optimizers", [])
                    for state in opt.state.values() for v in state.values() if torch.is_tensor(v))
    return int(2 * params + optimizer)


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def load_checkpoint(accelerator: Any, path: str | Path) -> dict[str, Any]:
    """Restore optimizer/scheduler/RNG/model state into the prepared objects; returns trainer_state."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    try:
        state: dict[str, Any] = json.loads(state_file.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not an object with an integer 'step'")
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        found = list_checkpoints(path.parent.parent)
        older = found[: found.index(path)] if path in found else []
        fallback = f"to resume from {older[-1].name}" if older else "(there is no older checkpoint)"
        raise ResumeError(f"{state_file} is damaged ({err}): move {path.name} out of {path.parent} "
                          f"{fallback}") from None
    accelerator.load_state(str(path / "state"))
    return state
