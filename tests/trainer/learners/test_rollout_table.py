"""The training-rollout table: rows built from a step's samples, written as JSONL under RUN_DIR/rollouts/
and logged to a real offline wandb run (WANDB_MODE=offline) as ``rollout/samples``; its values are the
step's own rewards and advantages."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from grpo_setups import remote_config, small_config

from rollout.engines.hf import HFEngine
from rollout.engines.protocol import Sample
from trainer.advantages import group_normalize
from trainer.learners.grpo import train_grpo
from trainer.rollout_table import COLUMNS, rollout_rows
from trainer.tracking import make_tracker, read_metrics


def _sample(i: int, extra: dict[str, float]) -> Sample:
    return Sample(prompt_index=i, prompt_ids=[1, 2, i], response_ids=[5] * (i + 1), text=f"answer {i}",
                  logprobs=[-0.5] * (i + 1), finish_reason="stop", policy_version=3, extra=extra)


def test_rows_are_the_first_n_samples_with_their_parts() -> None:
    """3 samples, n = 2: rows 0 and 1, reward parts from `Sample.extra`; a sample without them gets None."""
    samples = [_sample(0, {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}),
               _sample(1, {}), _sample(2, {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0})]
    rows = rollout_rows(samples, torch.tensor([0.0, 0.5, 1.0]), torch.tensor([-1.0, 0.0, 1.0]),
                        lambda ids: " ".join(map(str, ids)), n=2)
    assert [list(r) for r in rows] == [list(COLUMNS)] * 2
    assert rows[0] == {"prompt": "1 2 0", "completion": "answer 0", "reward": 0.0, "format_reward": 1.0,
                       "answer_reward": 0.0, "advantage": -1.0, "policy_version": 3, "length": 1,
                       "finish_reason": "stop"}
    assert rows[1]["format_reward"] is None and rows[1]["advantage"] == 0.0 and rows[1]["length"] == 2


def test_tracker_writes_jsonl_and_an_offline_wandb_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = make_tracker(tmp_path, "offline", project="reasonrl-test")
    rows = [{"prompt": "p", "completion": "c", "reward": 1.0, "advantage": 0.5, "policy_version": 0}]
    assert tracker.log_rollouts(rows, step=7) == tmp_path / "rollouts" / "step_000007.jsonl"
    tracker.finish()
    assert [json.loads(line) for line in (tmp_path / "rollouts" / "step_000007.jsonl").read_text().splitlines()] == rows
    [table] = wandb_tables(tmp_path, step=7)
    assert table["columns"] == list(rows[0]) and table["data"] == [list(rows[0].values())]


def wandb_history(run_dir: Path) -> list[dict[str, object]]:
    """The history records of the offline wandb run under `run_dir`, read from its ``.wandb`` file: LevelDB
    log format (a 7-byte file header, 32 KiB blocks of chunks, each with a 7-byte header: crc32, length,
    type 1 full / 2 first / 3 middle / 4 last) holding `wandb_internal_pb2.Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    [path] = (run_dir / "wandb").glob("offline-run-*/*.wandb")
    raw, pos, chunk, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if pos + 7 + length > len(raw):  # a chunk still being written
            break
        chunk, pos = chunk + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                records.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
            chunk = b""
    return records


def wandb_tables(run_dir: Path, step: int) -> list[dict[str, object]]:
    """The ``rollout/samples`` tables the offline wandb run logged at ``train_step`` = `step` (media files).
    wandb's writer process may still be flushing the ``.wandb`` file after `finish` on a loaded machine:
    read it again for up to 60 s until the tables' records are there."""
    [run] = (run_dir / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + 60
    while not (logged := [h for h in wandb_history(run_dir) if "rollout/samples/path" in h]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all("eval_step" not in h for h in logged)
    return [json.loads((run / "files" / str(h["rollout/samples/path"])).read_text())
            for h in logged if h["train_step"] == step]


def test_grpo_logs_the_steps_rollouts(tiny_qwen2_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two GRPO steps, a table every 2nd step holding all 16 rollouts (4 groups of 4): none at step 1; at
    step 2 the JSONL and the wandb table agree, each group's advantages are `group_normalize` of its
    rewards, and the rewards' mean and format rate are the step's logged ``reward/…`` metrics."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = small_config(tiny_qwen2_path, run_dir, "grpo.n_grpo_steps=2", "logging.wandb_mode=offline",
                       "logging.rollout_table_every=2", "logging.rollout_table_rows=16", "eval.limit=4")
    train_grpo(cfg)
    assert sorted(p.name for p in (run_dir / "rollouts").iterdir()) == ["step_000002.jsonl"]
    rows = [json.loads(line) for line in (run_dir / "rollouts" / "step_000002.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(list(r) == list(COLUMNS) for r in rows)
    rewards = torch.tensor([r["reward"] for r in rows])
    expected = group_normalize(rewards, 4, cfg.grpo.advantage_eps, cfg.grpo.use_std_normalization)
    assert [r["advantage"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)
    [logged] = [m for m in read_metrics(run_dir) if m["step"] == 2 and "reward/reward_mean" in m]
    assert rewards.mean().item() == pytest.approx(logged["reward/reward_mean"], abs=1e-6)
    format_rate = sum(r["format_reward"] for r in rows) / len(rows)
    assert format_rate == pytest.approx(logged["reward/format_reward_rate"], abs=1e-6)
    assert all(r["reward"] == r["answer_reward"] for r in rows)  # r1_zero: the reward is the answer reward
    assert {r["policy_version"] for r in rows} == {2}  # the start's sync is version 1, step 1's update 2
    assert all(r["prompt"].startswith("User: ") and r["completion"] is not None for r in rows)
    [table] = wandb_tables(run_dir, step=2)
    assert table["columns"] == list(COLUMNS) and table["data"] == [list(r.values()) for r in rows]


def test_async_grpo_logs_the_rollouts_it_trains_on(tiny_qwen2_path: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """grpo.max_staleness=1, an HF engine with its own copy of the model standing in for the rollout server
    (as in test_async_grpo.py): a table at each of 3 steps; steps 1 and 2 train on rollouts of the first
    weights, step 3 on those after step 1, so the tables' policy versions are v, v, v + 1; within every
    group the advantages are `group_normalize` of its rewards, and each reward equals its answer reward."""
    monkeypatch.setattr("trainer.engines.build_engine", lambda cfg, learner: HFEngine(cfg.model.path))
    run_dir = tmp_path / "run"
    cfg = remote_config(tiny_qwen2_path, run_dir, "grpo.max_staleness=1", "grpo.n_grpo_steps=3",
                        "logging.rollout_table_every=1", "logging.rollout_table_rows=16", "eval.limit=4")
    train_grpo(cfg)
    versions = []
    for step in (1, 2, 3):
        rows = [json.loads(line) for line in (run_dir / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        rewards = torch.tensor([r["reward"] for r in rows])
        expected = group_normalize(rewards, 4, cfg.grpo.advantage_eps, cfg.grpo.use_std_normalization)
        assert [r["advantage"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)
        assert all(r["reward"] == r["answer_reward"] for r in rows)
        [version] = {r["policy_version"] for r in rows}
        versions.append(version)
    assert versions == [versions[0], versions[0], versions[0] + 1]
