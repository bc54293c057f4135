"""Learner benchmark: forward + backward of a GRPO rollout batch in each micro-batch layout, with MFU.

Usage::

    python benchmarks/learner_step.py                      # CPU: tiny Qwen2 built locally, 64 rollouts
    python benchmarks/learner_step.py --model PATH         # GPU: 256 rollouts, 150-token prompts,
                                                           # responses of 64..1024 tokens, bf16

The batch is what a GRPO step trains on: ``num_seqs`` sequences of ``prompt_len`` prompt tokens and a
response length drawn uniformly from ``[min_response, max_response]`` (seeded), right-padded to the longest.
Each layout runs the same ``micro_batch``-row micro-batches through `trainer.logprobs.forward_log_probs` (or,
for ``padded``, the naive padded forward), sums the response log-probs and entropies, and backpropagates:

- ``padded``: micro-batches keep the width of the whole rollout batch (the layout before trimming);
- ``trimmed``: each micro-batch cut to its longest row, rows in rollout order;
- ``sorted``: trimmed, rows sorted by length first (`grpo.sort_by_length`);
- ``response``: sorted, with the LM head and the vocabulary softmax on the response tokens only
  (``response_only``, HF ``logits_to_keep``): what the learner runs by default;
- ``packed``: response, each micro-batch packed into one row (`model.packing`), under the model's attention
  implementation (``--attn``; varlen kernels need ``flash_attention_2``).

Reported per layout: tokens computed (real + padding), the padding share, seconds (best of ``--repeats``),
real tokens/s, model TFLOP/s by `trainer.flops` on real tokens only, MFU where the peak is known (CUDA device
name or ``--peak-tflops``), and peak CUDA memory. ``--compile`` compiles each transformer block first
(``model.compile``; the untimed pass of each layout pays the compilation). Quote ratios from one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data.batching import TokenBatch, micro_batch_slices, pack_token_ids
from trainer.flops import FlopCounter
from trainer.logprobs import forward_log_probs, get_response_log_probs, length_sorted_order, real_lengths

LAYOUTS = ("padded", "trimmed", "sorted", "response", "packed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", help="checkpoint path (default: the tiny Qwen2, built locally)")
    p.add_argument("--num-seqs", type=int, default=256 if gpu else 64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=150 if gpu else 32)
    p.add_argument("--min-response", type=int, default=64 if gpu else 8)
    p.add_argument("--max-response", type=int, default=1024 if gpu else 160)
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2, ...)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (model.compile)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--repeats", type=int, default=3 if gpu else 5)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    return p.parse_args(argv)


def rollout_batch(args: argparse.Namespace, vocab: int) -> TokenBatch:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_response, args.max_response + 1, (args.num_seqs,), generator=gen)
    prompts = [torch.randint(2, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.num_seqs)]
    responses = [torch.randint(2, vocab, (int(n),), generator=gen).tolist() for n in lengths]
    return pack_token_ids(prompts, responses, pad_id=0)


def micro_batches(tokens: TokenBatch, layout: str, size: int) -> list[TokenBatch]:
    order = torch.arange(len(tokens))
    if layout in ("sorted", "response", "packed"):
        order = length_sorted_order(tokens, order)
    return [tokens.select(order[sl]) for sl in micro_batch_slices(len(tokens), size)]


def train_pass(model: torch.nn.Module, batches: list[TokenBatch], layout: str, device: torch.device) -> None:
    """Forward + backward of every micro-batch (gradients accumulate, as in one optimizer step)."""
    for mb in batches:
        mb = mb.to(device)
        if layout == "padded":
            out = get_response_log_probs(model, mb.input_ids, mb.labels, True, attention_mask=mb.attention_mask)
        else:
            out = forward_log_probs(model, mb, return_token_entropy=True, packed=layout == "packed",
                                    response_only=layout in ("response", "packed"))
        mask = mb.response_mask.to(out["log_probs"].dtype)
        ((out["log_probs"] + 0.01 * out["token_entropy"]) * mask).sum().backward()


def computed_tokens(batches: list[TokenBatch], layout: str) -> int:
    if layout == "padded":
        return sum(mb.input_ids.numel() for mb in batches)
    if layout == "packed":
        return sum(int(real_lengths(mb).sum()) for mb in batches)
    return sum(len(mb) * int(real_lengths(mb).max()) for mb in batches)


def best_seconds(run: Callable[[], None], repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def load_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = args.model
    if path is None:
        from trainer.tools.tiny import build_tiny

        path = str(build_tiny(tempfile.mkdtemp(prefix="learner_bench_"))["tiny-qwen2"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=args.attn).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.compile:  # compiled on the first (untimed) pass of each layout
        from trainer.learner import compile_blocks

        compile_blocks(model)
    model.config.use_cache = False
    return model.train()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args, device)
    tokens = rollout_batch(args, model.config.vocab_size)
    real = int(real_lengths(tokens).sum())
    counter = FlopCounter(model, device, args.peak_tflops)
    print(f"{args.num_seqs} sequences ({args.prompt_len}-token prompts, responses {args.min_response}.."
          f"{args.max_response}), micro-batch {args.micro_batch}, {args.dtype}, attn {args.attn}"
          f"{', compiled blocks' if args.compile else ''}{', gradient checkpointing' if args.gradient_checkpointing else ''}, "
          f"{counter.n_params / 1e6:.1f}M matmul parameters, {real} real tokens, on {device}")
    train_pass(model, micro_batches(tokens, "padded", args.micro_batch)[:2], "padded", device)  # warm-up
    rows = [measure(model, tokens, layout, args, counter, device) for layout in args.layouts.split(",")]
    base = next((r["seconds"] for r in rows if r["layout"] == "padded"), rows[0]["seconds"])
    print(f"{'layout':<9}{'computed':>10}{'padding':>9}{'seconds':>10}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'peak GB':>9}{'speed-up':>10}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['layout']:<9}{r['computed']:>10}{1 - real / r['computed']:>9.1%}{r['seconds']:>10.3f}"
              f"{real / r['seconds']:>10.0f}{r['tflops']:>9.2f}{mfu:>7}{r['peak_gb']:>9.1f}"
              f"{base / r['seconds']:>9.2f}x")


def measure(model: torch.nn.Module, tokens: TokenBatch, layout: str, args: argparse.Namespace,
            counter: FlopCounter, device: torch.device) -> dict[str, Any]:
    """Best-of-repeats time of one layout (after one untimed pass) and what it computed."""
    batches = micro_batches(tokens, layout, args.micro_batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_pass(model, batches, layout, device)
    seconds = best_seconds(lambda: train_pass(model, batches, layout, device), args.repeats, device)
    model.zero_grad(set_to_none=True)
    m = counter.metrics(real_lengths(tokens).tolist(), seconds)
    return {"layout": layout, "computed": computed_tokens(batches, layout), "seconds": seconds,
            "tflops": m["train/model_tflops_per_s"], "mfu": m.get("train/mfu"),
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}

if __name__ == "__main__":
    main()
