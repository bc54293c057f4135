"""The GRPO learner loop: its per-token composition against the CS336 train step, the KL/mismatch
estimators by hand, dynamic sampling, and exact resume (HF engine: deterministic and quick on CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cs336_adapters import grpo_microbatch_train_step
from grpo_setups import random_rollout_batch, small_config
from helpers import capture_grads_at_step
from safetensors.torch import load_file

from trainer.learner import Learner
from trainer.learners.grpo import (
    micro_step,
    mismatch_metrics,
    optimizer_step,
    train_grpo,
)
from trainer.logprobs import get_response_log_probs, length_sorted_order
from trainer.losses import k3_kl
from trainer.tracking import read_metrics


def test_k3_and_mismatch_by_hand() -> None:
    """r = log π_ref − log π = log 2 − 0 → k3 = 2 − ln 2 − 1 = 0.3069; equal log-probs → 0.

    mismatch: learner −1.0 vs rollout −1.5 on one masked token → k1 = rollout − learner = −0.5,
    k3 = e^{0.5} − 0.5 − 1 = 0.1487; the unmasked second token is ignored.
    """
    kl = k3_kl(torch.tensor([[0.0, -1.0]]), torch.tensor([[math.log(2.0), -1.0]]))
    assert kl[0].tolist() == pytest.approx([1.0 - math.log(2.0), 0.0], abs=1e-7)
    m = mismatch_metrics(torch.tensor([[-1.0, 5.0]]), torch.tensor([[-1.5, 0.0]]), torch.tensor([[True, False]]))
    assert m["train/mismatch_kl_k1"] == pytest.approx(-0.5)
    assert m["train/mismatch_kl_k3"] == pytest.approx(math.exp(0.5) - 1.5, rel=1e-6)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("loss_type", ["reinforce_with_baseline", "grpo_clip", "no_baseline"])
@pytest.mark.parametrize("mode", ["sequence_mean", "constant", "token"])
def test_micro_step_gradient_equals_cs336_train_step(tiny_qwen2_path: str, tmp_path: Path, loss_type: str,
                                                     mode: str, packing: bool) -> None:
    """With KL, entropy bonus and TIS off, the loop's micro-step is exactly `grpo_microbatch_train_step`
    on the padded batch, also when the learner packs the micro-batch into one row."""
    cfg = small_config(tiny_qwen2_path, tmp_path, f"grpo.loss_type={loss_type}",
                       f"grpo.length_normalization={mode}", "model.dtype=float32", f"model.packing={packing}")
    batch = random_rollout_batch()
    tokens = batch.tokens
    index = torch.arange(4)
    count = float(tokens.response_mask.sum())

    learner = Learner(cfg.model, cfg.optim)
    micro_step(learner, cfg, batch, index, count, None)
    ours = [p.grad.clone() for p in learner.model.parameters()]

    reference = Learner(cfg.model, cfg.optim)
    lp = get_response_log_probs(reference.model, tokens.input_ids, tokens.labels,
                                attention_mask=tokens.attention_mask)["log_probs"]
    grpo_microbatch_train_step(
        lp, tokens.response_mask, cfg.grpo.gradient_accumulation_steps, loss_type,
        raw_rewards=batch.raw_rewards[:, None], advantages=batch.advantages[:, None],
        old_log_probs=batch.old_log_probs, cliprange=cfg.grpo.cliprange, length_normalization=mode,
        normalize_constant=float(cfg.rollout.max_tokens), global_token_count=count,
    )
    for a, p in zip(ours, reference.model.parameters(), strict=True):
        if packing:  # one row under a block-diagonal mask: other matmul shapes, so compare per-parameter norms
            assert float((a - p.grad).norm()) <= 1e-5 * float(p.grad.norm()) + 1e-12
        else:
            torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", ["sequence_mean", "constant", "token"])
def test_length_sorted_micro_batches_give_the_same_step(tiny_qwen2_path: str, tmp_path: Path, mode: str) -> None:
    """One optimizer step of 2 micro-batches: rows {0,1},{2,3} (unsorted) or, by input length 11, 5, 11, 11,
    {0,2},{3,1} (sorted) accumulate the same gradient: the micro-batches differ, their sum does not."""
    grads = []
    for sort in (False, True):
        cfg = small_config(tiny_qwen2_path, tmp_path, "grpo.loss_type=grpo_clip", "model.dtype=float32",
                           f"grpo.length_normalization={mode}", "grpo.train_batch_size=4",
                           "grpo.rollout_batch_size=4", f"grpo.sort_by_length={sort}")
        learner = Learner(cfg.model, cfg.optim)
        captured = capture_grads_at_step(learner)
        optimizer_step(learner, cfg, random_rollout_batch(), slice(0, 4), 2, None)
        grads.append(torch.cat([g.flatten() for g in captured.values()]))
    unsorted, sorted_ = grads
    assert length_sorted_order(random_rollout_batch().tokens, torch.arange(4)).tolist() == [0, 2, 3, 1]
    assert float(unsorted.norm()) > 0
    assert float((sorted_ - unsorted).norm()) <= 1e-6 * float(unsorted.norm())


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    [ckpt] = sorted((run / "checkpoints").glob("step_000004"))
    return load_file(ckpt / "hf" / "model.safetensors")


@pytest.mark.slow
def test_resume_gives_the_same_parameters(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, stop, resume, 2 more steps (parameters equal to 1e-6 relative: the
    resumed run restores optimizer, RNG, sampler position and step; only float summation order may differ).

    The random tiny policy earns no reward, so an entropy bonus and a KL penalty to the frozen reference
    give the update something to do (and put those paths through resume too)."""
    extra = ("checkpoint.save_every=2", "checkpoint.keep_last=3", "grpo.entropy_coef=0.01", "grpo.kl_coef=0.1")
    straight = small_config(tiny_qwen2_path, tmp_path / "straight", *extra)
    train_grpo(straight)
    halves = small_config(tiny_qwen2_path, tmp_path / "halves", *extra)
    train_grpo(halves.model_copy(update={"grpo": halves.grpo.model_copy(update={"n_grpo_steps": 2})}))
    with (tmp_path / "halves" / "metrics.jsonl").open("a") as f:  # as if killed after logging step 3, mid-line
        f.write(json.dumps({"step": 3, "train/loss": 9.0}) + '\n{"step": 3, "eval/acc')
    train_grpo(halves, resume=True)
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "halves")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-8, msg=name)
    initial = load_file(Path(tiny_qwen2_path) / "model.safetensors")
    assert any(not torch.equal(initial[n], a[n]) for n in initial), "training changed nothing"
    steps = [r["step"] for r in read_metrics(tmp_path / "halves") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]  # the killed run's step 3 and torn line were dropped on resume
    versions = [json.loads((run / "checkpoints" / "step_000004" / "trainer_state.json").read_text())["policy_version"]
                for run in (tmp_path / "straight", tmp_path / "halves")]  # fmt: skip
    assert versions == [5, 5], "the initial sync + one per step; a resume continues the count"


