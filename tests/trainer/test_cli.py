"""The `reasonrl` command line, run as a real subprocess: errors, eval of a checkpoint, plot, server command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, assert_interrupted_in_one_line, ctrl_c, reaped, start_interruptible

TINY = REPO / "configs" / "grpo_tiny_cpu.yaml"


def reasonrl(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WANDB_MODE="disabled", CI="1")
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_bad_config_exits_2_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: m\ngrpo:\n  train_batch_sise: 4\n  group_size: eight\n")
    proc = reasonrl("train", "--config", str(bad))
    assert proc.returncode == 2
    assert "grpo.train_batch_sise: unknown key" in proc.stderr
    assert "grpo.group_size='eight'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    proc = reasonrl("train", "--config", str(TINY), f"output_dir={tmp_path}", "model.path=nowhere")
    assert proc.returncode == 2
    assert f"output_dir={tmp_path} already holds a run: pass --resume" in proc.stderr


def test_resume_takes_the_runs_config_not_another(tmp_path: Path) -> None:
    """`--resume` continues with RUN_DIR/config.yaml; a second config is refused (it would silently replace
    the run's settings), and so is a directory that holds no run."""
    (tmp_path / "config.yaml").write_text(TINY.read_text())
    both = reasonrl("train", "--config", str(TINY), "--resume", str(tmp_path))
    assert both.returncode == 2
    assert f"--resume continues with {tmp_path / 'config.yaml'}" in both.stderr
    assert "drop --config" in both.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = reasonrl("train", "--resume", str(empty))
    assert proc.returncode == 2 and "no config.yaml there" in proc.stderr
    none = reasonrl("train")
    assert none.returncode == 2 and "train needs --config FILE" in none.stderr
    moved = reasonrl("train", "--resume", str(tmp_path), f"output_dir={tmp_path / 'elsewhere'}")
    assert moved.returncode == 2  # it was silently replaced by the run directory
    assert f"output_dir={tmp_path / 'elsewhere'} cannot move it" in moved.stderr


@pytest.mark.slow
def test_eval_checkpoint_and_plot(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """`reasonrl eval` on a model dir (the zero-shot baseline path) writes per-sample JSONL, and its results
    beside the model (MODEL/eval/<time>/), printing where; `plot` a PNG."""
    out = tmp_path / "samples" / "eval.jsonl"  # its folder is created
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2_path, model)  # results are written beside it: keep the shared tiny model clean
    proc = reasonrl("eval", "--config", str(TINY), "--checkpoint", str(model), "--out", str(out),
                    f"output_dir={tmp_path / 'run'}", "rollout.engine=hf", "eval.limit=6", "eval.max_tokens=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval/accuracy" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6
    assert set(records[0]) >= {"prompt", "response", "gold", "reward", "format_reward", "answer_reward", "length",
                               "entropy"}
    [run] = (model / "eval").iterdir()
    assert f"eval results: {run} (metrics.jsonl; per-sample records: {run / 'eval' / 'step_000000_eval.jsonl'}" in proc.stdout
    assert not (tmp_path / "run").exists()
    plot = reasonrl("plot", str(run))
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_rollout_server_command_passes_its_arguments_through() -> None:
    proc = reasonrl("rollout-server", "--model", "/models/x", "--port", "8123", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vllm.entrypoints" in proc.stdout and "--model /models/x" in proc.stdout and "--port 8123" in proc.stdout


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]  # shows what else reached stderr
    return lines[0]


def test_plot_refuses_what_it_cannot_read_in_one_line(tmp_path: Path) -> None:
    """A run directory `plot` cannot read is one error line naming it, exit 2: an undecodable record before the
    last line, a file given as RUN_DIR and non-UTF-8 bytes were Python tracebacks (exit 1)."""
    runs = {"torn_middle": '{"step": 1}\nnot json\n{"step": 2}\n', "not_utf8": '{"step": 1}\n\udcff\n',
            "no_step": '[1, 2]\n{"step": 2}\n', "empty": ""}
    for name, text in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_bytes(text.encode("utf-8", "surrogateescape"))
    (tmp_path / "no_metrics").mkdir()
    (tmp_path / "a_file").write_text("x")
    expected = {"torn_middle": "torn_middle/metrics.jsonl:2: not a JSON record",
                "not_utf8": "not_utf8/metrics.jsonl: not UTF-8 text",
                "no_step": "no_step/metrics.jsonl: not reasonrl metrics",
                "empty": "empty/metrics.jsonl has no records to plot",
                "no_metrics": "no_metrics/metrics.jsonl: not found",
                "a_file": "a_file: not a directory",
                "missing": "missing: no such run directory"}
    for name, words in expected.items():
        line = _one_error_line(reasonrl("plot", name, cwd=tmp_path))
        assert line.startswith("reasonrl: error: ") and words in line, (name, line)


def test_plot_prints_the_path_it_wrote(tmp_path: Path) -> None:
    """`plot --out` prints the file it wrote: matplotlib added .png to a path without a suffix (and wrote
    DIR.png for a folder) while the command printed the path as given; a panel with no data no longer
    prints matplotlib's empty-legend warning; a missing parent folder is created; a format matplotlib cannot
    write is one error line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/reward_mean": 0.5}\n{"step": 2, "reward/reward_mean": 0.7}\n')
    for out, written in [("curves", "curves.png"), ("run", "run/curves.png"), ("new/x.png", "new/x.png"),
                         ("x.svg", "x.svg")]:
        proc = reasonrl("plot", "run", "--out", out, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == written and proc.stderr == ""
        assert (tmp_path / written).stat().st_size > 0
    assert not (tmp_path / "run.png").exists() and not (tmp_path / "curves").exists()
    line = _one_error_line(reasonrl("plot", "run", "--out", "x.v2", cwd=tmp_path))
    assert "--out x.v2: matplotlib cannot write .v2 files" in line and not (tmp_path / "x.v2").exists()


def test_demo_refuses_an_out_folder_it_would_delete(tmp_path: Path) -> None:
    """`demo` deletes its run directory before it starts: `--out` of a folder holding anything but a reasonrl
    run deleted it, and so did a run whose override had a typo (the config was read after the delete). Now
    such a folder is refused before anything is deleted, the overrides are checked first, and output_dir= (which
    moved the run away from where the demo then read it) is refused."""
    tiny = tmp_path / ".tiny" / "tiny-qwen2"
    tiny.mkdir(parents=True)
    (tiny / "config.json").write_text("{}")  # the demo does not build its tiny model again
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    proc = reasonrl("demo", "--out", "notes", "grpo.n_grpo_steps=abc", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "reasonrl: error: --out notes: a folder holding other files; the demo deletes" in proc.stderr
    assert (notes / "thesis.txt").read_text() == "years of work"
    earlier = tmp_path / "runs" / "demo"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("mode: grpo\n")
    (earlier / "reasonrl_demo.json").write_text("{}")  # an earlier demo's
    typo = reasonrl("demo", "grpo.n_grpo_step=5", cwd=tmp_path)
    assert typo.returncode == 2 and "grpo.n_grpo_step: unknown key" in typo.stderr, typo.stderr[-2000:]
    assert (earlier / "config.yaml").is_file()
    moved = reasonrl("demo", "output_dir=elsewhere", cwd=tmp_path)
    assert moved.returncode == 2 and "output_dir=elsewhere: the demo's run directory is --out" in moved.stderr
    assert (earlier / "config.yaml").is_file() and not (tmp_path / "elsewhere").exists()


def test_demo_refuses_a_training_run_as_out(tmp_path: Path) -> None:
    """`demo --out RUN` of a training run of your own (config.yaml, metrics, checkpoints: hours of work) deleted
    it, since the demo took any reasonrl run for an earlier demo; now only a folder a demo wrote (it holds
    reasonrl_demo.json) is replaced, and anything else is one error line, before anything is deleted."""
    tiny = tmp_path / ".tiny" / "tiny-qwen2"
    tiny.mkdir(parents=True)
    (tiny / "config.json").write_text("{}")  # the demo does not build its tiny model again
    run = tmp_path / "runs" / "mine"
    (run / "checkpoints" / "step_000400").mkdir(parents=True)
    (run / "config.yaml").write_text("mode: grpo\noutput_dir: runs/mine\n")
    (run / "metrics.jsonl").write_text('{"step": 400}\n')
    (run / "checkpoints" / "step_000400" / "model.safetensors").write_text("weights")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = reasonrl("demo", "--out", "runs/mine", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "reasonrl: error: --out runs/mine: a reasonrl run that no demo wrote; the demo deletes its run directory "
        "before it starts and deletes only one an earlier demo wrote (it holds reasonrl_demo.json): give a new or "
        "empty folder")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "checkpoints" / "step_000400" / "model.safetensors").read_text() == "weights"


def test_demo_refusal_comes_alone_before_the_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused `demo --out DIR` (a folder of other files) or a mistyped override logged the CPU thread count
    ("CPU threads: ...", chosen where OMP_NUM_THREADS is unset) before the refusal. Now --out and the overrides
    are checked first: the refusal is the only line on stderr."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # unset: the demo would choose the threads and log them
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    for args, refusal in ((["--out", "notes"], "reasonrl: error: --out notes: a folder holding other files"),
                          (["--out", "new", "grpo.n_grpo_step=5"], "grpo.n_grpo_step: unknown key")):
        proc = reasonrl("demo", *args, cwd=tmp_path)
        assert proc.returncode == 2 and refusal in proc.stderr, proc.stderr[-2000:]
        assert "CPU threads" not in proc.stderr and proc.stderr.startswith("reasonrl: error: "), proc.stderr[-2000:]
    assert (notes / "thesis.txt").read_text() == "years of work" and not (tmp_path / "new").exists()


def test_eval_refuses_a_folder_as_out_and_a_run_dir_as_checkpoint_before_evaluating(tmp_path: Path) -> None:
    """`eval --out FOLDER` evaluated everything, then failed copying the records with a Python traceback
    (IsADirectoryError, exit 1); now it is one error line before anything loads. `--checkpoint RUN_DIR` (the run,
    not one of its checkpoints) says which folder holds the checkpoints."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # never loaded: the command stops before
    proc = reasonrl("eval", "--config", str(TINY), "--checkpoint", str(model), "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"reasonrl: error: --out {tmp_path}: a directory; give the path of the JSONL file" in proc.stderr
    assert not (model / "eval").exists()
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000040").mkdir(parents=True)
    proc = reasonrl("eval", "--config", str(TINY), "--checkpoint", str(run), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--checkpoint {run}: a run directory; give one of its checkpoints ({run / 'checkpoints'}/step_N)" in proc.stderr


def test_resume_without_a_checkpoint_stops_before_loading(tmp_path: Path) -> None:
    """`--resume RUN_DIR` of a run stopped before its first checkpoint loaded the whole model before it found
    nothing to resume; now that is the first thing checked (here the model does not even exist)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000010.tmp").mkdir(parents=True)  # an unfinished save is no checkpoint
    (run / "config.yaml").write_text(TINY.read_text().replace(".tiny/tiny-qwen2", str(tmp_path / "no_model")))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = reasonrl("train", "--resume", str(run), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"reasonrl: error: --resume {run}: no complete checkpoint under {run / 'checkpoints'}" in proc.stderr
    assert "no_model" not in proc.stderr


def test_rollout_server_after_verbose_flag() -> None:
    """`reasonrl -v rollout-server ...` went to the main parser: its options were 'unrecognized', and with none
    it was a Python traceback (AttributeError: no 'fn')."""
    proc = reasonrl("-v", "rollout-server", "--model", "/models/x", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vllm.entrypoints" in proc.stdout and "--model /models/x" in proc.stdout
    bare = reasonrl("--verbose", "rollout-server")
    assert bare.returncode == 2 and "Traceback" not in bare.stderr, bare.stderr[-2000:]
    assert "reasonrl rollout-server: error: the following arguments are required: --model" in bare.stderr


def test_config_errors_are_the_only_lines_printed(tmp_path: Path) -> None:
    """A config error of `train` or `eval` is all the command prints: the CPU thread choice was logged first
    (and torch imported for it) before the config was even read."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # else no thread choice is logged
    for command in (["train", "--config", "nope.yaml"], ["eval", "--config", str(TINY), "grpo.n_grpo_steps=abc"]):
        proc = subprocess.run([sys.executable, "-m", "trainer", *command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith("reasonrl: error: "), proc.stderr[-2000:]
        assert all(line.startswith(("reasonrl: error: ", "  - ")) for line in proc.stderr.splitlines()), proc.stderr


def test_tiny_into_a_file_is_one_error_line(tmp_path: Path) -> None:
    """`reasonrl tiny FILE` (or a folder under a file) trained the tokenizer, then ended in a Python traceback
    (NotADirectoryError from save_pretrained); now a file is refused up front (exit 2) and a failed write is
    one line naming the folder (exit 1)."""
    (tmp_path / "notes.txt").write_text("x")
    proc = reasonrl("tiny", "notes.txt", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "reasonrl tiny: error: notes.txt is a file, not a directory" in proc.stderr
    proc = reasonrl("tiny", "notes.txt/models", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("reasonrl tiny: error: cannot write under notes.txt/models: ")
    assert (tmp_path / "notes.txt").read_text() == "x"


def test_printed_metrics_show_counts_as_integers() -> None:
    """`train`'s final line and `eval`'s table: eval/n=400, not 400.0000; fractions to 4 decimals."""
    from trainer.cli import _shown

    assert [_shown(v) for v in (400.0, 0.228, -0.00712, 1e20, 2.0)] == ["400", "0.2280", "-0.0071", "100000000000000000000.0000", "2"]


def test_ctrl_c_is_one_line_and_death_by_sigint(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """Ctrl-C during a command (here `train`, in its SFT warm start) printed a Python traceback from wherever it
    was (torch's backward); now it is one line, "reasonrl: interrupted", and what the run wrote stays. The
    process still dies of SIGINT (after Python's cleanup), as a calling shell needs to stop its own loop. The signal goes to the whole process group, as a terminal's Ctrl-C does."""
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled", CI="1")
    proc = start_interruptible(
        [sys.executable, "-m", "trainer", "train", "--config", str(TINY), f"output_dir={run}",
         f"model.path={tiny_qwen2_path}", "rollout.engine=hf", "logging.progress=false"],
        tmp_path, env, subprocess.DEVNULL, subprocess.PIPE)
    with reaped(proc):
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # at work: the warm start's first progress line
            seen.append(line)
            if "warm start (SFT) step" in line:
                break
        else:
            raise AssertionError("train ended before its warm start logged a step:\n" + "".join(seen)[-2000:])
        rest = ctrl_c(proc)[1]
    assert_interrupted_in_one_line(proc, "".join(seen) + rest)
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
