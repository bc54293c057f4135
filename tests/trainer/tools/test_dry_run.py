"""`reasonrl train --dry-run` (`trainer.tools.dry_run`): the schedule computed by hand, nothing loaded or written
(the model folder it reads has no weights file), and each refusal training would make, made before training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from transformers import AutoModelForCausalLM

from trainer.checkpoint import StorageError
from trainer.config import ConfigError
from trainer.config_io import load_config
from trainer.data.checks import DatasetFormatError
from trainer.tools.dry_run import dry_run

GSM8K_CONFIG = REPO / "configs" / "grpo_qwen2.5_math_1.5b_gsm8k.yaml"


def without_weights(model: str, out: Path) -> Path:
    """A copy of the tiny model folder holding only its config and tokenizer files."""
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


def gsm8k_overrides(model: str | Path, gsm8k_dir: Path, out: Path) -> list[str]:
    return [f"model.path={model}", f"output_dir={out}", f"data.train_source={gsm8k_dir / 'train.jsonl'}",
            f"data.eval_source={gsm8k_dir / 'test.jsonl'}"]


def test_cli_prints_the_schedule_and_writes_nothing(tiny_qwen2_path: str, gsm8k_dir: Path, tmp_path: Path) -> None:
    """The shipped 1.5B GRPO config on GSM8K over 8 ranks: 200 steps x 256 rollouts = 200 x 32 questions =
    6,400 of 7,473 training questions (0.86 passes), one optimizer step per step (train batch = rollout batch,
    one epoch); 1,024 held-out questions (eval.limit). The model folder has no weights, and no run folder
    appears."""
    model = without_weights(tiny_qwen2_path, tmp_path / "model")
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled", CI="1")
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(GSM8K_CONFIG), "--dry-run",
                           "--world-size", "8", *gsm8k_overrides(model, gsm8k_dir, run)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "config: mode grpo, world size 8" in out
    assert ("schedule: 200 steps x 256 rollouts (32 questions x 8) = 6,400 questions drawn, 0.86 passes over the "
            "training questions; 200 optimizer steps") in out
    assert "data (train): 7,473 questions" in out and "data (held-out): 1,024 questions" in out
    assert "rollouts: each of 8 ranks samples 4 questions x 8 per step from vLLM colocated with each rank" in out
    assert "reward: r1_zero: 64/64 sampled golds" in out and "warning" not in out
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_qwen2_path).parameters())
    assert f"{params / 1e3:.2f} k parameters" in out  # the meta-device count is the loaded model's
    assert out.rstrip().endswith("dry run: the run would start (nothing was loaded onto a device or written)")
    assert not run.exists()
    assert not list(model.glob("*.safetensors"))


def test_prompt_lengths_and_the_context_check(tiny_qwen2_path: str, gsm8k_dir: Path, tmp_path: Path) -> None:
    """The prompt lengths are the tokenizer's count of the formatted prompts; prompts that leave less than
    eval.max_tokens of a 512-token context are counted in a warning (as many as a hand count finds); a context
    that fits none of them is the error training raises when it loads the questions (data.max_skipped_fraction)."""
    from trainer.data.prompts import format_prompt
    from trainer.data.tasks import load_task
    from trainer.learner import load_tokenizer

    cfg = load_config(GSM8K_CONFIG, [*gsm8k_overrides(tiny_qwen2_path, gsm8k_dir, tmp_path / "run"), "eval.limit=50"])
    lines = dry_run(cfg)
    tokenizer = load_tokenizer(tiny_qwen2_path)
    held_out = load_task("gsm8k", gsm8k_dir / "test.jsonl", "test", 50, cfg.seed)
    lengths = sorted(len(tokenizer(format_prompt("r1_zero", question=ex.question))["input_ids"]) for ex in held_out)
    median = (lengths[24] + lengths[25]) / 2
    assert any(line.startswith("data (held-out): 50 questions") and f"median {median:.0f}, max {lengths[-1]}" in line
               for line in lines), lines
    assert not any(line.startswith("warning") for line in lines)  # 2048 positions: room for 1024 new tokens
    cramped = load_config(GSM8K_CONFIG, [*gsm8k_overrides(tiny_qwen2_path, gsm8k_dir, tmp_path / "run"),
                                         "eval.limit=50", "rollout.max_model_len=512", "eval.max_tokens=300"])
    expected = sum(n + 300 > 512 for n in lengths)
    assert 0 < expected < 50
    assert (f"warning: {expected} of 50 held-out prompts leave fewer than eval.max_tokens=300 tokens of the "
            "512-token context: their responses end early (finish_reason length)") in dry_run(cramped)
    short = load_config(GSM8K_CONFIG, [*gsm8k_overrides(tiny_qwen2_path, gsm8k_dir, tmp_path / "run"),
                                       "rollout.max_model_len=64", "rollout.max_tokens=32", "eval.max_tokens=32"])
    with pytest.raises(DatasetFormatError, match="64 tokens or more"):
        dry_run(short)


def test_refusals_come_before_training(tiny_qwen2_path: str, gsm8k_dir: Path, tmp_path: Path) -> None:
    """A batch that 3 ranks cannot split, a folder that holds a run (without --resume) and an unwritable parent
    (here a file) are errors before anything loads; with --resume the run's folder is the one it continues."""
    cfg = load_config(GSM8K_CONFIG, gsm8k_overrides(tiny_qwen2_path, gsm8k_dir, tmp_path / "run"))
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        dry_run(cfg, world_size=3)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="already holds a run: pass --resume"):
        dry_run(cfg)
    assert any("continues its newest checkpoint" in line for line in dry_run(cfg, resume=True, world_size=8))
    beside_a_file = tmp_path / "notes.txt"
    beside_a_file.write_text("a file where a folder would go")
    unwritable = load_config(GSM8K_CONFIG, gsm8k_overrides(tiny_qwen2_path, gsm8k_dir, beside_a_file / "run"))
    with pytest.raises(StorageError, match=r"notes\.txt is not a writable directory"):
        dry_run(unwritable)


