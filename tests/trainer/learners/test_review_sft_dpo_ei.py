"""Edge cases of the SFT, DPO and expert-iteration modes and the warm start, on the tiny Qwen2 (CPU).

Runs single-threaded (`one_torch_thread`), as the other learner tests do on the shared 2-core machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO

from trainer.config_io import load_config
from trainer.tracking import read_metrics

SFT_CONFIG = REPO / "configs" / "tiny" / "sft_tiny_cpu.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sft_batch_of_empty_responses_only(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """Some (not all) responses empty, as `check_data` allows: at batch size 1 the empty one is an optimizer
    batch with no response token. It has nothing to learn (0 tokens in the token-mean NLL) and is skipped
    with its count logged; before, the step divided by a zero token count and the run died at that step
    ("global_token_count must be > 0"), naming no line."""
    from trainer.learners.sft import train_sft

    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "response": f" {i + 1}" if i != 2 else ""} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = load_config(SFT_CONFIG, [f"model.path={tiny_qwen2_path}", f"data.sft_path={data}", f"output_dir={out}",
                                   "sft.batch_size=1", "sft.gradient_accumulation_steps=1", "sft.num_epochs=1",
                                   "sft.max_steps=null", "sft.validation_fraction=0", "sft.eval_generation=false"])
    train_sft(cfg)
    records = read_metrics(out)
    logged = {k: v for r in records for k, v in r.items() if k.startswith("data/")}
    assert logged["data/sft_empty_responses"] == 1
    assert logged["data/sft_train_examples"] == 3
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
