"""Asynchronous GRPO (``grpo.max_staleness``): the config rules, the decoupled-PPO objective against a
hand-written twin, and the producer's schedule, staleness and exact resume on CPU. The rollout engine here
is an HF engine with its own copy of the model standing in for a remote server (deterministic and quick);
tests/trainer/learners/test_async_grpo_server.py drives a real vLLM rollout server process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from grpo_setups import LORA, random_rollout_batch, remote_config, small_config
from safetensors.torch import load_file

from rollout.engines.protocol import Sample
from trainer.cluster import validate_for_cluster
from trainer.config import ConfigError
from trainer.learner import Learner
from trainer.learners import grpo
from trainer.learners.async_rollouts import ProducedBatch
from trainer.learners.grpo import behaviour_weight, micro_step, train_grpo
from trainer.logprobs import get_response_log_probs
from trainer.tracking import read_metrics


@pytest.fixture
def own_hf_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """`build_engine` gives an HF engine holding its own copy of the model (weights only through syncs)."""
    from rollout.engines.hf import HFEngine

    monkeypatch.setattr("trainer.engines.build_engine", lambda cfg, learner: HFEngine(cfg.model.path))


# ---- config ----------------------------------------------------------------------------------------------
def test_colocated_async_is_a_config_error_that_says_why(tiny_qwen2_path: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"grpo.max_staleness=1 with rollout.placement=colocated: .*one device "
                                          r"cannot generate and train at once"):
        small_config(tiny_qwen2_path, tmp_path, "grpo.max_staleness=1")
    cfg = remote_config(tiny_qwen2_path, tmp_path, "grpo.max_staleness=2")
    assert cfg.grpo.max_staleness == 2 and small_config(tiny_qwen2_path, tmp_path).grpo.max_staleness == 0
    validate_for_cluster(cfg, 2, ["cpu", "cpu"])  # several ranks share the remote server: rank 0 produces
    dedicated = small_config(tiny_qwen2_path, tmp_path, "rollout.engine=vllm", "rollout.placement=dedicated",
                             "rollout.device=cuda:1", "grpo.max_staleness=1")
    validate_for_cluster(dedicated, 1, ["cuda:0"], cuda_devices=2)
    with pytest.raises(ConfigError, match=r"rollout.placement=dedicated with world size 2"):
        validate_for_cluster(dedicated, 2, ["cuda:0", "cuda:2"], cuda_devices=3)


# ---- the objective -------------------------------------------------------------------------------------
def test_behaviour_weight_by_hand() -> None:
    """log π_prox − log μ = ln 3, 0, ln 0.5 → w = 3, 1, 0.5; capped at 2 → 2, 1, 0.5."""
    prox = torch.tensor([[math.log(3.0), -1.0, math.log(0.5)]])
    assert behaviour_weight(prox, torch.tensor([[0.0, -1.0, 0.0]]), None)[0].tolist() == pytest.approx([3, 1, 0.5])
    assert behaviour_weight(prox, torch.zeros(1, 3) + torch.tensor([[0.0, -1.0, 0.0]]), 2.0)[0].tolist() == \
        pytest.approx([2, 1, 0.5])


def decoupled_ppo_twin(lp: torch.Tensor, prox: torch.Tensor, behav: torch.Tensor, adv: torch.Tensor,
                       mask: torch.Tensor, eps_low: float, eps_high: float, cap: float | None,
                       gas: int) -> torch.Tensor:
    """AReaL Eq. 5 written out token by token: −w·min(u·A, clip(u, 1−ε_low, 1+ε_high)·A), u = π_θ/π_prox,
    w = min(π_prox/μ, cap) (a constant), each sequence's masked mean, then the batch mean / gas."""
    rows = []
    for i in range(lp.shape[0]):
        terms = []
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            u = torch.exp(lp[i, t] - prox[i, t])
            w = math.exp(float(prox[i, t]) - float(behav[i, t]))
            w = w if cap is None else min(w, cap)
            clipped = torch.clamp(u, 1 - eps_low, 1 + eps_high)
            terms.append(-w * torch.minimum(u * adv[i], clipped * adv[i]))
        rows.append(torch.stack(terms).sum() / len(terms))
    return torch.stack(rows).mean() / gas


