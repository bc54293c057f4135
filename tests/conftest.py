"""Shared fixtures: tiny locally built models (loaded via from_pretrained like a user checkpoint), data paths."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"


# Modules whose tests race threads or processes against the clock (weights handed over into a running batch,
# request and reward time-outs, signals, overlap timestamps): marked `timing`, and `make test` runs them on their
# own after the rest. Beside a second test worker on 2 cores they can miss (measured: the in-flight hand-over
# landed after every batch it was aimed at).
TIMING_MODULES = frozenset(f"tests/{name}.py" for name in (
    "rollout/reward/test_rewards", "rollout/reward/test_rewards_adversarial", "rollout/reward/test_custom_rewards",
    "rollout/test_rollout_server", "rollout/test_server_auth", "rollout/test_collective_transfer",
    "rollout/test_transfer_faults", "trainer/learners/test_async_grpo", "trainer/learners/test_async_grpo_server",
    "trainer/learners/test_async_shutdown_resume", "trainer/learners/test_inflight_updates",
    "trainer/learners/test_rollout_table", "trainer/tools/test_shaped", "trainer/test_dp_train_cli",
    "trainer/test_stop_signal",
))  # fmt: skip
# The longest modules (minutes each on 2 cores) run first, so that parallel workers (`make test`) end together
# instead of one working through a long module alone at the end.
LONGEST_MODULES = tuple(f"tests/{name}.py" for name in (
    "trainer/tools/test_real_model", "trainer/test_deepspeed_runs", "project/test_benchmarks",
    "trainer/learners/test_grpo_learns", "trainer/test_deepspeed", "trainer/test_cli",
))  # fmt: skip


def module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks the `TIMING_MODULES`' tests `timing`, puts the `LONGEST_MODULES` first (each module's tests stay
    together and in order), and skips GPU tests cleanly (with a reason) where no CUDA device exists."""
    first = {name: rank for rank, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: first.get(module_of(item), len(first)))
    for item in items:
        if module_of(item) in TIMING_MODULES:
            item.add_marker(pytest.mark.timing)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Single-threaded torch for learning runs (about 3x faster on a shared 2-core machine), then restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trainer.tools.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_path(tiny_dir: dict[str, Path]) -> str:
    return str(tiny_dir["tiny-gpt2"])


@pytest.fixture(scope="session")
def tiny_qwen2_path(tiny_dir: dict[str, Path]) -> str:
    return str(tiny_dir["tiny-qwen2"])


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (SHARED_GSM8K / "test.jsonl").exists():
        raise FileNotFoundError(f"GSM8K data expected at {SHARED_GSM8K} (../shared beside the checkout)")
    return SHARED_GSM8K
