"""Tracker: metrics.jsonl always; real wandb in offline mode; a failing wandb never stops training."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.tools.plot import panel_keys, plot_run
from trainer.tracking import NullTracker, Tracker, WandbTracker, make_tracker, read_metrics, trim_metrics


def test_disabled_mode_writes_jsonl_only(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path, "disabled")
    assert type(tracker) is Tracker
    tracker.log({"train/loss": 1.5, "eval/accuracy": float("nan")}, step=3)
    tracker.finish()
    [record] = read_metrics(tmp_path)
    assert record["step"] == 3 and record["train/loss"] == 1.5 and record["eval/accuracy"] == "nan"


def test_wandb_offline_logs_a_real_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = make_tracker(tmp_path, "offline", project="reasonrl-test", config={"lr": 1e-5})
    assert isinstance(tracker, WandbTracker) and tracker.run_id
    tracker.log({"train/loss": 0.5}, step=1)
    tracker.log({"eval/accuracy": 0.25}, step=1)
    tracker.log_table("eval/samples", [{"prompt": "p", "response": "r", "reward": 1.0}], step=1)
    tracker.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 1]


def test_broken_wandb_is_disabled_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker = make_tracker(tmp_path, "not-a-wandb-mode")  # wandb.init raises on an invalid mode
    tracker.log({"train/loss": 2.0}, step=1)
    tracker.finish()
    assert "wandb disabled" in caplog.text
    assert read_metrics(tmp_path)[0]["train/loss"] == 2.0


def test_null_tracker_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative path would land here
    tracker = NullTracker()
    tracker.log({"train/loss": 1.0}, step=0)
    tracker.log_table("eval/samples", [{"prompt": "p"}], step=0)
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_metrics_file_is_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """metrics.jsonl that cannot be written (here a directory stands in its place: IsADirectoryError) is
    reported once; later logs neither raise nor warn again."""
    tracker = Tracker(tmp_path)
    tracker.path.mkdir()
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.log({"train/loss": 0.5}, step=2)
    assert caplog.text.count("cannot write metrics") == 1
    assert "training goes on" in caplog.text


def test_plot_writes_png(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path)
    for step in range(3):
        tracker.log({"reward/reward_mean": step / 3, "rollout/response_len_mean": 10.0 + step}, step)
    tracker.log({"eval/accuracy": 0.5, "eval/format_rate": 0.9, "eval/mean_length": 11.0, "eval/pass@2": 0.6}, 2)
    path = plot_run(tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_adds_the_largest_pass_at_k_beside_accuracy() -> None:
    """With several samples per question the eval panel also draws pass@k of the largest k logged."""
    records = [{"step": 0, "eval/accuracy": 0.2, "eval/pass@1": 0.2, "eval/pass@2": 0.3, "eval/pass@4": 0.4}]
    assert panel_keys(["eval/accuracy", "eval/format_rate"], records) == [
        "eval/accuracy", "eval/format_rate", "eval/pass@4"]
    assert panel_keys(["reward/reward_mean"], records) == ["reward/reward_mean"]
    assert panel_keys(["eval/accuracy"], [{"step": 0, "eval/accuracy": 0.2}]) == ["eval/accuracy"]


def test_resume_trims_records_after_the_checkpoint_and_a_torn_line(tmp_path: Path) -> None:
    """A run killed after its step-2 checkpoint had logged step 3 and half of a step-3 line. Resuming from
    step 2 drops both (step 3 is logged again), keeps everything else byte for byte, and the next record
    starts on its own line; the reader skips a torn last line but names an undecodable one elsewhere."""
    path = tmp_path / "metrics.jsonl"
    kept = ['{"step": 0, "eval/accuracy": 0.1}', '{"step": 2, "train/loss": 1.0}', "[1, 2]",
            '{"step": "x"}', '{"step": 2, "time/log": 0.5}']
    path.write_text("\n".join([*kept[:2], '{"step": 3, "train/loss": 0.9}', *kept[2:]]) + '\n{"step": 3, "tr')
    assert [r["step"] for r in read_metrics(tmp_path) if isinstance(r, dict)] == [0, 2, 3, "x", 2]
    assert trim_metrics(tmp_path, 2) == 2
    assert path.read_text() == "\n".join(kept) + "\n"
    assert trim_metrics(tmp_path, 2) == 0 and trim_metrics(tmp_path / "none", 2) == 0
    tracker = Tracker(tmp_path)
    tracker.log({"train/loss": 0.8}, step=3)
    assert read_metrics(tmp_path)[-1]["train/loss"] == 0.8
    path.write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(tmp_path)
