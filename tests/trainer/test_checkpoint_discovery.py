"""Which checkpoint `--resume` picks: the newest *complete* one, never a crash's leftover ``step_N.tmp``."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints


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
