"""I/O faults (issue 14, section 3): a checkpoint write that runs out of room, and a run directory that cannot
be written. Each ends with one message naming the path and the cause, no traceback, the partial
``step_N.tmp`` removed, and the previous checkpoint intact and resumable.

Every case starts from a copy of one real run (`reasonrl train`, tiny Qwen2, SFT, a checkpoint after step 1)
and resumes it to step 2 under a real fault, in a subprocess:

- a file-size limit: ``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored, so writes fail with EFBIG;
- a full file system: a small tmpfs in a private mount namespace (``unshare -m``), filled to 1 MiB free;
- a read-only directory: ``chmod 0o555``. Tests run as root here, where mode bits do not stop writes
  (CAP_DAC_OVERRIDE), so the subprocess drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its capability
  bounding set first (`prctl(PR_CAPBSET_DROP)`): as root without them, the mode bits hold. A root process
  that cannot drop them fails the test (it is never skipped).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO, launch_env

from trainer.data.prompts import format_prompt
from trainer.data.tasks import make_arithmetic

SFT = REPO / "configs" / "tiny" / "sft_tiny_cpu.yaml"
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2

pytestmark = pytest.mark.slow


def reasonrl(*args: str, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WANDB_MODE="disabled", CI="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=preexec_fn)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``reasonrl: error:`` line of a failed run; no traceback anywhere."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("reasonrl: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def snapshot(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under `root` (directories as "dir")."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_path: str) -> Path:
    """A real run that stopped after step 1 with a checkpoint (``step_000001``)."""
    root = tmp_path_factory.mktemp("faults_io")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": format_prompt("r1_zero", question=ex.question),
                                        "response": f" {ex.solution} </think> <answer> {ex.answer} </answer>"}) + "\n"
                            for ex in make_arithmetic(40, seed=5, level=1)))
    run = root / "run"
    proc = reasonrl("train", "--config", str(SFT), f"model.path={tiny_qwen2_path}", f"data.sft_path={data}",
                    f"output_dir={run}", "sft.max_steps=1", "sft.batch_size=4", "sft.eval_generation=false",
                    "checkpoint.save_every=1", "checkpoint.keep_last=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]
    return run


def copy_run(first_run: Path, to: Path) -> Path:
    shutil.copytree(first_run, to)
    return to


def resume_to_step_2(run: Path, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return reasonrl("train", "--resume", str(run), "sft.max_steps=2", preexec_fn=preexec_fn)


def assert_step_1_kept_and_resumable(run: Path, before: dict[str, str]) -> None:
    """Nothing partial left, step 1 byte-for-byte as it was, and a plain resume then reaches step 2."""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]
    ckpt = run / "checkpoints" / "step_000001"
    assert snapshot(ckpt) == {k.split("/", 2)[2]: v for k, v in before.items() if k.startswith("checkpoints/step_000001/")}
    proc = resume_to_step_2(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2


def file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_checkpoint_past_the_file_size_limit(first_run: Path, tmp_path: Path) -> None:
    """256 KiB per file: the resumed run's config and metrics fit, the 1.8 MB model file of the checkpoint does not."""
    run = copy_run(first_run, tmp_path / "run")
    before = snapshot(run)
    proc = resume_to_step_2(run, file_size_limit(256 * 1024))
    assert proc.returncode == 1
    assert error_line(proc) == (
        f"reasonrl: error: cannot write checkpoint {run}/checkpoints/step_000002.tmp: file too large (a file reached "
        "the process's file-size limit of 262144 bytes, `ulimit -f`); the partial step_000002.tmp was removed; the "
        f"last complete checkpoint, step_000001, is untouched: `reasonrl train --resume {run}` continues from it")
    assert_step_1_kept_and_resumable(run, before)


FILL_AND_RESUME = """
set -e
mount -t tmpfs -o size=24m tmpfs "$MNT"
cp -a "$SRC" "$MNT/run"
avail=$(df -B1 --output=avail "$MNT" | tail -1)
head -c $((avail - 1048576)) /dev/zero > "$MNT/filler"
set +e
"$PY" -m trainer train --resume "$MNT/run" sft.max_steps=2 2> "$OUT/stderr"
echo $? > "$OUT/rc"
df -B1 --output=avail "$MNT" | tail -1 > "$OUT/free"
cp -a "$MNT/run" "$OUT/run"
"""


