"""The tiny configs run as shipped: `reasonrl tiny .tiny` writes the models and the SFT/DPO data the configs name
(relative paths, as a user runs them from the repository root), then each config trains 1-2 steps through
`reasonrl train` in a subprocess. Only step counts and evaluation sizes are overridden, never a path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def reasonrl(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WANDB_MODE="disabled", CI="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where `reasonrl tiny .tiny` ran, as a new user runs it in the repository root."""
    cwd = tmp_path_factory.mktemp("user")
    proc = reasonrl(cwd, "tiny", ".tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sft: .tiny/sft_arithmetic.jsonl" in proc.stdout and "dpo: .tiny/preferences_arithmetic.jsonl" in proc.stdout
    return cwd


def test_tiny_writes_the_data_the_configs_name(user_dir: Path) -> None:
    sft = [json.loads(x) for x in (user_dir / ".tiny" / "sft_arithmetic.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (user_dir / ".tiny" / "preferences_arithmetic.jsonl").read_text().splitlines()]
    assert (len(sft), len(pairs)) == (200, 400)
    assert set(sft[0]) == {"prompt", "response", "answer"} and sft[0]["response"].endswith("</answer>")
    assert pairs[23] == {"prompt": "What is 1 + 3?", "chosen": "1 + 3 = 4", "rejected": "1 + 3 = 14"}
    for name, key in [("configs/tiny/sft_tiny_cpu.yaml", "sft_path"),
                      ("configs/tiny/dpo_tiny_cpu.yaml", "preference_path")]:
        text = (REPO / name).read_text()
        assert f"  {key}: .tiny/" in text and "  path: .tiny/tiny-qwen2" in text


CASES = {
    "configs/tiny/sft_tiny_cpu.yaml": ["sft.max_steps=2", "data.eval_limit=4"],
    "configs/tiny/dpo_tiny_cpu.yaml": ["dpo.max_steps=2"],
    "configs/tiny/ei_tiny_cpu.yaml": ["ei.n_ei_steps=1", "ei.questions_per_step=8", "warmstart.steps=2",
                                      "data.eval_limit=8"],
    "configs/grpo_tiny_cpu.yaml": ["grpo.n_grpo_steps=1", "grpo.rollout_batch_size=16", "grpo.train_batch_size=16",
                                   "warmstart.steps=2", "data.eval_limit=8"],
}


@pytest.mark.parametrize("config", [pytest.param(c, marks=[pytest.mark.vllm] if "grpo" in c else [])
                                    for c in CASES])
def test_shipped_config_trains(user_dir: Path, tmp_path: Path, config: str) -> None:
    out = tmp_path / "run"
    proc = reasonrl(user_dir, "train", "--config", str(REPO / config), f"output_dir={out}", *CASES[config])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final:" in proc.stdout
    steps = 2 if "sft" in config or "dpo" in config else 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{steps:06d}"]
    assert (out / "checkpoints" / f"step_{steps:06d}" / "hf" / "config.json").is_file()
