"""``checkpoint.push_to_hub`` through real `reasonrl train` runs (HF engine, tiny model): refused before
anything loads when offline, without a token or with an unreachable endpoint; the final checkpoint's hf/
folder (model, tokenizer, model card) uploaded by the real `huggingface_hub` client to a local fake hub;
a failed upload is one error after the checkpoint is safely written."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, serving
from huggingface_hub import constants as hub_constants

from trainer.hub import HubError, check_hub

TINY = REPO / "configs" / "grpo_tiny_cpu.yaml"
HUB_REPO = "tester/tiny-grpo"


class FakeHub(ThreadingHTTPServer):
    """The endpoints `HfApi.whoami`, `create_repo` and `upload_folder` use (and the model card's metadata
    check), every file uploaded inline
    ("regular" mode, base64 in the commit's NDJSON); `reject_commits` answers commits with HTTP 403."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.reject_commits = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: Any) -> None:
        """Quiet."""

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.requests.append(f"GET {self.path}")
        if self.path.startswith("/api/whoami"):
            return self._reply(200, {"name": "tester", "type": "user", "auth": {"accessToken": {"role": "write"}}})
        self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(f"POST {self.path}")
        repo_url = f"{self.server.url}/{HUB_REPO}"
        if self.path == "/api/repos/create":
            return self._reply(200, {"url": repo_url})
        if self.path == "/api/validate-yaml":  # the model card's metadata header
            return self._reply(200, {"errors": [], "warnings": []})
        if self.path == f"/api/models/{HUB_REPO}/preupload/main":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if self.path == f"/api/models/{HUB_REPO}/commit/main":
            if self.server.reject_commits:
                return self._reply(403, {"error": "storage quota exceeded"})
            for line in body.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    self.server.files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            return self._reply(200, {"commitUrl": f"{repo_url}/commit/{'a' * 40}", "commitOid": "a" * 40})
        self._reply(404, {"error": "not found"})


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    with serving(hub):
        yield hub


def train(tiny_qwen2_path: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One-step `reasonrl train` (HF engine) with ``checkpoint.push_to_hub``; HF_* variables from `env` only."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    overrides = [f"model.path={tiny_qwen2_path}", f"output_dir={out}", "rollout.engine=hf", "warmstart.steps=0",
                 "grpo.n_grpo_steps=1", "grpo.rollout_batch_size=8", "grpo.group_size=4", "grpo.train_batch_size=8",
                 "rollout.max_tokens=8", "eval.max_tokens=8", "eval.limit=4", "reward.num_workers=1",
                 f"checkpoint.push_to_hub={HUB_REPO}"]
    return subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(TINY), *overrides], cwd=REPO,
                          env=base | {"WANDB_MODE": "disabled", "CI": "1", "HF_HUB_DISABLE_TELEMETRY": "1"} | env,
                          capture_output=True, text=True, timeout=600)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("reasonrl: error:")]


@pytest.mark.parametrize(("case", "expected"), [
    ("offline", "HF_HUB_OFFLINE is set, so the final checkpoint cannot be uploaded"),
    ("unreachable", "the hub at http://127.0.0.1:9 cannot be used (ConnectError"),
    ("no_token", "no Hugging Face token: set HF_TOKEN or run `hf auth login`"),
])
def test_unusable_hub_is_one_error_before_anything_loads(tiny_qwen2_path: str, tmp_path: Path, case: str,
                                                         expected: str) -> None:
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "hf_fake"}  # HF_HOME: no stored token
    if case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    elif case == "unreachable":
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    else:
        del env["HF_TOKEN"]
    proc = train(tiny_qwen2_path, tmp_path / "run", env)
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith(f"reasonrl: error: checkpoint.push_to_hub={HUB_REPO}: ") and expected in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the tracker, model or engine
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_final_checkpoint_is_uploaded_with_a_model_card(tiny_qwen2_path: str, tmp_path: Path,
                                                        fake_hub: FakeHub) -> None:
    proc = train(tiny_qwen2_path, tmp_path / "run", {"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": "hf_fake",
                                                     "HF_HOME": str(tmp_path / "hf_home")})
    assert proc.returncode == 0, proc.stderr
    hf_dir = tmp_path / "run" / "checkpoints" / "step_000001" / "hf"
    local = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    assert fake_hub.files == local
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "reasonrl_config.yaml"} <= set(local)
    card = local["README.md"].decode()
    assert f"# {HUB_REPO}" in card and f"mode `grpo`, base model `{tiny_qwen2_path}`, steps: 1" in card
    assert "POST /api/repos/create" in fake_hub.requests and f"pushed {hf_dir} to {fake_hub.url}" in proc.stderr


def test_failed_upload_is_one_error_after_the_checkpoint_is_saved(tiny_qwen2_path: str, tmp_path: Path,
                                                                  fake_hub: FakeHub) -> None:
    fake_hub.reject_commits = True
    proc = train(tiny_qwen2_path, tmp_path / "run", {"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": "hf_fake",
                                                     "HF_HOME": str(tmp_path / "hf_home")})
    assert proc.returncode == 1
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    [line] = error_lines(proc)
    assert line.startswith(f"reasonrl: error: checkpoint.push_to_hub={HUB_REPO}: uploading {checkpoint / 'hf'} "
                           "failed (")
    assert "403" in line and f"upload it later with `hf upload {HUB_REPO} {checkpoint / 'hf'}`" in line
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "hf" / "model.safetensors").exists()
    assert fake_hub.files == {}


def test_an_endpoint_that_never_answers_is_refused_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket that listens but never accepts: the connection opens and no answer comes (the hub client has
    no timeout of its own)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_fake")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # read from the variable at import
        with pytest.raises(HubError, match=rf"push_to_hub={HUB_REPO}: the hub at {endpoint} cannot be used "
                                           r"\(TimeoutError: no answer within 1 s\)"):
            check_hub(HUB_REPO, timeout_s=1.0)
