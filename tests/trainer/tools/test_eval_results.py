"""`reasonrl eval` writes its results beside what it evaluated and says where (trainer.tools.eval_cli)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, launch_env

from trainer.config_io import load_config
from trainer.tools.eval_cli import results_dir, run_eval

TINY = REPO / "configs" / "grpo_tiny_cpu.yaml"


def test_results_dir_is_beside_the_checkpoint_and_never_reused(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}"])
    ckpt = tmp_path / "checkpoints" / "step_000040"
    first = results_dir(cfg, str(ckpt))
    assert first.parent == ckpt / "eval"
    first.mkdir(parents=True)
    second = results_dir(cfg, str(ckpt))  # the same second: a suffix, not the same directory
    assert second.parent == first.parent and second != first and second.name.startswith(first.name)
    assert results_dir(cfg, None).parent == tmp_path / "run" / "standalone_eval"  # the base model (maybe a hub id)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_eval_of_a_run_checkpoint_writes_beside_it(tiny_qwen2_path: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A run checkpoint (step_N/hf/ holds the model): results under step_N/eval/<time>/, printed, --out copied;
    nothing is written under the config's output_dir."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    shutil.copytree(tiny_qwen2_path, ckpt / "hf")
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'elsewhere'}", "rollout.engine=hf", "eval.limit=3",
                             "eval.max_tokens=4"])
    out = tmp_path / "samples.jsonl"
    metrics = run_eval(cfg, str(ckpt), str(out))
    [where] = (ckpt / "eval").iterdir()
    samples = where / "eval" / "step_000000_eval.jsonl"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"eval results: {where} (metrics.jsonl; per-sample records: {samples}, copied to {out})")
    assert "eval/accuracy" in metrics
    assert len(samples.read_text().splitlines()) == 3 and out.read_text() == samples.read_text()
    logged = [json.loads(x) for x in (where / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in r for r in logged)
    assert (where / "config.yaml").is_file() and not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_two_rank_eval_writes_one_results_dir(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """`reasonrl eval` launched on 2 ranks (torchrun, gloo): each rank samples a share of the questions and
    rank 0 writes every record into its results folder and alone prints it."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer",
           "eval", "--config", str(TINY), f"model.path={tiny_qwen2_path}", f"output_dir={run}", "rollout.engine=hf",
           "eval.limit=5", "eval.max_tokens=4", "reward.num_workers=1", "logging.progress=false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(cpu_ddp=True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    [where] = (run / "standalone_eval").iterdir()
    samples = where / "eval" / "step_000000_eval.jsonl"
    assert len(samples.read_text().splitlines()) == 5
    printed = [line for line in proc.stdout.splitlines() if line.startswith("eval results:")]
    assert printed == [f"eval results: {where} (metrics.jsonl; per-sample records: {samples})"]
    shares = [line for line in proc.stderr.splitlines() if "evaluation: " in line and " questions (" in line]
    assert sorted(line.split("evaluation: ")[1].split(" questions")[0] for line in shares) == ["2", "3"], shares
