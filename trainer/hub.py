"""``checkpoint.push_to_hub``: the final checkpoint's ``hf/`` folder uploaded to a Hugging Face Hub repo.

Two moments, each one `HubError` (one line: the repo id, the cause, what to do), raised on every rank:

- `check_hub`, when the run starts, before any model loads: ``HF_HUB_OFFLINE`` set, no token, a
  read-only token, or an endpoint that cannot be reached or refuses the token. An upload that could only fail hours later is
  refused up front.
- `push_final_checkpoint`, after the final checkpoint is completely written: a model card (``README.md``:
  mode, base model, steps) is added to its ``hf/`` folder, the repo created if missing and the folder
  uploaded. A failure here (the network went away during training) loses nothing: the error names the
  saved folder and the command that uploads it later.

The work runs on the main process only; the others learn its outcome through one `gather_object`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.config import RunConfig

logger = logging.getLogger("reasonrl")


class HubError(RuntimeError):
    """The hub cannot take the checkpoint (offline, no token, unreachable, refused)."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or str(constants.ENDPOINT)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _cause(err: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def check_hub(repo_id: str, timeout_s: float = 30.0) -> None:
    """Raise `HubError` unless uploading to `repo_id` can work: online, a token, the endpoint answers
    ``whoami`` for it within `timeout_s` (the client itself has no timeout) with a role that may write."""
    where = f"checkpoint.push_to_hub={repo_id}"
    if _offline():
        raise HubError(f"{where}: HF_HUB_OFFLINE is set, so the final checkpoint cannot be uploaded; unset it "
                       "or drop checkpoint.push_to_hub (checkpoints are saved locally either way)")
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if token is None:
        raise HubError(f"{where}: no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write "
                       "access), or drop checkpoint.push_to_hub")
    endpoint = _endpoint()
    try:
        me = _answer_within(timeout_s, HfApi(endpoint=endpoint, token=token).whoami)
    except Exception as err:  # network errors, HTTP 401 for a bad token: each a reason not to start
        raise HubError(f"{where}: the hub at {endpoint} cannot be used ({_cause(err)}); check the network and "
                       "HF_TOKEN, or drop checkpoint.push_to_hub") from None
    if me.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubError(f"{where}: the Hugging Face token of {me.get('name')} is read-only; use a token with write "
                       "access, or drop checkpoint.push_to_hub")


def _answer_within(seconds: float, call: Callable[[], Any]) -> Any:
    """`call()`'s result or exception, or `TimeoutError` after `seconds`; the call runs on a daemon thread,
    so an endpoint that never answers cannot hold the run (nor its exit)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except Exception as err:
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="hub-check")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def model_card(cfg: RunConfig, step: int) -> str:
    """A short ``README.md``: what trained the model, from which base model, for how many steps."""
    base = cfg.model.path
    header = ["---", "library_name: transformers", f"tags: [reasonrl, {cfg.mode}]"]
    if not Path(base).exists():  # a hub id, not a local folder
        header.append(f"base_model: {base}")
    warm = f" after a {cfg.warmstart.steps}-step SFT warm start" if cfg.mode == "grpo" and cfg.warmstart.steps else ""
    return "\n".join([*header, "---", "", f"# {cfg.checkpoint.push_to_hub}", "",
                      f"Trained with reasonrl: mode `{cfg.mode}`, base model `{base}`{warm}, steps: {step}, "
                      f"seed {cfg.seed}, task `{cfg.data.task}`.", "",
                      "The run's resolved configuration is in `reasonrl_config.yaml`.", ""])


def upload_folder(hf_dir: Path, repo_id: str, cfg: RunConfig, step: int) -> str:
    """Write the model card and the resolved config into `hf_dir`, then upload it; returns the commit URL."""
    from huggingface_hub import HfApi

    from trainer.config_io import save_config

    (hf_dir / "README.md").write_text(model_card(cfg, step))
    save_config(cfg, hf_dir / "reasonrl_config.yaml")
    api = HfApi(endpoint=_endpoint())
    api.create_repo(repo_id, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=hf_dir, commit_message=f"reasonrl {cfg.mode}: step {step}")
    return str(getattr(info, "commit_url", info))


def push_final_checkpoint(accelerator: Any, cfg: RunConfig, run_dir: Path, step: int) -> str | None:
    """Upload the newest checkpoint's ``hf/`` (the final one, `step`) to ``cfg.checkpoint.push_to_hub``;
    the commit URL on the main process, None elsewhere. A failure is one `HubError` on every rank naming
    the repo, the cause and the saved folder."""
    from trainer.checkpoint import latest_checkpoint

    repo_id = str(cfg.checkpoint.push_to_hub)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise HubError(f"checkpoint.push_to_hub={repo_id}: no complete checkpoint under {run_dir / 'checkpoints'}")
    hf_dir = checkpoint / "hf"
    done: list[str] = []

    def push() -> None:
        if _offline():
            raise HubError("HF_HUB_OFFLINE is set")
        try:
            done.append(upload_folder(hf_dir, repo_id, cfg, step))
        except Exception as err:
            raise HubError(_cause(err)) from None

    on_every_rank(accelerator, push, lambda cause: (
        f"checkpoint.push_to_hub={repo_id}: uploading {hf_dir} failed ({cause}); the checkpoint is saved there: "
        f"upload it later with `hf upload {repo_id} {hf_dir}`"))
    if done:
        logger.info("pushed %s to %s", hf_dir, done[0])
    return done[0] if done else None


def check_hub_on_every_rank(accelerator: Any, repo_id: str | None) -> None:
    """`check_hub` on the main process (no-op without a repo id); every rank raises its `HubError`."""
    if repo_id:
        on_every_rank(accelerator, lambda: check_hub(repo_id), lambda message: message)


def on_every_rank(accelerator: Any, work: Callable[[], None], describe: Callable[[str], str]) -> None:
    """Run `work` on the main process; if it raised `HubError`, every rank raises one with the `describe`d
    message (a rank must not raise alone: the others would wait for it at the next collective)."""
    message = None
    if accelerator.is_main_process:
        try:
            work()
        except HubError as err:
            message = describe(str(err))
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        message = next((m for m in gather_object([message]) if m), None)
    if message:
        raise HubError(message)
