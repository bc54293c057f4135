"""Edge cases of the SFT, DPO and expert-iteration modes and the warm start, on the tiny Qwen2 (CPU).

Runs single-threaded (`one_torch_thread`), as the other learner tests do on the shared 2-core machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO

from trainer.config_io import load_config
from trainer.tracking import read_metrics

SFT_CONFIG = REPO / "configs" / "tiny" / "sft_tiny_cpu.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate's state is a process-wide singleton that refuses a second mixed-precision setting: start
    from none and leave none behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


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


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_warm_start_leaves_the_learners_loss_scaler_alone(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """Under ``--mixed_precision fp16`` on a GPU accelerate keeps a loss scaler over the learner's optimizer.
    The warm start (its own AdamW, a plain backward) clipped through `Accelerator.clip_grad_norm_`, which
    unscales that optimizer's gradients: never scaled, so the first step failed (``_scale is None``), and a
    second unscale before the learner's own update is an error too. Here the CPU accelerator gets such a
    scaler by hand: the warm start must run, leave the scaler unused and move the weights."""
    from accelerate import Accelerator

    from trainer.config import ModelConfig, OptimConfig
    from trainer.data.tasks import make_arithmetic
    from trainer.learner import Learner
    from trainer.learners.warmstart import warm_start
    from trainer.timing import PhaseTimer
    from trainer.tracking import NullTracker

    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    learner = Learner(ModelConfig(path=tiny_qwen2_path, dtype="float32"), OptimConfig(learning_rate=1e-3),
                      accelerator)
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu")
    cfg = load_config(SFT_CONFIG, [f"model.path={tiny_qwen2_path}", "warmstart.steps=3", "warmstart.batch_size=4"])
    examples = make_arithmetic(8, seed=0, level=1)
    s = SimpleNamespace(cfg=cfg, learner=learner, accelerator=accelerator, timer=PhaseTimer(), progress_enabled=False,
                        is_main=True, run_dir=tmp_path, tracker=NullTracker(), train_examples=lambda: examples)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    metrics = warm_start(s)  # type: ignore[arg-type]
    assert torch.isfinite(torch.tensor(metrics["warmstart/final_loss"]))
    assert not accelerator.scaler._per_optimizer_states  # the learner's scaler was never asked to unscale
    moved = [n for n, p in learner.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and (tmp_path / "warmstart").is_dir()


def test_hh_convert_to_an_unwritable_out_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """OUT an existing folder: the final rename fails. Before, `main` let the OSError out as a traceback and
    left ``OUT.tmp`` behind; now it is one ``error:`` line naming OUT, exit status 2, and no ``.tmp``."""
    from trainer.data.hh import main

    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps({"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
                                  "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    assert main([str(source), str(out)]) == 2
    assert f"{out}" in capsys.readouterr().err
    assert not (tmp_path / "out.tmp").exists()


def test_resumed_sft_logs_its_data_counts_at_the_resumed_step(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """With ``sft.filter_correct`` the data counts were logged at step 0 on every start: a resumed run wrote a
    step-0 record after the records of the steps already done (steps must not go back: wandb drops such a
    record). Now they are logged at the step the run starts from, like ``data/sft_train_examples``."""
    from trainer.cli import main as cli_main

    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"What is {i} + 1? <think>", "response": f" {i} plus 1 </think> <answer> {i + 1} </answer>",
             "answer": str(i + 1)} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    common = [f"model.path={tiny_qwen2_path}", f"data.sft_path={data}", "sft.filter_correct=true",
              "sft.batch_size=4", "sft.gradient_accumulation_steps=1", "sft.eval_generation=false"]
    assert cli_main(["train", "--config", str(SFT_CONFIG), *common, f"output_dir={out}", "sft.max_steps=1"]) == 0
    assert cli_main(["train", "--resume", str(out), "sft.max_steps=2"]) == 0
    records = read_metrics(out)
    steps = [r["step"] for r in records]
    assert steps == sorted(steps), steps
    counted = [r["step"] for r in records if "data/sft_examples_correct" in r]
    assert counted == [0, 1] and [r["step"] for r in records if "train/loss" in r] == [1, 2]
