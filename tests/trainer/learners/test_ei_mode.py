"""Expert iteration end to end on the tiny Qwen2 (CPU): SFT (`train_sft`, configs/tiny/sft_tiny_cpu.yaml)
then expert iteration through the real CLI (configs/tiny/ei_tiny_cpu.yaml) on the synthetic arithmetic task.

Rollouts use the HF engine (`rollout.engine: hf`, sharing the learner's module): it keeps the test short;
the engine protocol is the same for vLLM. Runs single-threaded (`one_thread`), which was 3× faster than
two OpenMP threads on the shared 2-core machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import REPO
from safetensors.torch import load_file

from trainer.cli import main as cli_main
from trainer.config_io import load_config
from trainer.data.tasks import load_task
from trainer.learners.sft import train_sft
from trainer.tracking import read_metrics

SFT_CONFIG = REPO / "configs" / "tiny" / "sft_tiny_cpu.yaml"
EI_CONFIG = REPO / "configs" / "tiny" / "ei_tiny_cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_sloppy_sft(path: Path) -> None:
    """Correct single-digit sums in the ``r1_short`` prompt; every other response drops the ``<answer>`` tag
    (``… </think> 7 </answer>``), which the r1_zero reward scores 0."""
    rows = []
    for i, ex in enumerate(load_task("arithmetic:1", None, "train", 2000, 0)):
        tail = f" <answer> {ex.answer} </answer>" if i % 2 == 0 else f" {ex.answer} </answer>"
        rows.append({"prompt": f"User: {ex.question}\nAssistant: <think>",
                     "response": f" {ex.solution} </think>{tail}", "answer": ex.answer})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_expert_iteration_raises_accuracy(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """SFT on a sloppy set (half the responses unformatted) gives a policy that answers right some of the
    time but formats only ~60% of its answers; four EI steps (64 questions × 8 samples, keep the correct,
    2 epochs of SFT at lr 1e-3) must raise held-out accuracy.

    Accuracy is measured on 1000 held-out samples at temperature 1 (standard error ≤ 0.016 per
    evaluation, ≤ 0.022 for the difference). Measured: 0.218 → 0.364, and 0.21 → 0.411 with EI seed 1;
    format rate 0.61 → ≥ 0.99. The test asks for +0.1 (4.5 standard errors of the difference) and a
    format rate ≥ 0.9: EI can only train on formatted, correct samples, so a rise this size is the
    selection at work, not sampling noise.
    """
    data = tmp_path / "sft.jsonl"
    write_sloppy_sft(data)
    sft_out = tmp_path / "sft"
    train_sft(load_config(SFT_CONFIG, [
        f"model.path={tiny_qwen2_path}", f"data.sft_path={data}", f"output_dir={sft_out}", "sft.max_steps=200",
        "sft.batch_size=32", "sft.gradient_accumulation_steps=1", "sft.validation_fraction=0.05",
        "optim.warmup_steps=20"]))  # fmt: skip
    (sft_ckpt,) = (sft_out / "checkpoints").iterdir()
    start_model = sft_ckpt / "hf"

    out = tmp_path / "ei"
    argv = [
        "train",
        "--config",
        str(EI_CONFIG),
        f"model.path={start_model}",
        "warmstart.steps=0",
        f"output_dir={out}",
    ]
    assert cli_main(argv) == 0
    records = read_metrics(out)
    evals = [(r["step"], r["eval/accuracy"], r["eval/format_rate"]) for r in records if "eval/accuracy" in r]
    assert [e[0] for e in evals] == [0, 4]
    (_, acc0, fmt0), (_, acc1, fmt1) = evals
    assert fmt0 < 0.75 and fmt1 >= 0.9, evals
    assert acc1 >= acc0 + 0.1, evals
    steps = [r for r in records if "ei/kept" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:  # the kept dataset size and the response entropy are logged every step
        assert 0 < r["ei/kept"] <= 64 * 8 and r["ei/kept_fraction"] == r["ei/kept"] / 512
        assert math.isfinite(r["ei/response_entropy"]) and r["ei/response_entropy"] > 0
        assert math.isfinite(r["train/loss"]) and r["train/optimizer_steps"] >= 2
    # every trainable parameter moved away from the SFT starting point
    initial = load_file(start_model / "model.safetensors")
    (ckpt,) = (out / "checkpoints").iterdir()
    final = load_file(ckpt / "hf" / "model.safetensors")
    assert set(initial) == set(final)
    assert not [k for k in initial if torch.equal(initial[k], final[k])]