def test_checkpoint_on_a_full_file_system(first_run: Path, tmp_path: Path) -> None:
    """A 24 MiB tmpfs holding the run and a filler that leaves 1 MiB: the step-2 checkpoint (about 8 MB) does
    not fit. The message gives the size needed (that of step 1's checkpoint) and the space free."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -m refused), so no small file system to fill")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    env = dict(os.environ, WANDB_MODE="disabled", CI="1", OMP_NUM_THREADS="1", MNT=str(mnt), SRC=str(first_run),
               OUT=str(out), PY=sys.executable)
    subprocess.run(["unshare", "-m", "sh", "-c", FILL_AND_RESUME], cwd=REPO, env=env, check=True, timeout=600)
    stderr = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() == "1", stderr[-3000:]
    line = error_line(subprocess.CompletedProcess([], 1, "", stderr))
    needed = sum(p.stat().st_size for p in (first_run / "checkpoints" / "step_000001").rglob("*") if p.is_file())
    run = mnt / "run"
    found = re.fullmatch(
        rf"reasonrl: error: cannot write checkpoint {run}/checkpoints/step_000002\.tmp: no space left on device "
        rf"\(the checkpoint needs about {needed / 2**20:.1f} MB; (\d+\.\d) MB free\); the partial step_000002\.tmp "
        rf"was removed; the last complete checkpoint, step_000001, is untouched: `reasonrl train --resume {run}` "
        "continues from it", line)
    assert found, line
    free_after = int((out / "free").read_text()) / 2**20  # once the partial checkpoint is gone
    assert abs(float(found.group(1)) - free_after) <= 0.1, (found.group(1), free_after)
    assert_step_1_kept_and_resumable(out / "run", snapshot(first_run))


def without_dac_override() -> None:
    """As root, give up the capabilities that ignore mode bits (for the exec'd program); as anyone else,
    mode bits hold already."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed")


def test_read_only_run_directory_is_refused_before_loading(first_run: Path, tmp_path: Path) -> None:
    """``chmod 0o555`` on the run directory: `--resume` stops at the write probe, before the model is loaded,
    with one line; nothing in the directory changes."""
    run = copy_run(first_run, tmp_path / "run")
    before = snapshot(run)
    run.chmod(0o555)
    try:
        proc = resume_to_step_2(run, without_dac_override)
    finally:
        run.chmod(0o755)
    assert proc.returncode == 1
    assert error_line(proc) == (f"reasonrl: error: output_dir={run}: cannot write to {run}: permission denied (the "
                                "directory is not writable); choose a writable output_dir")
    assert snapshot(run) == before
    assert_step_1_kept_and_resumable(run, before)


SAVE_WORKER = """
import gc, os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer
from trainer.checkpoint import StorageError, load_checkpoint, save_checkpoint
from trainer.config_io import config_from_dict

model_dir, run = sys.argv[1], Path(sys.argv[2])
acc = Accelerator()
report = (run.parent / f"rank{acc.process_index}.txt").open("w")  # one file per rank: no interleaved lines
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
tok, cfg = AutoTokenizer.from_pretrained(model_dir), config_from_dict({"model": {"path": model_dir}})
save_checkpoint(acc, model, tok, run, 1, {"policy_version": 1}, cfg, keep_last=2)
if acc.is_main_process:
    (run / "checkpoints").chmod(0o555)  # read-only from here on, in the middle of the run
acc.wait_for_everyone()
try:
    save_checkpoint(acc, model, tok, run, 2, {"policy_version": 2}, cfg, keep_last=2)
except StorageError as err:
    print(err, file=report, flush=True)
state = load_checkpoint(acc, run / "checkpoints" / "step_000001")
print(f"resumed step {state['step']}", file=report, flush=True)
report.close()
acc.wait_for_everyone()  # tear down as trainer.session does: the DDP wrapper first, then the gloo group
del model, opt
acc.free_memory()
gc.collect()
torch.distributed.destroy_process_group()
"""


def test_checkpoint_directory_turns_read_only_mid_run(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """Two gloo ranks save step 1, then ``checkpoints/`` turns read-only: the step-2 save fails on the main
    process, and every rank raises the same `StorageError` (no rank left waiting at a barrier); step 1 loads."""
    worker, run = tmp_path / "save_worker.py", tmp_path / "run"
    worker.write_text(SAVE_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           tiny_qwen2_path, str(run)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(cpu_ddp=True), capture_output=True, text=True, timeout=600,
                          preexec_fn=without_dac_override)
    (run / "checkpoints").chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tmp = run / "checkpoints" / "step_000002.tmp"
    message = (f"cannot write checkpoint {tmp}: permission denied (the directory is not writable); the partial "
               f"step_000002.tmp was removed; the last complete checkpoint, step_000001, is untouched: `reasonrl "
               f"train --resume {run}` continues from it")
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().splitlines() == [message, "resumed step 1"], rank
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]


