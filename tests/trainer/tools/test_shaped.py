"""Shaped random checkpoints (`trainer.tools.shaped`): the 1.5B shape's parameter count by hand, a small
shape written and loaded back through `from_pretrained` like a user checkpoint, which OUT_DIR it takes, and
Ctrl-C (a real subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_interrupted_in_one_line, ctrl_c, reaped, start_interruptible
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

import trainer.tools.shaped as shaped
from trainer.tools.shaped import QWEN25_MATH_15B, build_shaped, main, padded_tokenizer, shaped_config

SMALL = {**QWEN25_MATH_15B, "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}


def test_qwen25_math_15b_parameter_count() -> None:
    """Embedding 151,936·1536 = 233,373,696 (tied: the output layer adds nothing). Per layer: q 1536·1536 + 1536,
    k and v 1536·256 + 256 each, o 1536·1536, MLP 3·1536·8960, two norms 2·1536 = 46,797,824; 28 layers
    = 1,310,339,072; final norm 1536. Total 1,543,714,304 (the model card's "1.54B")."""
    tokenizer = padded_tokenizer(QWEN25_MATH_15B["vocab_size"])
    assert len(tokenizer) == 151_936
    with torch.device("meta"):
        model = Qwen2ForCausalLM(shaped_config(QWEN25_MATH_15B, tokenizer))
    assert sum(p.numel() for p in model.parameters()) == 1_543_714_304


def test_small_shape_round_trips(tmp_path: Path) -> None:
    path = build_shaped(tmp_path / "m", SMALL, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer) == 2048
    assert tokenizer.decode([2047]) == f"<|r{2047 - 1022}|>"  # 1022 BPE entries, then the added tokens
    ids = tokenizer("<think> 2 + 3 = 5 </think>", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_cli_rejects_unknown_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "unused"), "--shape", "llama-70b"])
    assert "invalid choice: 'llama-70b'" in capsys.readouterr().err
    assert not (tmp_path / "unused").exists()


def _no_build(*args: object) -> None:
    raise AssertionError("built before OUT_DIR was checked")


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_unusable_out_dir_is_refused_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """OUT_DIR a file: the 1.5B model was built (a minute on CPU), then transformers only logged "should be a
    directory, not a file", nothing was written, and the command printed the path and exited 0; a path under a
    file was a NotADirectoryError traceback after the build. Now both are one error line (exit 2) before
    anything is built."""
    monkeypatch.setattr(shaped, "padded_tokenizer", _no_build)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    for out, why in ((notes, f"{notes}: a file, not a folder for the checkpoint"),
                     (notes / "m", f"{notes / 'm'}: {notes} is a file, not a folder")):
        with pytest.raises(SystemExit) as exit_:
            main([str(out)])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"python -m trainer.tools.shaped: error: {why}"
        with pytest.raises(NotADirectoryError, match=re.escape(why)):
            build_shaped(out, QWEN25_MATH_15B)
    assert notes.read_text() == "x"


def test_a_folder_it_did_not_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """OUT_DIR holding other files (another model, notes) was written into: its config.json and weights were
    overwritten, after a minute of building. Now it is one error naming the folder (exit 2), before anything is
    built, and the folder is left as it was."""
    monkeypatch.setattr(shaped, "padded_tokenizer", _no_build)
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "model.safetensors").write_text("weights")
    with pytest.raises(SystemExit) as exit_:
        main([str(mine)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m trainer.tools.shaped: error: {mine}: not empty and not a checkpoint this command wrote (no "
        f"{shaped.MARKER}), so it is left as it is: give a new or empty folder")
    assert _files(mine) == {"config.json": b"{}", "model.safetensors": b"weights"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-model"]


def test_its_own_earlier_output_is_kept_or_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Run again onto its own output (it holds the marker, written last), OUT_DIR is kept as it is when shape,
    dtype and seed are the same (nothing is built) and replaced when they differ, with no file of the earlier
    checkpoint left in it and nothing left beside it."""
    monkeypatch.setitem(shaped.SHAPES, "small", SMALL)
    out = tmp_path / "m"
    main([str(out), "--shape", "small", "--dtype", "float32"])
    assert capsys.readouterr().out == f"{out}\n"
    first = _files(out)
    assert json.loads(first[shaped.MARKER]) == {"shape": SMALL, "dtype": "float32", "seed": 0}
    with monkeypatch.context() as patch:
        patch.setattr(shaped, "padded_tokenizer", _no_build)
        main([str(out), "--shape", "small", "--dtype", "float32"])
    assert capsys.readouterr().err.startswith(f"{out}: already holds this checkpoint")
    assert _files(out) == first
    (out / "stale.bin").write_bytes(b"from the earlier build")  # as a shard of another dtype would be
    main([str(out), "--shape", "small", "--dtype", "float32", "--seed", "1"])
    second = _files(out)
    assert json.loads(second[shaped.MARKER])["seed"] == 1 and sorted(second) == sorted(first)
    assert second["model.safetensors"] != first["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _has_loaded_torch(pid: int) -> bool:
    """Whether process `pid` has mapped libtorch: it is in `build_shaped`, the only place shaped imports torch."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # gone, or between exec and the first read
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="tells when torch loads from /proc/PID/maps")
def test_ctrl_c_is_one_line_and_death_by_sigint(tmp_path: Path) -> None:
    """Ctrl-C in ``python -m trainer.tools.shaped OUT`` printed a KeyboardInterrupt traceback; now it is the line
    `reasonrl` prints, "reasonrl: interrupted", and the process still dies of SIGINT, so a calling shell stops.
    The signal goes to the whole process group, as a terminal's Ctrl-C does, once the command is building (it has
    started loading torch, which it imports there and nowhere else), long before the 1.5B model is allocated.
    Nothing is written."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = tmp_path / "out"
    with (tmp_path / "stderr.txt").open("w") as stderr_file:
        proc = start_interruptible([sys.executable, "-m", "trainer.tools.shaped", str(out / "m")], tmp_path, env,
                                   subprocess.PIPE, stderr_file)
    with reaped(proc):
        deadline = time.monotonic() + 300  # importing torch can take long on a loaded machine
        while not _has_loaded_torch(proc.pid):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("shaped never started building:\n" + (tmp_path / "stderr.txt").read_text())
            time.sleep(0.01)
        stdout = ctrl_c(proc)[0]
    assert_interrupted_in_one_line(proc, (tmp_path / "stderr.txt").read_text())
    assert stdout == ""
    assert not out.exists()
