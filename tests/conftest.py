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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly (with a reason) where no CUDA device exists."""
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
