"""Helpers shared by several test files (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import HTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

TESTS = Path(__file__).resolve().parent  # tests/: helpers, worker scripts, fixtures/
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"


def repo_pythonpath() -> str:
    """PYTHONPATH for a subprocess: the repository first, then whatever this process was given (on an offline GPU
    machine, the carried wheels live there: benchmarks/gpu)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def run_script(script: str, *args: str, timeout: int = 600) -> str:
    """Run ``benchmarks/<script>`` in a real subprocess (in-process vLLM, wandb off); its stdout."""
    env = dict(os.environ, PYTHONPATH=repo_pythonpath(), VLLM_ENABLE_V1_MULTIPROCESSING="0", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


LAUNCH_VARS = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ACCELERATE_USE_CPU",
    "CUDA_VISIBLE_DEVICES",
}


def launch_env(cpu_ddp: bool) -> dict[str, str]:
    """Environment for a launched CPU run: no inherited launcher variables, one thread, wandb off; with
    `cpu_ddp` accelerate makes the torchrun processes one gloo world."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": repo_pythonpath()}  # fmt: skip
    if cpu_ddp:  # without it accelerate runs each CPU process as its own world of 1 (silently)
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def run_launch(cmd: Sequence[str], env: dict[str, str], log: Path, timeout_s: float) -> int | None:
    """Run a launch command in its own session, output to `log`; its exit status (None: still running after
    `timeout_s`). Whatever it leaves behind (ranks, reward workers, engines) is killed either way."""
    with log.open("w") as out:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if session_pids(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_interruptible(cmd: Sequence[str], cwd: Path, env: dict[str, str], stdout: Any, stderr: Any) -> subprocess.Popen[str]:
    """Start an entry point in a process group of its own, with SIGINT at its default action (a test runner may
    start its children ignoring it), so that `ctrl_c` reaches it as a terminal's Ctrl-C would."""
    return subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@contextmanager
def reaped(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Kill `proc`'s process group at the end if it is still running (a failed wait, a hang)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ctrl_c(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGINT to `proc`'s process group; its remaining (stdout, stderr), where piped, once it has ended."""
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return stdout or "", stderr or ""


def assert_interrupted_in_one_line(proc: subprocess.Popen[str], stderr: str) -> None:
    """Ctrl-C ends every entry point with the one line "reasonrl: interrupted" and death by SIGINT (so a calling
    shell's loop stops too), never a traceback."""
    assert proc.returncode == -signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert stderr.splitlines()[-1] == "reasonrl: interrupted"


def session_pids(sid: int) -> list[int]:
    """Pids still in session `sid` (the launcher was started in a new session: all its descendants)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            alive.append(int(stat.parent.name))
    return alive


def launch_worlds(worker: Path, args: Callable[[int], list[str]], out: Path, timeout_s: float) -> None:
    """Run `worker` twice at the same time: as one plain process (world 1) and as 2 gloo ranks under
    ``torchrun --standalone`` (world 2), with ``args(world)`` and logs in ``out/w{world}.log``. Fails the
    test on a launch past `timeout_s` (a rank hung?), a non-zero exit, or processes left behind; kills
    whatever is left either way."""
    cmds = {
        1: [sys.executable, str(worker), *args(1)],
        2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
            *args(2)],
    }  # fmt: skip
    procs = {}
    for world, cmd in cmds.items():
        with (out / f"w{world}.log").open("w") as log:
            procs[world] = subprocess.Popen(cmd, cwd=REPO, env=launch_env(world > 1), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        for world, proc in procs.items():
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"world-{world} launch exceeded {timeout_s} s (a rank hung?); log:\n{log_tail(out, world)}")
            assert rc == 0, f"world-{world} launch exited {rc}; log:\n{log_tail(out, world)}"
        for world, proc in procs.items():  # reward workers exit within ~1 s of their parent
            leftover = session_pids(proc.pid)
            for _ in range(50):
                if not leftover:
                    break
                time.sleep(0.1)
                leftover = session_pids(proc.pid)
            assert not leftover, f"world-{world} launch left processes behind: {leftover}"
    finally:
        for proc in procs.values():
            if session_pids(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def log_tail(out: Path, world: int, lines: int = 40) -> str:
    return "\n".join((out / f"w{world}.log").read_text().splitlines()[-lines:])


def rank_micro_batches(
    rows: Sequence[int], grad_accum: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """The plain dealing, the reference for `trainer.data.batching.deal_micro_batches`' real micro-batches: this
    rank's rows ``rows[rank::world]`` of one optimizer batch in at most `grad_accum` near-equal micro-batches,
    ``[]`` when the batch has fewer rows than ranks. Ranks can get different numbers of micro-batches (5 rows,
    4 steps, 2 ranks: 3 and 2), which is why the trainer pads them with stand-ins.

    >>> rank_micro_batches([0, 1, 2, 3, 4], 2)
    [[0, 1, 2], [3, 4]]
    """
    if len(rows) < world:
        return []
    mine = list(rows)[rank::world]
    size = math.ceil(len(mine) / grad_accum)
    return [mine[i : i + size] for i in range(0, len(mine), size)]


def perturbed(path: str, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """The tiny model after a pretend training step: every weight plus N(0, scale²) noise."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def capture_grads_at_step(learner: Any) -> dict[str, torch.Tensor]:
    """Make `learner.step` first copy every gradient into the returned dict (what the optimizer sees)."""
    captured: dict[str, torch.Tensor] = {}
    original_step = learner.step

    def capture_then_step() -> float:
        captured.update({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None})
        return float(original_step())

    learner.step = capture_then_step
    return captured


def rolled_token_rows(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s weights with the embedding and LM-head rows shifted by one token: wrong weights of the right
    shapes, which a weight check passes and the stale-weight probe must catch."""
    from rollout.weights import iter_state_dict

    rolled = ("model.embed_tokens.weight", "lm_head.weight")
    return ((n, t.roll(1, 0) if n in rolled else t) for n, t in iter_state_dict(model))


def tiny_vllm_engine(path: str) -> Any:
    """An in-process float32 `VLLMEngine` of the tiny Qwen2 with a small fixed KV cache (quick start-up)."""
    from rollout.engines.vllm import VLLMEngine

    return VLLMEngine(path, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_model_len=512)


def vllm_at_least(major: int, minor: int) -> bool:
    """Whether the installed vLLM is release `major.minor` or newer (CI: 0.32; benchmarks/gpu: 0.26)."""
    import vllm
    from packaging.version import Version

    return Version(vllm.__version__).release[:2] >= (major, minor)


@contextmanager
def serving(server: HTTPServer) -> Iterator[str]:
    """`server` answering on a daemon thread while the block runs, then shut down; yields its base URL."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{server.server_address[0]}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
