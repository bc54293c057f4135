"""DeepSpeed ZeRO-2 and ZeRO-3: one GRPO optimizer step of `update_policy`, then checkpoint save and resume, on
2 CPU ranks (DeepSpeed's CPU accelerator over gloo, `trainer.learner.make_accelerator`) and on GPUs.

For each stage the test launches this file with ``accelerate launch --config_file launch/zero{2,3}.yaml
--num_processes N`` on the tiny GPT-2 and the seeded batches of `tests/dp_worker.py` (CPU: N = 2; GPU: N =
min(2, GPUs)):

1. ``train``: `Learner` + `update_policy` on batch A (token-level normalisation, 2 micro-batches per rank)
   must make exactly one optimizer step: DeepSpeed's ``global_steps`` is 1 and the warm-up learning rate
   has advanced once (``lr · 2/10``); DeepSpeed clips at the run's ``optim.max_grad_norm`` (0.5 here), not
   the launch file's 1.0. Then `save_checkpoint` (step 1), then a second step on batch B.
2. ``resume``: a fresh `Learner`, `load_checkpoint` of step 1: the gathered weights equal step 1's, the
   checkpoint's ``hf/`` loads with ``from_pretrained`` to the same weights, and the second step on batch
   B lands where the uninterrupted run did. On CPU exactly (the same sums in the same order); on GPUs within
   5 % of that step's size (GPU atomics make bf16 steps not bit-reproducible; a lost optimizer or scheduler
   state moves it by far more, as batch B's gradient differs from A's and the warm-up learning rate doubles
   between steps).
3. On CPU in float32 (``--mixed_precision no``), the partitioned step must be the plain one: ``reference``
   runs the same two steps in one process without DeepSpeed (world 1, the whole batch, as
   `test_data_parallel.py` checks DDP against), and ZeRO-2's and ZeRO-3's weights after each step agree
   with it to float32 rounding.

Run as a script it is the worker: ``python tests/trainer/test_deepspeed.py train|resume|reference MODEL OUT DTYPE``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, TESTS, repo_pythonpath

from rollout.transfer import free_port  # torch only: the GPU learner stage carries no vLLM

TIMEOUT_S = 600
LR, WARMUP, MAX_GRAD_NORM = 1e-3, 10, 0.5
STAGES = ("zero2", "zero3")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

pytestmark = [pytest.mark.timeout(3 * TIMEOUT_S)]


# ---- worker (runs under accelerate launch) ----------------------------------------------------------
def _config(model_path: str, out: Path, dtype: str) -> Any:
    from trainer.config_io import config_from_dict

    return config_from_dict({
        "output_dir": str(out / "run"),
        "model": {"path": model_path, "dtype": dtype},
        "optim": {"learning_rate": LR, "warmup_steps": WARMUP, "max_grad_norm": MAX_GRAD_NORM},
        "rollout": {"max_tokens": 24},
        "grpo": {"rollout_batch_size": 16, "group_size": 4, "train_batch_size": 16,
                 "gradient_accumulation_steps": 2, "loss_type": "grpo_clip", "length_normalization": "token"},
    })  # fmt: skip


def _full_state(learner: Any) -> dict[str, torch.Tensor]:
    """Gathered weights on rank 0, {} elsewhere; a collective, every rank calls it."""
    state = learner.accelerator.get_state_dict(learner.model)  # None off rank 0 under ZeRO-3
    if not learner.accelerator.is_main_process:
        return {}
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def _step(learner: Any, cfg: Any, variant: int) -> dict[str, float]:
    sys.path.insert(0, str(REPO / "tests"))
    from dp_worker import rollout_batch

    from trainer.learners.grpo import update_policy

    acc = learner.accelerator
    return update_policy(learner, cfg, rollout_batch(learner, acc.process_index, acc.num_processes, variant))


def worker(phase: str, model_path: str, out_dir: str, dtype: str) -> None:
    from trainer.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
    from trainer.learner import Learner, make_accelerator

    out = Path(out_dir)
    cfg = _config(model_path, out, dtype)
    acc = make_accelerator()
    expected = "NO" if phase == "reference" else "DEEPSPEED"
    assert acc.distributed_type == expected, acc.distributed_type
    learner = Learner(cfg.model, cfg.optim, acc)
    record: dict[str, Any] = {"world": acc.num_processes}
    if phase == "resume":
        record["trainer_state"] = load_checkpoint(acc, checkpoint_dir(cfg.output_dir, 1))
        record["state_1"] = _full_state(learner)
    else:
        record["metrics_1"] = _step(learner, cfg, variant=0)
        record["state_1"] = _full_state(learner)
    if phase == "train":
        record["global_steps_1"] = int(learner.model.global_steps)
        record["gradient_clipping"] = float(learner.model.gradient_clipping())
        save_checkpoint(
            acc, learner.model, learner.tokenizer, cfg.output_dir, 1, {"step": 1}, cfg, keep_last=2
        )
    record["metrics_2"] = _step(learner, cfg, variant=1)
    if phase != "reference":
        record["global_steps_2"] = int(learner.model.global_steps)
    record["state_2"] = _full_state(learner)
    if acc.is_main_process:
        torch.save(record, out / f"{phase}.pt")
    acc.wait_for_everyone()
    learner.end_distributed()  # as a run ends (`Session.close`); an exit with the group alive can abort
    assert not torch.distributed.is_initialized()


# ---- the tests --------------------------------------------------------------------------------------
def _launch(phase: str, model: str, out: Path, stage: str, device: str, dtype: str = "bfloat16") -> dict[str, Any]:
    """Run the worker: under ``accelerate launch`` with a DeepSpeed launch file, or (``reference``) alone."""
    out.mkdir(parents=True, exist_ok=True)
    script = [str(Path(__file__).resolve()), phase, model, str(out), dtype]
    if phase == "reference":
        cmd = [sys.executable, *script]
    else:
        n = 2 if device == "cpu" else min(2, torch.cuda.device_count())
        precision = "bf16" if dtype == "bfloat16" else "no"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / f"{stage}.yaml"),
               "--num_processes", str(n), "--main_process_port", str(free_port()), "--mixed_precision", precision,
               *script]  # fmt: skip
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([repo_pythonpath(), str(TESTS)])  # the worker imports helpers, dp_worker
    if device == "cpu":  # DeepSpeed picks its CPU accelerator where torch sees no CUDA device
        env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{phase} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return torch.load(out / f"{phase}.pt", weights_only=False)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def _needs(device: str) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the cpu and gpu extras: pip install -e '.[cpu]'")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_grpo_step_save_resume(tiny_gpt2_path: str, tmp_path: Path, stage: str, device: str) -> None:
    _needs(device)
    train = _launch("train", tiny_gpt2_path, tmp_path, stage, device)
    assert train["world"] == (2 if device == "cpu" else min(2, torch.cuda.device_count()))
    assert train["gradient_clipping"] == MAX_GRAD_NORM
    # exactly one optimizer step for one optimizer batch of 2 micro-batches per rank
    assert train["global_steps_1"] == 1
    assert train["metrics_1"]["train/lr"] == pytest.approx(LR * 2 / WARMUP)
    assert train["global_steps_2"] == 2
    m = train["metrics_1"]
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values()), m
    assert m["train/grad_norm"] > 0

    resume = _launch("resume", tiny_gpt2_path, tmp_path, stage, device)
    assert resume["trainer_state"]["step"] == 1
    assert _distance(resume["state_1"], train["state_1"]) == 0.0, "resumed weights differ from step 1's"
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "run" / "checkpoints" / "step_000001" / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    hf = {k: v.float() for k, v in model.state_dict().items()}
    common = hf.keys() & train["state_1"].keys()
    assert {name for name, _ in model.named_parameters()} <= common
    assert _distance({k: hf[k] for k in common}, {k: train["state_1"][k] for k in common}) == 0.0

    step_size = _distance(train["state_2"], train["state_1"])
    assert step_size > 0
    gap = _distance(resume["state_2"], train["state_2"])
    allowed = 0.0 if device == "cpu" else 0.05 * step_size
    assert gap <= allowed, f"resumed step 2 is {gap:.3g} from the uninterrupted one (step {step_size:.3g})"
    assert resume["metrics_2"]["train/lr"] == pytest.approx(train["metrics_2"]["train/lr"])
    assert resume["global_steps_2"] == train["global_steps_2"]


@pytest.mark.slow
def test_partitioned_steps_equal_the_plain_step(tiny_gpt2_path: str, tmp_path: Path) -> None:
    """float32 on CPU: ZeRO-2 and ZeRO-3 on 2 ranks take the same two steps as one process without DeepSpeed.

    Each step moves every weight by about the learning rate (Adam's first steps: 2e-4 and 3e-4 here); the
    partitioned runs reduce the gradients in another order, which leaves the weights (at most about 1 in
    size) a few float32 units in the last place from the plain run's: 4.2e-7 at most, measured. A step that
    lost a rank's gradient, or the clipping, would be off by the step itself."""
    _needs("cpu")
    reference = _launch("reference", tiny_gpt2_path, tmp_path / "reference", "", "cpu", "float32")
    assert reference["world"] == 1
    for stage in STAGES:
        got = _launch("train", tiny_gpt2_path, tmp_path / stage, stage, "cpu", "float32")
        for key in ("state_1", "state_2"):
            assert got[key].keys() == reference[key].keys()
            for name, value in got[key].items():
                torch.testing.assert_close(value, reference[key][name], rtol=0, atol=1e-6,
                                           msg=lambda m, k=key, n=name: f"{stage} {k} {n}: {m}")  # noqa: B023
        for key in ("metrics_1", "metrics_2"):  # the other metrics are each rank's own (reduced by the loop)
            assert got[key]["train/grad_norm"] == pytest.approx(reference[key]["train/grad_norm"], rel=1e-5)
            assert got[key]["train/lr"] == reference[key]["train/lr"]


if __name__ == "__main__":
    worker(*sys.argv[1:5])
