"""Which checkpoint `--resume` picks: the newest *complete* one, never a crash's leftover ``step_N.tmp``; a
damaged one is named; folders are replaced so that one complete version always exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.checkpoint import (
    ResumeError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    replace_folder,
)


def _fake(path: Path, state: str) -> None:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(state)


def test_a_crashed_save_is_skipped(tmp_path: Path) -> None:
    """A crash while step 6 was being written leaves ``step_000006.tmp`` with a truncated state file (it
    sorts after ``step_000005``); resume must take step 5. A directory without a state file is incomplete."""
    _fake(checkpoint_dir(tmp_path, 4), json.dumps({"step": 4}))
    _fake(checkpoint_dir(tmp_path, 5), json.dumps({"step": 5}))
    _fake(checkpoint_dir(tmp_path, 6).with_name("step_000006.tmp"), '{"step": 6, "sam')
    checkpoint_dir(tmp_path, 7).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 5)


def test_no_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None


def test_steps_sort_as_numbers_and_a_replaced_folder_is_never_lost(tmp_path: Path) -> None:
    """Past step 999,999 the names grow a digit, so they are ordered by step, not by name (rotation would
    delete the newest). `replace_folder` keeps the old folder under ``.old`` until the new one is in place,
    and discovery ignores ``.old`` (a crash between the two renames leaves both complete)."""
    for step in (999_999, 1_000_000):
        _fake(checkpoint_dir(tmp_path, step), json.dumps({"step": step}))
    _fake(checkpoint_dir(tmp_path, 5).with_name("step_000005.old"), json.dumps({"step": 5}))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_999999", "step_1000000"]
    final, new = tmp_path / "best", tmp_path / "best.tmp"
    _fake(final, "old")
    _fake(new, "new")
    replace_folder(new, final)
    assert (final / "trainer_state.json").read_text() == "new"
    assert not new.exists() and not final.with_name("best.old").exists()
    _fake(new, "newer")
    replace_folder(new, tmp_path / "fresh")  # no earlier folder
    assert (tmp_path / "fresh" / "trainer_state.json").read_text() == "newer"


def test_a_damaged_state_file_names_itself_and_the_older_checkpoint(tmp_path: Path) -> None:
    """A `trainer_state.json` that is empty or not an object (a power loss after the rename, a hand edit)
    is one `ResumeError` naming the file and the checkpoint to fall back to, before any state is loaded."""
    _fake(checkpoint_dir(tmp_path, 4), json.dumps({"step": 4}))
    _fake(checkpoint_dir(tmp_path, 8), "")
    newest = latest_checkpoint(tmp_path)
    assert newest == checkpoint_dir(tmp_path, 8)
    with pytest.raises(ResumeError, match=r"step_000008/trainer_state\.json is damaged \(Expecting value.*\): move "
                                          r"step_000008 out of .* to resume from step_000004"):
        load_checkpoint(None, newest)
    (newest / "trainer_state.json").write_text("[1]")
    with pytest.raises(ResumeError, match="not an object with an integer 'step'"):
        load_checkpoint(None, newest)
    with pytest.raises(ResumeError, match="there is no older checkpoint"):
        load_checkpoint(None, newest.rename(checkpoint_dir(tmp_path, 2)))