TORCH_SAVE = """
import resource, signal, sys
from pathlib import Path
import torch
from trainer.checkpoint import _failure_message

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
tmp = Path(sys.argv[1])
try:
    torch.save({"exp_avg": torch.zeros(100_000)}, tmp / "optimizer.bin")
except RuntimeError as err:  # torch's C++ zip writer: no errno, a message about stream positions
    print(type(err).__name__, _failure_message(err, tmp, lambda: 0), sep="\\n")
"""


def test_torch_save_failure_is_diagnosed_from_the_file_system(tmp_path: Path) -> None:
    """`torch.save` (accelerate's optimizer and RNG files) fails with a RuntimeError that carries no errno;
    the cause is read from the file system instead: here the file at the process's file-size limit."""
    tmp = tmp_path / "step_000002.tmp"
    tmp.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", TORCH_SAVE, str(tmp)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.splitlines() == [
        "RuntimeError", f"cannot write checkpoint {tmp}: file too large (a file reached the process's file-size "
        "limit of 65536 bytes, `ulimit -f`)"], proc.stderr[-3000:]


def test_a_file_where_the_run_directory_should_be(tmp_path: Path) -> None:
    """`output_dir` (or its ``checkpoints/``) is a regular file: one message, nothing created or removed."""
    from types import SimpleNamespace

    from trainer.checkpoint import StorageError, check_writable

    one_process = SimpleNamespace(is_main_process=True, num_processes=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError) as err:
        check_writable(one_process, tmp_path / "file")
    assert str(err.value) == (f"output_dir={tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a directory; "
                              "choose another output_dir")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("x")
    with pytest.raises(StorageError) as err:
        check_writable(one_process, run)
    assert str(err.value) == (f"output_dir={run}: {run / 'checkpoints'} is a file, not a directory; choose another "
                              "output_dir")
    with pytest.raises(StorageError) as err:
        check_writable(one_process, tmp_path / "file" / "run")
    assert str(err.value) == (f"output_dir={tmp_path / 'file' / 'run'}: cannot write to {tmp_path / 'file' / 'run'}: "
                              "not a directory; choose a writable output_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]
    assert [p.name for p in run.iterdir()] == ["checkpoints"]


@pytest.mark.parametrize("mode", ["warm start", "dpo best"])
def test_model_folder_past_the_file_size_limit(tiny_qwen2_path: str, tmp_path: Path, mode: str) -> None:
    """The warm start's model and DPO's ``best/`` are written like checkpoints: past a 256 KiB file-size limit
    the run ends with one line naming the folder and the cause, and no partial folder is left."""
    from trainer.tools.tiny import write_tiny_data

    run, data = tmp_path / "run", write_tiny_data(tmp_path / "data")
    if mode == "warm start":
        args = ["--config", str(REPO / "configs" / "grpo_tiny_cpu.yaml"), "rollout.engine=hf", "warmstart.steps=2",
                "grpo.n_grpo_steps=1", "eval.every=0"]
        name, what = "warmstart", "warm-start model"
    else:
        args = ["--config", str(REPO / "configs" / "tiny" / "dpo_tiny_cpu.yaml"), f"data.preference_path={data['dpo']}",
                "dpo.max_steps=2", "eval.every=1"]
        name, what = "best", "best model"
    proc = reasonrl("train", *args, f"model.path={tiny_qwen2_path}", f"output_dir={run}", "checkpoint.save_every=0",
                    preexec_fn=file_size_limit(256 * 1024))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith(f"reasonrl: error: cannot write {what} {run}/{name}.tmp"), line
    assert "file too large (a file reached the process's file-size limit of 262144 bytes" in line, line
    assert line.endswith(f"the partial {name}.tmp was removed"), line
    assert not (run / f"{name}.tmp").exists() and not (run / name).exists()


def test_evaluation_samples_past_the_file_size_limit(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """The held-out samples of the first evaluation (~100 KB) do not fit a 32 KiB file-size limit that the
    run's config and first metrics do: one line naming the samples file and the cause, no traceback."""
    run = tmp_path / "run"
    proc = reasonrl("train", "--config", str(REPO / "configs" / "grpo_tiny_cpu.yaml"), f"model.path={tiny_qwen2_path}",
                    f"output_dir={run}", "rollout.engine=hf", "warmstart.steps=0", "grpo.n_grpo_steps=1",
                    preexec_fn=file_size_limit(32 * 1024))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert error_line(proc) == (
        f"reasonrl: error: cannot write evaluation samples {run}/eval/step_000000.jsonl: file too large (a file "
        "reached the process's file-size limit of 32768 bytes, `ulimit -f`)")