@pytest.mark.parametrize("cap", [None, 1.5])
def test_async_micro_step_gradient_equals_the_decoupled_ppo_twin(tiny_qwen2_path: str, tmp_path: Path,
                                                                 cap: float | None) -> None:
    """The learner's micro-step with max_staleness=1 (GRPO-Clip, clip-higher, old = proximal log-probs, μ the
    engine's stale log-probs) gives the gradient of the hand-written decoupled-PPO loss."""
    extra = [f"grpo.tis_cap={cap}"] if cap is not None else []
    cfg = remote_config(tiny_qwen2_path, tmp_path, "grpo.max_staleness=1", "grpo.loss_type=grpo_clip",
                        "grpo.cliprange_high=0.3", "model.dtype=float32", *extra)
    batch = random_rollout_batch()
    gen = torch.Generator().manual_seed(3)
    batch.rollout_log_probs = batch.old_log_probs + 0.5 * torch.randn(batch.old_log_probs.shape, generator=gen)
    learner = Learner(cfg.model, cfg.optim)
    tokens = batch.tokens
    with torch.no_grad():  # the proximal policy: near the current one, so some ratios clip and some do not
        batch.old_log_probs = get_response_log_probs(learner.model, tokens.input_ids, tokens.labels,
                                                     attention_mask=tokens.attention_mask)["log_probs"]
        batch.old_log_probs += 0.2 * torch.randn(batch.old_log_probs.shape, generator=gen)
    micro_step(learner, cfg, batch, torch.arange(4), float(tokens.response_mask.sum()), None)
    ours = [p.grad.clone() for p in learner.model.parameters()]

    reference = Learner(cfg.model, cfg.optim)
    lp = get_response_log_probs(reference.model, tokens.input_ids, tokens.labels,
                                attention_mask=tokens.attention_mask)["log_probs"]
    decoupled_ppo_twin(lp, batch.old_log_probs, batch.rollout_log_probs, batch.advantages, tokens.response_mask,
                       0.2, 0.3, cap, cfg.grpo.gradient_accumulation_steps).backward()
    for a, p in zip(ours, reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-8)


# ---- the loop --------------------------------------------------------------------------------------------
def final_weights(run: Path, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:06d}" / "hf" / "model.safetensors")


@pytest.mark.slow
def test_staleness_zero_is_the_synchronous_loop(tiny_qwen2_path: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """max_staleness=0 (explicit) runs no producer and gives bit for bit the parameters of the default
    synchronous loop, off-policy with truncated IS (the paths the asynchronous change touched)."""
    extra = ("grpo.loss_type=grpo_clip", "grpo.epochs_per_rollout_batch=2", "grpo.tis_cap=2.0",
             "grpo.entropy_coef=0.01", "grpo.n_grpo_steps=3")
    train_grpo(small_config(tiny_qwen2_path, tmp_path / "default", *extra))
    monkeypatch.setattr(grpo, "RolloutProducer", None)  # calling it would fail the run
    train_grpo(small_config(tiny_qwen2_path, tmp_path / "k0", *extra, "grpo.max_staleness=0"))
    a, b = final_weights(tmp_path / "default", 3), final_weights(tmp_path / "k0", 3)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_async_lag_is_bounded_and_resume_is_exact(tiny_qwen2_path: str, tmp_path: Path, k: int,
                                                   own_hf_engine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """k = 1, 2 for 4 steps: step u trains on rollouts of the weights after step max(0, u−1−k), so the lag is
    min(u−1, k) exactly; a run interrupted in step 3 and resumed from step 2's checkpoint (the pending
    batches, sampled by weights older than the checkpoint, saved with it) ends with the parameters of the
    run straight through (to 1e-6 relative, as the synchronous resume test). DAPO overlong shaping is on: the
    producer shapes the rewards, and the saved pending batches keep them."""
    extra = ("checkpoint.save_every=2", "checkpoint.keep_last=3", "grpo.entropy_coef=0.01", "grpo.kl_coef=0.1",
             f"grpo.max_staleness={k}", "eval.every=2", "grpo.overlong_buffer=4")
    straight = remote_config(tiny_qwen2_path, tmp_path / "straight", *extra)
    train_grpo(straight)
    records = [r for r in read_metrics(tmp_path / "straight") if "train/loss" in r]
    assert [r["rollout/policy_lag"] for r in records] == [min(u - 1, k) for u in (1, 2, 3, 4)]
    assert all(-1 <= r["reward/overlong_penalty_mean"] <= 0 for r in records)  # shaped on the producer's thread
    assert all(r["rollout/policy_lag_mean"] == r["rollout/policy_lag"] for r in records)
    for key in ("time/wait_rollouts", "time/wait_weights", "time/generate", "time/step"):
        assert all(key in r for r in records), key
    # the producer pushed new weights (and probed them) before the batches of steps k+2 ..
    assert [r.get("rollout/probe_ok") for r in records] == [None] * (k + 1) + [1.0] * (3 - k)
    evals = [r["step"] for r in read_metrics(tmp_path / "straight") if "eval/accuracy" in r]
    assert evals == [0, 2, 4]

    halves = remote_config(tiny_qwen2_path, tmp_path / "halves", *extra)
    step = grpo.async_grpo_step

    def interrupted(s, producer, probe, n, ref_model):  # type: ignore[no-untyped-def]
        if n == 3:
            raise KeyboardInterrupt  # after step 2's checkpoint, the producer already on step 3's batch
        return step(s, producer, probe, n, ref_model)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(grpo, "async_grpo_step", interrupted)
        train_grpo(halves)
    train_grpo(halves, resume=True)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "halves")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-8, msg=name)
    initial = load_file(Path(tiny_qwen2_path) / "model.safetensors")
    assert any(not torch.equal(initial[n], a[n]) for n in initial), "training changed nothing"
    resumed = [r for r in read_metrics(tmp_path / "halves") if "train/loss" in r]
    assert [r["rollout/policy_lag"] for r in resumed] == [min(u - 1, k) for u in (1, 2, 3, 4)]


