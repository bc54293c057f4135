"""DPO mode end to end on the tiny Qwen2 (CPU) through the real CLI / `train_dpo` with
configs/tiny/dpo_tiny_cpu.yaml, plus the IPO / SimPO losses and the micro-batching of `dpo_update`.

The synthetic preference task (`write_preferences`): for every a, b in 0..19 one pair with prompt
"What is a + b?", chosen "a + b = <a+b>" and rejected "a + b = <a+b+10>". Each question appears once, so the
20% held out are questions never trained on. A two-layer random model can pick this preference up in 20
steps (the wrong answers are all too big by ten); the tests check that the DPO machinery (signs, reference,
template, EOS, optimizer, accumulation) moves the implicit reward the right way on pairs it never saw.

Runs single-threaded (`one_thread`): two OpenMP threads on the shared 2-core machine were 3× slower.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cs336_adapters import batched_dpo_loss
from helpers import REPO, capture_grads_at_step
from safetensors.torch import load_file

from trainer.cli import main as cli_main
from trainer.config import DPOConfig, ModelConfig, OptimConfig
from trainer.config_io import load_config
from trainer.data.preference import read_preference_pairs
from trainer.data.prompts import ALPACA
from trainer.data.tasks import DatasetFormatError
from trainer.learner import Learner, load_model
from trainer.learners.dpo import PairOutput, preference_loss, reward_metrics, train_dpo
from trainer.losses import ipo_loss_from_logps, simpo_loss_from_logps
from trainer.tracking import read_metrics

CONFIG = REPO / "configs" / "tiny" / "dpo_tiny_cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_preferences(path: Path) -> Path:
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}", "rejected": f"{a} + {b} = {a + b + 10}"}
            for a in range(20) for b in range(20)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_overrides(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.preference_path={data}", f"output_dir={out}", *extra]


def test_dpo_raises_heldout_preference_accuracy_via_cli(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """40 steps of DPO (β 0.1, RMSprop lr 1e-3, 16 pairs per step in micro-batches of 8).

    Held-out implicit-reward accuracy on 80 unseen questions starts at exactly 0.5 (policy = reference,
    ties count one half). Measured at steps 0/10/20/30/40: 0.5, 0.69, 0.74, 0.81, 1.0; with seeds 1 and 2
    (other split and order) the run ends at 0.84 and 0.95. The test asks for ≥ 0.75 at the end: 0.25 above
    chance, 4.5 standard errors of an 80-pair chance-level accuracy (√(0.25/80) = 0.056), in a
    deterministic run.
    """
    data = write_preferences(tmp_path / "pref.jsonl")
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(CONFIG), *run_overrides(tiny_qwen2_path, data, out)]) == 0
    records = read_metrics(out)
    evals = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    assert [s for s, _ in evals] == [0, 10, 20, 30, 40]
    assert evals[0][1] == 0.5
    assert evals[-1][1] >= 0.75, evals
    assert next(r for r in records if "data/heldout_pairs" in r)["data/heldout_pairs"] == 80
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    # the best checkpoint is the most accurate evaluation (the first of equals)
    best = json.loads((out / "best" / "best.json").read_text())
    best_step, best_acc = max(evals, key=lambda e: (e[1], -e[0]))
    assert (best["step"], best["eval/accuracy"]) == (best_step, best_acc)
    assert (out / "best" / "model.safetensors").is_file()
    # every trainable parameter of the policy changed
    initial = load_file(Path(tiny_qwen2_path) / "model.safetensors")
    (ckpt,) = (out / "checkpoints").iterdir()
    final = load_file(ckpt / "hf" / "model.safetensors")
    assert set(initial) == set(final)
    assert not [k for k in initial if torch.equal(initial[k], final[k])]


@pytest.mark.parametrize(
    ("loss", "steps", "extra"), [("ipo", 10, []), ("simpo", 30, ["dpo.beta=2.0", "dpo.simpo_gamma=0.5"])]
)
def test_ipo_and_simpo_raise_heldout_accuracy(
    tmp_path: Path, tiny_qwen2_path: str, loss: str, steps: int, extra: list[str]
) -> None:
    """Measured (seeds 0 / 1 / 2): IPO, 10 steps: 0.5 → 0.94 / 0.93 / 0.98. SimPO (no reference: rewards are
    β·mean log-probs, so it starts from the raw model's preference, 0.41-0.53) rises, then swings: on a 2-core
    EPYC without AVX-512, seed 0's accuracy at steps 10/15/20/25/30 was 0.70 / 0.85 / 0.69 / 0.71 / 0.85, so 20
    steps ended +0.24 there (+0.46 / +0.54 / +0.44 for seeds 0 / 1 / 2 where first measured). 30 steps, that
    CPU without AVX-512, seeds 0-4: +0.40 / +0.59 / +0.46 / +0.49 / +0.48. Asked: +0.25 over the start (4.5
    standard errors of an 80-pair chance-level accuracy)."""
    data = write_preferences(tmp_path / "pref.jsonl")
    cfg = load_config(
        CONFIG,
        run_overrides(tiny_qwen2_path, data, tmp_path / "run", f"dpo.loss={loss}", f"dpo.max_steps={steps}",
                      "eval.every=0", *extra),
    )  # fmt: skip
    final = train_dpo(cfg)
    start = next(r for r in read_metrics(tmp_path / "run") if "eval/accuracy" in r)
    assert start["step"] == 0
    assert final["eval/accuracy"] >= start["eval/accuracy"] + 0.25, (start["eval/accuracy"], final)
    assert math.isfinite(final["eval/loss"])


def test_dpo_never_starts_the_reward_pool(tmp_path: Path, tiny_qwen2_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DPO scores no rollouts: the session starts the reward sandbox (a worker pool) only on first use."""

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("mode dpo started the reward pool")

    monkeypatch.setattr("trainer.session.RewardScorer", no_pool)
    data = write_preferences(tmp_path / "pref.jsonl")
    cfg = load_config(CONFIG, run_overrides(tiny_qwen2_path, data, tmp_path / "run", "dpo.max_steps=1"))
    assert math.isfinite(train_dpo(cfg)["eval/loss"])


def test_ipo_and_simpo_losses_by_hand() -> None:
    """IPO: h = (−1 − −2) − (−3 − −3) = 1, β = 0.5 → (1 − 1)² = 0; h = 0 → (0 − 1)² = 1.
    SimPO: β = 2, means −1 vs −2, γ = 1 → −log σ(2·1 − 1) = −log σ(1) = 0.3133."""
    t = torch.tensor
    assert ipo_loss_from_logps(
        t([-1.0, -2.0]), t([-3.0, -3.0]), t([-2.0, -2.0]), t([-3.0, -3.0]), 0.5
    ).tolist() == [0.0, 1.0]
    got = simpo_loss_from_logps(t([-1.0]), t([-2.0]), beta=2.0, gamma=1.0)
    torch.testing.assert_close(got, t([-math.log(1 / (1 + math.exp(-1.0)))]))
    # implicit rewards and accuracy: ties count one half
    cfg = DPOConfig(beta=0.5)
    out = preference_loss((t([-1.0, -2.0, -5.0]), t([-2.0, -2.0, -1.0])), (t([-1.0] * 3), t([-1.0] * 3)), cfg)
    torch.testing.assert_close(out.reward_chosen, t([0.0, -0.5, -2.0]))
    torch.testing.assert_close(out.reward_rejected, t([-0.5, -0.5, 0.0]))
    metrics = reward_metrics(out, "eval")
    assert metrics["eval/accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["eval/reward_margin"] == pytest.approx((0.5 + 0 - 2) / 3)
    assert isinstance(out, PairOutput)


def test_dpo_update_equals_whole_batch_loss(tiny_qwen2_path: str) -> None:
    """Naive twin: `dpo_update` over micro-batches of 2 pairs (2 + 2 + 1) accumulates the gradient of the
    mean `batched_dpo_loss` of all 5 pairs in one pass. Tolerance 1e-5 absolute: gradients are up to 0.5,
    and the float32 summation order differs with the padding of each micro-batch (measured 1e-6)."""
    from trainer.learners.dpo import dpo_update

    cfg = load_config(CONFIG, [f"model.path={tiny_qwen2_path}", "dpo.micro_batch_pairs=2", "dpo.beta=0.3"])
    learner = Learner(ModelConfig(path=tiny_qwen2_path, dtype="float32"), OptimConfig(learning_rate=1e-2))
    ref = load_model(cfg.model, "cpu")
    with torch.no_grad():  # a reference that differs from the policy
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rows = [(f"What is {a} + 3?", f"{a} + 3 = {a + 3}", f"{a} + 3 = {a + 13}") for a in range(5)]
    from trainer.data.preference import PreferencePair

    pairs = [PreferencePair(*r) for r in rows]
    whole = batched_dpo_loss(
        learner.model, ref, learner.tokenizer, 0.3, *zip(*rows, strict=True), ALPACA
    ).mean()
    whole.backward()
    expected = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    learner.optimizer.zero_grad(set_to_none=True)
    captured = capture_grads_at_step(learner)
    initial = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    metrics = dpo_update(learner, ref, cfg, [pairs[:2], pairs[2:4], pairs[4:]])
    assert set(captured) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(
            captured[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert metrics["train/loss"] == pytest.approx(float(whole.detach()), rel=1e-6)

    # a zero-weight stand-in micro-batch (a rank short of pairs, `deal_micro_batches`), placed last where
    # the gradient sync happens, changes nothing: same gradient, same loss and metrics
    with torch.no_grad():  # back to the same point, so the gradient is comparable
        for n, p in learner.model.named_parameters():
            p.copy_(initial[n])
    captured.clear()
    with_dummy = dpo_update(learner, ref, cfg, [pairs[:2], pairs[2:4], pairs[4:], pairs[:1]],
                            dummies=[False, False, False, True])
    for name, grad in expected.items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert with_dummy["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-6)


@pytest.fixture
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate's state is a process-wide singleton that refuses a second mixed-precision setting; start
    this test from none and leave none behind, so the next `Accelerator()` is the default again."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_reference_runs_under_the_policys_bf16_autocast(tiny_qwen2_path: str) -> None:
    """``--mixed_precision bf16`` autocasts only the prepared policy's forward. At step 0 the reference (same
    weights) must give the same log-probs: compared exactly (tolerance 0), since the same bf16 kernels on the
    same inputs are deterministic and `sequence_logp` upcasts both models' logits to float64 alike. So every
    implicit reward is exactly 0, the DPO loss exactly log 2 and the accuracy exactly 0.5 (ties count one
    half), in `Validator` and in `dpo_update`. Before the fix the float32 reference differed by up to 1.1e-2
    per sequence and the held-out accuracy was 0.375; the control below checks that gap still exists."""
    from accelerate import Accelerator

    from trainer.data.preference import PreferencePair
    from trainer.learners.dpo import Validator, dpo_update, pair_logps, reference_model

    cfg = load_config(CONFIG, [f"model.path={tiny_qwen2_path}", "dpo.micro_batch_pairs=4"])
    learner = Learner(
        ModelConfig(path=tiny_qwen2_path, dtype="float32"),
        OptimConfig(learning_rate=1e-2),
        Accelerator(mixed_precision="bf16", cpu=True),
    )
    ref = reference_model(cfg, learner)
    assert ref is not None
    pairs = [PreferencePair(f"What is {a} + {b}?", f"{a} + {b} = {a + b}", f"{a} + {b} = {a + b + 10}")
             for a in range(4) for b in range(2)]  # fmt: skip
    with torch.no_grad():  # control: outside autocast a float32 reference disagrees with the bf16 policy
        plain = pair_logps(load_model(cfg.model, "cpu").eval(), learner.tokenizer, pairs, ALPACA, "dpo")[0]
        policy = pair_logps(learner.model, learner.tokenizer, pairs, ALPACA, "dpo")[0]
    assert float((plain - policy).abs().max()) > 1e-4
    evals = Validator(pairs, cfg.dpo.micro_batch_pairs)(learner, ref, cfg.dpo)
    train = dpo_update(learner, ref, cfg, [pairs[:4], pairs[4:]])
    log2 = float(torch.tensor(math.log(2), dtype=torch.float32))  # the metrics are float32 (`_cat`)
    for m, prefix in ((evals, "eval"), (train, "train")):
        assert m[f"{prefix}/reward_chosen"] == m[f"{prefix}/reward_rejected"] == 0.0, m
        assert m[f"{prefix}/loss"] == log2, m
        assert m[f"{prefix}/accuracy"] == 0.5, m


def test_bad_preference_input_names_file_and_line(tmp_path: Path, tiny_qwen2_path: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")  # fmt: skip
    with pytest.raises(DatasetFormatError, match=rf"{bad}:2: missing key 'rejected'"):
        train_dpo(load_config(CONFIG, run_overrides(tiny_qwen2_path, bad, tmp_path / "run")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetFormatError, match=rf"{empty}: no records \(empty file\)"):
        read_preference_pairs(empty)