@pytest.mark.slow
def test_dynamic_sampling_keeps_batch_shape_and_logs_drops(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """A random policy scores 0 everywhere: every group has zero std, all are dropped, refills find none,
    and the batch is filled back to its fixed size (so training shapes never change)."""
    cfg = small_config(tiny_qwen2_path, tmp_path / "run", "grpo.dynamic_sampling=true", "grpo.max_refill_rounds=1",
                       "grpo.n_grpo_steps=1")
    train_grpo(cfg)
    [rec] = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert rec["rollout/dropped_zero_std_groups"] == 8.0  # 4 groups, then 4 more in one refill round
    assert rec["reward/frac_zero_std_groups"] == 1.0
    assert rec["rollout/samples"] == 32.0  # statistics cover every generated group: 16 rows + a 16-row refill
    # the update ran: micro_batch_slices raises unless the batch kept exactly its 16 rows
    assert math.isfinite(rec["train/loss"]) and rec["train/grad_norm"] >= 0.0


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo_clip", "gspo", "cispo"])
def test_off_policy_grpo_clip_with_tis_runs_and_logs(tiny_qwen2_path: str, tmp_path: Path, loss_type: str) -> None:
    """Off-policy (2 epochs × 2 optimizer batches per rollout batch) on packed micro-batches with a KL
    penalty: old log-probs are computed once, GRPO-Clip (GSPO, CISPO) reports its clip fraction, the TIS-weighted
    loss stays finite, 4 optimizer steps happened, and model FLOP/s and MFU (for a configured peak) are logged."""
    cfg = small_config(tiny_qwen2_path, tmp_path / "run", "grpo.n_grpo_steps=1", f"grpo.loss_type={loss_type}",
                       "grpo.epochs_per_rollout_batch=2", "grpo.train_batch_size=8",
                       "grpo.gradient_accumulation_steps=2", "grpo.tis_cap=2.0", "grpo.entropy_coef=0.01",
                       "optim.warmup_steps=10", "model.packing=true", "grpo.kl_coef=0.05",
                       "logging.peak_tflops=0.5")
    train_grpo(cfg)
    [rec] = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert rec["time/old_log_probs"] > 0
    assert 0.0 <= rec["train/clip_fraction"] <= 1.0
    assert math.isfinite(rec["train/loss"]) and math.isfinite(rec["train/mismatch_kl_k3"])
    assert rec["train/kl"] >= 0.0
    assert rec["train/model_tflops_per_s"] > 0
    assert rec["train/mfu"] == pytest.approx(rec["train/model_tflops_per_s"] / 0.5)
    # 4 optimizer steps: train/lr is the mean of the lr after each; linear warm-up gives peak·(k+1)/10
    # after k steps, so (2+3+4+5)/4/10 of the peak
    assert rec["train/lr"] == pytest.approx(cfg.optim.learning_rate * (2 + 3 + 4 + 5) / 4 / 10)


@pytest.mark.slow
def test_engine_sleeps_after_every_rollout(tiny_qwen2_path: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With `rollout.sleep_between_rollouts` the engine is put to sleep after each batch of generation
    (training rollouts and evaluation alike), so a colocated vLLM hands its GPU memory to the learner for
    the update; the next sync or generate wakes it. Checked on the HF engine's calls, in order."""
    from rollout.engines.hf import HFEngine

    calls: list[str] = []
    for name in ("generate", "sleep", "update_weights"):
        original = getattr(HFEngine, name)

        def record(self: HFEngine, *args: object, _name: str = name, _original: object = original) -> object:
            calls.append(_name)
            return _original(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(HFEngine, name, record)
    cfg = small_config(tiny_qwen2_path, tmp_path / "run", "grpo.n_grpo_steps=2", "eval.every=1",
                       "rollout.sleep_between_rollouts=true")
    train_grpo(cfg)
    # 5 generation phases (evaluation at step 0; per step the rollout and the evaluation), each followed by a
    # sleep before the next weight update; the probe's own scoring after each update may generate too
    assert calls.count("update_weights") == 3 and calls.count("sleep") == 5
    segments = "|".join(calls).split("update_weights")[1:]  # what happens after each sync
    assert all(seg.rstrip("|").endswith("sleep") for seg in segments), calls
    assert "generate|sleep" in segments[1] and segments[1].count("sleep") == 2, calls  # rollout, then eval


@pytest.mark.slow
def test_learner_scores_at_the_rollout_temperature(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """Rollouts sampled at temperature 0.7 are scored by the learner under softmax(logits / 0.7): the
    HF engine's sampling log-probs and the learner's then agree (measured k1 7e-9, k3 0; asked ≤ 1e-5 and
    1e-6: float32, KV-cached generation vs one full forward), where scoring at temperature 1 gave k1 3.6e-3
    and k3 7.4e-3 on this tiny model (a near-uniform policy; a trained one is sharper and differs more)."""
    cfg = small_config(tiny_qwen2_path, tmp_path / "run", "grpo.n_grpo_steps=1", "rollout.temperature=0.7",
                       "rollout.min_tokens=0")  # the min-tokens EOS mask is in the sampling log-probs, not the learner's
    train_grpo(cfg)
    [rec] = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert abs(rec["train/mismatch_kl_k1"]) <= 1e-5 and rec["train/mismatch_kl_k3"] <= 1e-6, rec