def test_the_rollout_layout_is_named(tiny_qwen2_path: str, gsm8k_dir: Path, tmp_path: Path) -> None:
    """Asynchronous GRPO on 4 ranks and a rollout server: rank 0 samples the 256 rollouts, each rank trains on 64;
    synchronous on the same server: each rank samples 32 / 4 = 8 questions x 8."""
    remote = [*gsm8k_overrides(tiny_qwen2_path, gsm8k_dir, tmp_path / "run"), "rollout.placement=remote",
              "rollout.server_url=http://rollouts:8000", f"rollout.weight_transfer_dir={tmp_path / 'weights'}",
              "rollout.sleep_between_rollouts=false"]
    lines = dry_run(load_config(GSM8K_CONFIG, [*remote, "grpo.max_staleness=1"]), world_size=4)
    assert ("rollouts: asynchronous (grpo.max_staleness=1): rank 0 samples each step's 256 rollouts from the "
            "rollout server at http://rollouts:8000 while the ranks train on an earlier step's; each of 4 ranks "
            "trains on 64") in lines
    lines = dry_run(load_config(GSM8K_CONFIG, remote), world_size=4)
    assert ("rollouts: each of 4 ranks samples 8 questions x 8 per step from the rollout server at "
            "http://rollouts:8000, then trains on them") in lines


def test_golds_the_reward_can_never_pay_are_named(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """Of 4 custom questions, one gold is a worked solution (the wrong column was read) and one a cut-off
    ``\\boxed{12`` that the r1_zero grader cannot match even against itself: both warnings, with counts."""
    rows = [("What is 2 + 3?", "5"), ("What is 4 + 4?", "Four and four.\nThe answer is 8"),
            ("What is 6 + 6?", "\\boxed{12"), ("What is 1 + 1?", "2")]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in rows))
    cfg = load_config(GSM8K_CONFIG, [
        f"model.path={tiny_qwen2_path}", f"output_dir={tmp_path / 'run'}", "data.task=custom",
        f"data.train_source={data}", f"data.eval_source={data}", "data.question_column=q", "data.answer_column=a",
        "data.answer_parser=plain"])
    lines = dry_run(cfg)
    assert "reward: r1_zero: 6/8 sampled golds, written as its ideal response, score 1" in lines
    cut_off = [line for line in lines if "cannot match 2 gold(s)" in line]
    assert len(cut_off) == 1 and "'\\\\boxed{12'" in cut_off[0]
    assert any(line.startswith("warning: 2 of 8 golds span several lines") for line in lines), lines


def test_sft_checks_its_data_and_model_only(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """SFT has no rollout schedule: the model and output lines; an SFT file with only empty responses is the
    error training gives."""
    from trainer.tools.tiny import write_tiny_data

    data = write_tiny_data(tmp_path / "data")
    sft = REPO / "configs" / "tiny" / "sft_tiny_cpu.yaml"
    common = [f"model.path={tiny_qwen2_path}", f"output_dir={tmp_path / 'run'}"]
    lines = dry_run(load_config(sft, [*common, f"data.sft_path={data['sft']}"]))
    assert [line.split(":")[0] for line in lines] == ["config", "output", "model"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "p", "response": ""}) + "\n")
    with pytest.raises(DatasetFormatError, match="every 'response' is empty"):
        dry_run(load_config(sft, [*common, f"data.sft_path={empty}"]))


def test_counts_are_printed_with_their_unit() -> None:
    from trainer.tools.dry_run import _count

    assert (_count(1_543_714_304), _count(3_087_428_608), _count(460_160), _count(12)) == (
        "1.54 G", "3.09 G", "460.16 k", "12 ")


def test_world_size_goes_with_dry_run_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --dry-run the launcher sets the world size: `--world-size` there is refused, not ignored."""
    from trainer.cli import main

    code = main(["train", "--config", str(GSM8K_CONFIG), "--world-size", "8", f"output_dir={tmp_path / 'run'}"])
    assert code == 2 and not (tmp_path / "run").exists()
    assert "--world-size 8 goes with --dry-run" in capsys.readouterr().err
