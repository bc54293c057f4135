"""Model FLOPs (`trainer.flops`): by hand, and against torch's own FLOP counter on the tiny Qwen2."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from trainer.flops import FlopCounter, matmul_parameters, peak_tflops, train_flops


def test_train_flops_by_hand() -> None:
    """N = 1000, L = 2, d = 8, sequences of 3 and 5 tokens:
    6·1000·(3+5) + 12·2·8·(3² + 5²) = 48,000 + 192·34 = 54,528."""
    assert train_flops(1000, 2, 8, [3, 5]) == 54_528.0


def test_untied_input_embedding_is_not_a_matmul() -> None:
    config = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    untied = Qwen2ForCausalLM(config)
    total = sum(p.numel() for p in untied.parameters())
    assert matmul_parameters(untied) == total - 100 * 32
    tied = Qwen2ForCausalLM(Qwen2Config(**{**config.to_dict(), "tie_word_embeddings": True}))
    assert matmul_parameters(tied) == sum(p.numel() for p in tied.parameters())


def test_formula_equals_torch_flop_counter(tiny_qwen2_path: str) -> None:
    """Forward + backward of one sequence under `FlopCounterMode` (which counts matmuls, eager attention's
    two batched matmuls included) equals 6·N·T + 12·L·d·T², N = the tied model's parameters less the
    RMSNorm weights and biases (not matmul weights; < 0.3% of N here)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32, attn_implementation="eager")
    length = 48
    ids = torch.randint(2, 900, (1, length), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    not_matmul = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or n.endswith(".bias"))
    cfg = model.config
    want = train_flops(matmul_parameters(model) - not_matmul, cfg.num_hidden_layers, cfg.hidden_size, [length])
    assert counter.get_total_flops() == want  # exact: every matmul is counted once, nothing else is


def test_mfu_from_configured_peak_and_none_on_cpu(tiny_qwen2_path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
    assert peak_tflops(torch.device("cpu")) is None
    assert "train/mfu" not in FlopCounter(model, torch.device("cpu")).metrics([10], 1.0)
    counter = FlopCounter(model, torch.device("cpu"), configured_peak_tflops=2.0)
    m = counter.metrics([100, 50], seconds=0.5, passes=2)
    flops = 2 * train_flops(counter.n_params, 2, 128, [100, 50])
    assert m["train/model_tflops_per_s"] == pytest.approx(flops / 0.5 / 1e12)
    assert m["train/mfu"] == pytest.approx(m["train/model_tflops_per_s"] / 2.0)
