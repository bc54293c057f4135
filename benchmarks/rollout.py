"""Rollout benchmark: our vLLM engine against raw ``vllm.LLM.generate`` and the HF engine, and weight sync.

Usage::

    python benchmarks/rollout.py --model PATH            # GPU defaults: 256 sequences, 150-token prompts, 256 new
    python benchmarks/rollout.py --small                 # CPU preset: tiny Qwen2 built locally, 128 × 64 → 128

All engines see the same batch: ``num_seqs / group_size`` random-token prompts, ``group_size`` samples each,
temperature 1, every sample exactly ``max_new_tokens`` long (``min_tokens = max_tokens``, no stop strings), so
tokens/s compare like for like. Raw vLLM runs on the same ``LLM`` instance with the same per-request
``SamplingParams`` (``logprobs=0`` included, since the engine must return them; a row without log-probs is
shown too); the prefix cache is reset before every timed run. Goal: our engine ≥ 90% of raw.

Weight sync: ``VLLMEngine.update_weights(WeightStream(model))`` (streamed, bucketed, + prefix-cache reset)
against a plain ``reload_weights`` of the full state dict in one call, and on a GPU against the model's own
``load_weights`` called directly (no layerwise reload: what a faster sync could use where vLLM does not repack
layers; the CPU backend repacks them, so that row is GPU only), with the largest prompt log-prob difference it
leaves against ``reload_weights`` of the same weights. Numbers are the best of the repeats, as
wall time and as this process's CPU time (vLLM runs in-process; on a shared CPU machine CPU time is the
steadier measure).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", help="checkpoint path (required unless --small)")
    p.add_argument(
        "--small", action="store_true", help="CPU preset: tiny Qwen2, 128 seqs, 64-token prompts, 128 new"
    )
    p.add_argument("--num-seqs", type=int, default=None)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="fixed KV cache (default on CPU: 1 GB)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--sync-bucket-mb", type=float, default=256)
    args = p.parse_args(argv)
    defaults = (128, 64, 128) if args.small else (256, 150, 256)
    args.num_seqs = args.num_seqs or defaults[0]
    args.prompt_len = args.prompt_len or defaults[1]
    args.max_new_tokens = args.max_new_tokens or defaults[2]
    if args.num_seqs % args.group_size:
        p.error(f"--num-seqs {args.num_seqs} must be a multiple of --group-size {args.group_size}")
    if not args.small and not args.model:
        p.error("--model PATH is required without --small")
    return args


def timed(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> Timing:
    """Best-of-`repeats` wall and process-CPU seconds (`before` runs untimed ahead of each repeat)."""
    walls, cpus = [], []
    for _ in range(repeats):
        if before is not None:
            before()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return Timing(min(walls), min(cpus))


@dataclass
class Timing:
    """Seconds of one contender: best wall time, best process CPU time (robust on a shared CPU machine)."""

    wall: float
    cpu: float

    def merge(self, other: Timing) -> Timing:
        return Timing(min(self.wall, other.wall), min(self.cpu, other.cpu))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.engines.hf import HFEngine
    from rollout.engines.protocol import SamplingConfig, sample_seed
    from rollout.engines.vllm import VLLMEngine, import_vllm
    from rollout.weights import WeightStream

    on_gpu = torch.cuda.is_available()
    model_path = args.model
    scratch = None
    if args.small and model_path is None:
        from trainer.tools.tiny import build_tiny

        scratch = tempfile.TemporaryDirectory(prefix="reasonrl-bench-")
        model_path = str(build_tiny(scratch.name)["tiny-qwen2"])
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    kv_bytes = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else (None if on_gpu else 1 << 30)

    start = time.perf_counter()
    engine = VLLMEngine(
        model_path, dtype=dtype, gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory_bytes=kv_bytes,
        max_model_len=args.prompt_len + args.max_new_tokens + 8, enforce_eager=args.enforce_eager,
        sync_bucket_mb=args.sync_bucket_mb, enable_sleep_mode=False,
    )  # fmt: skip
    startup = time.perf_counter() - start
    llm, sampling_params_cls = engine.llm, import_vllm().SamplingParams
    vocab = len(engine.tokenizer)
    n_prompts = args.num_seqs // args.group_size
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(2, min(vocab, 32000), (args.prompt_len,), generator=gen).tolist()
        for _ in range(n_prompts)
    ]
    params = SamplingConfig(
        temperature=1.0, max_tokens=args.max_new_tokens, min_tokens=args.max_new_tokens, stop=(), n=args.group_size,
        seed=0,
    )  # fmt: skip
    out_tokens = args.num_seqs * args.max_new_tokens

    def raw(logprobs: int | None) -> Callable[[], object]:
        sps = [
            sampling_params_cls(
                n=args.group_size,
                temperature=1.0,
                max_tokens=args.max_new_tokens,
                min_tokens=args.max_new_tokens,
                seed=sample_seed(0, i, args.group_size, 0),
                logprobs=logprobs,
            )
            for i in range(n_prompts)
        ]
        inputs = [{"prompt_token_ids": p} for p in prompts]
        return lambda: llm.generate(inputs, sps, use_tqdm=False)

    reset = engine.llm.reset_prefix_cache
    ours = lambda: engine.generate(prompts, params)  # noqa: E731
    for fn in (ours, raw(0)):  # warm-up (compilation, allocator)
        reset()
        fn()
    contenders = {
        "raw vllm.LLM.generate (logprobs=0)": raw(0),
        "VLLMEngine.generate": ours,
        "raw vllm.LLM.generate (no logprobs)": raw(None),
    }
    names = list(contenders)
    times = {name: Timing(float("inf"), float("inf")) for name in names}
    for r in range(args.repeats):  # rotate the order each round so drifting load hits all alike
        for name in names[r % 3 :] + names[: r % 3]:
            times[name] = times[name].merge(timed(contenders[name], 1, reset))
    rows = [(name, times[name]) for name in names]
    # what the engine adds to raw generate, timed alone (immune to the machine's load swings)
    raw_outputs = raw(0)()
    overhead = timed(
        lambda: (
            [
                engine._sampling_params(params, sample_seed(0, i, args.group_size, 0))
                for i in range(n_prompts)
            ],
            engine.to_samples(raw_outputs),
        ),
        max(3, args.repeats),
    )
    if not args.skip_hf:
        hf = HFEngine(model_path, dtype=getattr(torch, dtype), batch_size=args.num_seqs)
        hf.generate(prompts[:1], SamplingConfig(max_tokens=4, min_tokens=4, stop=(), n=1, seed=0))
        rows.append(
            ("HFEngine.generate", timed(lambda: hf.generate(prompts, params), max(1, args.repeats // 3)))
        )
        del hf

    # weight sync: learner module → engine
    learner = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    if on_gpu:
        learner = learner.cuda()
    nbytes = sum(t.numel() * t.element_size() for t in learner.state_dict().values())

    def plain_reload() -> None:
        llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": iter(learner.state_dict().items()), "is_checkpoint_format": True},
        )

    plain_reload()
    t_plain = timed(plain_reload, args.repeats)
    t_sync = timed(lambda: engine.update_weights(WeightStream(learner, args.sync_bucket_mb)), args.repeats)
    syncs = [("plain reload_weights(full state dict)", t_plain), ("VLLMEngine.update_weights", t_sync)]
    direct_note = ""
    if on_gpu:
        t_direct, diff = direct_load_weights(engine, learner, prompts[0], args.repeats)
        syncs.append(("model.load_weights (direct)", t_direct))
        direct_note = f"; after the direct load, prompt log-probs differ from reload_weights' by at most {diff:.1e}"
    engine.close()

    raw_t = rows[0][1]
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\nmodel {model_path} ({dtype}) on {device}; vLLM start-up {startup:.1f}s")
    print(f"batch: {n_prompts} prompts × {args.group_size} samples = {args.num_seqs} sequences, "
          f"{args.prompt_len}-token prompts, {args.max_new_tokens} new tokens each; best of {args.repeats}\n")  # fmt: skip
    header = f"| {'generation':38s} | {'wall s':>7s} | {'output tok/s':>12s} | {'vs raw (wall)':>13s} | {'CPU s':>7s} | {'vs raw (CPU)':>12s} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, t in rows:
        print(
            f"| {name:38s} | {t.wall:7.3f} | {out_tokens / t.wall:12.0f} | {raw_t.wall / t.wall:13.1%} "
            f"| {t.cpu:7.3f} | {raw_t.cpu / t.cpu:12.1%} |"
        )
    print(
        f"\nengine overhead (SamplingParams + RequestOutput → Sample conversion), timed alone: "
        f"{overhead.wall * 1e3:.1f} ms = {overhead.wall / raw_t.wall:.2%} of raw generate "
        f"→ overhead-bound throughput {raw_t.wall / (raw_t.wall + overhead.wall):.1%} of raw"
    )
    header = f"| {'weight sync':38s} | {'wall s':>7s} | {'GB/s':>12s} | {'vs plain':>13s} | {'CPU s':>7s} | {'vs plain (CPU)':>12s} |"
    print("\n" + header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, t in syncs:
        print(
            f"| {name:38s} | {t.wall:7.3f} | {nbytes / 1e9 / t.wall:12.3f} | {t_plain.wall / t.wall:13.1%} "
            f"| {t.cpu:7.3f} | {t_plain.cpu / t.cpu:14.1%} |"
        )
    print(f"\n({nbytes / 1e9:.3f} GB of weights; update_weights includes the prefix-cache reset{direct_note})")
    if scratch is not None:
        scratch.cleanup()


def direct_load_weights(engine: Any, learner: Any, ids: list[int], repeats: int) -> tuple[Timing, float]:
    """Time the model's ``load_weights`` called in the worker (no layerwise reload) with the learner's state dict,
    and the largest |difference| of `ids`' prompt log-probs it leaves against ``reload_weights`` of the same
    weights (GPU only: on CPU, vLLM repacks linear layers, whose parameters plain ``load_weights`` cannot fill).
    The engine holds the learner's weights already (the ``update_weights`` row loaded them)."""
    llm = engine.llm

    def load() -> None:
        llm.collective_rpc(lambda worker: worker.get_model().load_weights(iter(learner.state_dict().items())))

    reference = engine.prompt_logprobs([ids])[0]
    load()
    timing = timed(load, repeats)
    llm.reset_prefix_cache()
    after = engine.prompt_logprobs([ids])[0]
    return timing, max(abs(a - b) for a, b in zip(after, reference, strict=True))


if __name__ == "__main__":
    main()
