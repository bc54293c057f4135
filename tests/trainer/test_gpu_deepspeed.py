"""DeepSpeed ZeRO-2 and ZeRO-3 (GPU): one GRPO optimizer step of `update_policy`, then checkpoint save and
resume.

For each stage the test launches this file twice with ``accelerate launch --config_file launch/zero{2,3}.yaml
--num_processes N`` (N = min(2, GPUs); bf16, as a real run) on the tiny GPT-2 and the seeded batches of
`tests/dp_worker.py`:

1. ``train``: `Learner` + `update_policy` on batch A (token-level normalisation, 2 micro-batches per rank)
   must make exactly one optimizer step: DeepSpeed's ``global_steps`` is 1 and the warm-up learning rate
   has advanced once (``lr · 2/10``); DeepSpeed clips at the run's ``optim.max_grad_norm`` (0.5 here), not
   the launch file's 1.0. Then `save_checkpoint` (step 1), then a second step on batch B.
2. ``resume``: a fresh `Learner`, `load_checkpoint` of step 1: the gathered weights equal step 1's, the
   checkpoint's ``hf/`` loads with ``from_pretrained`` to the same weights, and the second step on batch
   B lands where the uninterrupted run did (within 5 % of that step's size: GPU atomics make bf16 steps not
   bit-reproducible; a lost optimizer or scheduler state moves it by far more, as batch B's gradient
   differs from A's and the warm-up learning rate doubles between steps).

Run as a script it is the worker: ``python tests/trainer/test_gpu_deepspeed.py train|resume MODEL OUT``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, TESTS, repo_pythonpath

TIMEOUT_S = 600
LR, WARMUP, MAX_GRAD_NORM = 1e-3, 10, 0.5

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(3 * TIMEOUT_S)]


# ---- worker (runs under accelerate launch) ----------------------------------------------------------
def _config(model_path: str, out: Path) -> Any:
    from trainer.config_io import config_from_dict

    return config_from_dict({
        "output_dir": str(out / "run"),
        "model": {"path": model_path, "dtype": "bfloat16"},
        "optim": {"learning_rate": LR, "warmup_steps": WARMUP, "max_grad_norm": MAX_GRAD_NORM},
        "rollout": {"max_tokens": 24},
        "grpo": {"rollout_batch_size": 16, "group_size": 4, "train_batch_size": 16,
                 "gradient_accumulation_steps": 2, "loss_type": "grpo_clip", "length_normalization": "token"},
    })  # fmt: skip


def _full_state(learner: Any) -> dict[str, torch.Tensor]:
    """Gathered (16-bit) weights on rank 0, {} elsewhere; a collective, every rank calls it."""
    state = learner.accelerator.get_state_dict(learner.model)
    return (
        {k: v.detach().float().cpu().clone() for k, v in state.items()}
        if learner.accelerator.is_main_process
        else {}
    )


def _step(learner: Any, cfg: Any, variant: int) -> dict[str, float]:
    sys.path.insert(0, str(REPO / "tests"))
    from dp_worker import rollout_batch

    from trainer.learners.grpo import update_policy

    acc = learner.accelerator
    return update_policy(learner, cfg, rollout_batch(learner, acc.process_index, acc.num_processes, variant))


def worker(phase: str, model_path: str, out_dir: str) -> None:
    from accelerate import Accelerator

    from trainer.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
    from trainer.learner import Learner

    out = Path(out_dir)
    cfg = _config(model_path, out)
    acc = Accelerator()
    assert acc.distributed_type == "DEEPSPEED", acc.distributed_type
    learner = Learner(cfg.model, cfg.optim, acc)
    record: dict[str, Any] = {"world": acc.num_processes}
    if phase == "train":
        record["metrics_1"] = _step(learner, cfg, variant=0)
        record["global_steps_1"] = int(learner.model.global_steps)
        record["gradient_clipping"] = float(learner.model.gradient_clipping())
        record["state_1"] = _full_state(learner)
        save_checkpoint(
            acc, learner.model, learner.tokenizer, cfg.output_dir, 1, {"step": 1}, cfg, keep_last=2
        )
    else:
        state = load_checkpoint(acc, checkpoint_dir(cfg.output_dir, 1))
        record["trainer_state"] = state
        record["state_1"] = _full_state(learner)
    record["metrics_2"] = _step(learner, cfg, variant=1)
    record["global_steps_2"] = int(learner.model.global_steps)
    record["state_2"] = _full_state(learner)
    if acc.is_main_process:
        torch.save(record, out / f"{phase}.pt")
    acc.wait_for_everyone()


# ---- the test ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(phase: str, model: str, out: Path, n: int, stage: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch" / f"{stage}.yaml"),
        "--num_processes",
        str(n),
        "--main_process_port",
        str(_free_port()),
        str(Path(__file__).resolve()),
        phase,
        model,
        str(out),
    ]
    pythonpath = os.pathsep.join([repo_pythonpath(), str(TESTS)])  # the worker imports helpers, dp_worker
    env = dict(os.environ, PYTHONPATH=pythonpath, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{phase} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return torch.load(out / f"{phase}.pt", weights_only=False)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_grpo_step_save_resume(tiny_gpt2_path: str, tmp_path: Path, stage: str) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the gpu extra: pip install -e '.[gpu]'")
    n = min(2, torch.cuda.device_count())
    train = _launch("train", tiny_gpt2_path, tmp_path, n, stage)
    assert train["world"] == n
    assert train["gradient_clipping"] == MAX_GRAD_NORM
    # exactly one optimizer step for one optimizer batch of 2 micro-batches per rank
    assert train["global_steps_1"] == 1
    assert train["metrics_1"]["train/lr"] == pytest.approx(LR * 2 / WARMUP)
    assert train["global_steps_2"] == 2
    m = train["metrics_1"]
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values()), m
    assert m["train/grad_norm"] > 0

    resume = _launch("resume", tiny_gpt2_path, tmp_path, n, stage)
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
    assert gap <= 0.05 * step_size, (
        f"resumed step 2 is {gap:.3g} from the uninterrupted one (step {step_size:.3g})"
    )
    assert resume["metrics_2"]["train/lr"] == pytest.approx(train["metrics_2"]["train/lr"])
    assert resume["global_steps_2"] == train["global_steps_2"]


if __name__ == "__main__":
    worker(*sys.argv[1:4])
