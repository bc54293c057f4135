"""The benchmarks still run: each script, in a real subprocess, on a tiny workload, prints its table.

The GPU procedure (`benchmarks/gpu/run_all.sh`) spends scarce device minutes on these scripts; a script that
broke since it was last run would waste them, so CI runs each one small.
"""

from __future__ import annotations

import pytest
from helpers import run_script


@pytest.mark.slow
def test_learner_step_prints_every_layout(tiny_qwen2_path: str) -> None:
    out = run_script("learner_step.py", "--model", tiny_qwen2_path, "--num-seqs", "16", "--max-response", "40",
                     "--repeats", "1", "--peak-tflops", "1.0")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert {"padded", "trimmed", "sorted", "response", "packed"} <= rows.keys(), out
    assert rows["packed"][2] == "0.0%", out  # packing computes no padding
    assert rows["padded"][-1] == "1.00x" and rows["sorted"][6].endswith("%"), out  # speed-up base; MFU shown


@pytest.mark.slow
@pytest.mark.vllm
def test_rollout_benchmark_small() -> None:
    out = run_script("rollout.py", "--small", "--num-seqs", "16", "--prompt-len", "16", "--max-new-tokens", "8",
                     "--repeats", "1")
    for row in ("raw vllm.LLM.generate (logprobs=0)", "VLLMEngine.generate", "HFEngine.generate",
                "VLLMEngine.update_weights"):
        assert row in out, out


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_step_benchmark() -> None:
    out = run_script("grpo_step.py", "--steps", "2", "grpo.rollout_batch_size=16", "grpo.train_batch_size=16",
                     "rollout.max_tokens=8", "logging.peak_tflops=1.0")
    assert "generate" in out and "sync" in out and "MFU" in out, out