@pytest.mark.slow
def test_extending_a_finished_run_restarts_the_pipeline(tiny_qwen2_path: str, tmp_path: Path,
                                                        own_hf_engine: None) -> None:
    """A finished 2-step run (k = 1) extended to 4 steps with --resume: no batches were pending at its end, so
    step 3 is sampled by the final weights (lag 0, as step 1 was) and step 4 by them again (lag 1)."""
    run = tmp_path / "run"
    train_grpo(remote_config(tiny_qwen2_path, run, "grpo.max_staleness=1", "grpo.n_grpo_steps=2"))
    train_grpo(remote_config(tiny_qwen2_path, run, "grpo.max_staleness=1", "grpo.n_grpo_steps=4"), resume=True)
    records = [r for r in read_metrics(run) if "train/loss" in r]
    assert [(r["step"], r["rollout/policy_lag"]) for r in records] == [(1, 0), (2, 1), (3, 0), (4, 1)]


@pytest.mark.slow
def test_a_failing_engine_ends_the_run_with_one_clear_error(tiny_qwen2_path: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine fails on the producer thread (step 3's generation): the learner, waiting for that batch,
    raises `RolloutProducerError` naming the step and the cause, and the run's checkpoint of step 2 remains."""
    from rollout.engines.hf import HFEngine
    from trainer.learners.async_rollouts import RolloutProducerError

    class Dying(HFEngine):
        def generate(self, prompts, params):  # type: ignore[no-untyped-def]
            if params.seed is not None and params.seed >= 3000:  # seed + 1000·step: step 3 onwards
                raise ConnectionError("rollout server POST /v1/completions failed: connection refused")
            return super().generate(prompts, params)

    monkeypatch.setattr("trainer.engines.build_engine", lambda cfg, learner: Dying(cfg.model.path))
    cfg = remote_config(tiny_qwen2_path, tmp_path / "run", "grpo.max_staleness=1", "checkpoint.save_every=1")
    with pytest.raises(RolloutProducerError, match=r"generating the rollouts of step 3 .*ConnectionError: "
                                                   r"rollout server POST /v1/completions failed.*--resume"):
        train_grpo(cfg)
    assert (tmp_path / "run" / "checkpoints" / "step_000001").exists()


@pytest.mark.slow
def test_the_probe_checks_every_push_on_the_producer(tiny_qwen2_path: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that garbles the weights it is pushed after the first sync: the producer's probe (greedy token
    after the prefix, then the prompt scoring, against the learner's log-probs at hand-over) stops the run."""
    from rollout.engines.hf import HFEngine
    from trainer.learners.async_rollouts import RolloutProducerError
    from trainer.sync import StaleWeightsError

    class Garbling(HFEngine):
        def update_weights(self, weights):  # type: ignore[no-untyped-def]
            super().update_weights(weights)
            if self.policy_version > 1:
                with torch.no_grad():
                    next(self.model.parameters()).add_(0.5)

    monkeypatch.setattr("trainer.engines.build_engine", lambda cfg, learner: Garbling(cfg.model.path))
    cfg = remote_config(tiny_qwen2_path, tmp_path / "run", "grpo.max_staleness=1")
    with pytest.raises(RolloutProducerError, match="loading the weights of step 1 into the rollout engine") as failure:
        train_grpo(cfg)
    assert isinstance(failure.value.__cause__, StaleWeightsError)


@pytest.mark.slow
def test_async_lora_pushes_merged_weights(tiny_qwen2_path: str, tmp_path: Path, own_hf_engine: None) -> None:
    """Under model.lora the snapshot holds the merged weights under the base names (as the synchronous sync
    sends them): the engine's name check takes them and the probe agrees after every push."""

    cfg = remote_config(tiny_qwen2_path, tmp_path / "run", LORA, "grpo.max_staleness=1", "optim.learning_rate=1e-2",
                        "grpo.entropy_coef=0.01")
    train_grpo(cfg)
    records = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert [r.get("rollout/probe_ok") for r in records] == [None, None, 1.0, 1.0]
    assert max(r["rollout/probe_max_abs_diff"] for r in records[2:]) <= 1e-3


@pytest.mark.slow
@pytest.mark.vllm
def test_an_in_process_vllm_engine_on_the_producer_thread(tiny_qwen2_path: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The dedicated placement's engine, on CPU: vLLM in the learner's process (float32, eager), created on the
    main thread and then driven only from the producer thread (generation, scoring, weight pushes and the
    probe) while the learner trains on the main thread. The lag schedule is the HF stand-in's, every push
    passes the probe, evaluations run on the producer thread too, and every push reached the engine."""
    from helpers import tiny_vllm_engine

    engines = []

    def build(cfg, learner):  # type: ignore[no-untyped-def]
        engines.append(tiny_vllm_engine(cfg.model.path))
        return engines[-1]

    monkeypatch.setattr("trainer.engines.build_engine", build)
    cfg = remote_config(tiny_qwen2_path, tmp_path / "run", "grpo.max_staleness=1", "optim.learning_rate=1e-3",
                        "eval.every=2")
    train_grpo(cfg)
    records = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert [r["rollout/policy_lag"] for r in records] == [0, 1, 1, 1]
    assert [r.get("rollout/probe_ok") for r in records] == [None, None, 1.0, 1.0]
    assert max(r["rollout/probe_max_abs_diff"] for r in records[2:]) <= 1e-3
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "eval/accuracy" in r] == [0, 2, 4]
    assert engines[0].policy_version == 1 + 4  # the start's sync, then a push after each step (the last: for eval)


# ---- in-flight weight updates (the server side: tests/trainer/learners/test_inflight_updates.py) ----------
def test_inflight_updates_need_an_asynchronous_run_on_a_server(tiny_qwen2_path: str, tmp_path: Path) -> None:
    for extra in (("rollout.placement=remote",), ("grpo.max_staleness=1", "rollout.placement=dedicated",
                                                  "rollout.device=cuda:1")):
        args = [x for x in extra if x != "rollout.placement=remote"]
        make = remote_config if "rollout.placement=remote" in extra else small_config
        with pytest.raises(ConfigError, match=r"grpo.inflight_weight_updates=true with .*only an asynchronous "
                                              r"run against a server"):
            make(tiny_qwen2_path, tmp_path, "grpo.inflight_weight_updates=true", *args)
    cfg = remote_config(tiny_qwen2_path, tmp_path, "grpo.max_staleness=1", "grpo.inflight_weight_updates=true")
    assert cfg.grpo.inflight_weight_updates and not small_config(tiny_qwen2_path, tmp_path).grpo.inflight_weight_updates


def test_staleness_counts_each_token_by_the_version_that_drew_it() -> None:
    """Learner at version 5, k = 1. Sample A: 4 tokens of version 4. Sample B: 2 tokens of version 4, then 6
    of version 5. By hand: sample lags 1, 1 (mean 1); token lags 1,1,1,1, 1,1, 0×6: mean 6/12 = 0.5; one of
    two samples mixed."""
    a = Sample(0, [1], [7] * 4, "", [0.0] * 4, "stop", 4)
    b = Sample(0, [1], [7] * 8, "", [0.0] * 8, "stop", 4, version_spans=[[4, 0, 2], [5, 2, 8]])
    assert b.token_versions() == [4, 4, 5, 5, 5, 5, 5, 5] and a.token_versions() == [4] * 4
    assert grpo.staleness(5, [a, b], 1) == {"rollout/policy_lag": 1.0, "rollout/policy_lag_mean": 1.0,
                                            "rollout/policy_lag_token_mean": 0.5,
                                            "rollout/mixed_version_fraction": 0.5}
    ahead = Sample(0, [1], [7] * 2, "", [0.0] * 2, "stop", 5, version_spans=[[5, 0, 1], [6, 1, 2]])
    with pytest.raises(RuntimeError, match=r"rollouts -1..0 versions behind the learner \(version 5\)"):
        grpo.staleness(5, [ahead], 1)


def test_pending_batches_keep_their_version_spans() -> None:
    sample = Sample(0, [1, 2], [3, 4, 5], "x", [-1.0, -2.0, -3.0], "length", 2, {"reward": 1.0},
                    [[2, 0, 1], [3, 1, 3]])
    batch = ProducedBatch(4, [sample], torch.tensor([1.0]), torch.tensor([0.5]), {"m": 1.0}, {"position": 3})
    again = ProducedBatch.from_json(json.loads(json.dumps(batch.to_json())))
    assert again.samples == [sample] and again.samples[0].token_versions() == [2, 3, 3]
