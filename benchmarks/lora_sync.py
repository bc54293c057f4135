"""LoRA weight sync into vLLM: merged weights (`trainer.lora.MergedWeightStream`) vs vLLM's LoRA serving.

Per policy version, (a) merged: stream W + (alpha / r) B A under the base names into a plain engine
(`VLLMEngine.update_weights`), then generate; (b) adapter: write the adapter (`save_adapter`) and generate with
a new ``LoRARequest`` (vLLM loads it on first use) on an engine started with ``enable_lora``. Reports the sync
seconds, the generation seconds of the same batch, and whether (b) starts at all on this platform.

Usage: ``python benchmarks/lora_sync.py [--versions 3] [--rank 8] [--batch 32] [--tokens 64]`` (tiny Qwen2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the packages, ahead of this folder's rollout.py


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    return parser.parse_args()


def _policy(base: str, rank: int) -> Any:
    import torch

    from trainer.config import LoraConfig, ModelConfig
    from trainer.learner import load_model
    from trainer.lora import apply_lora

    model = apply_lora(load_model(ModelConfig(path=base, dtype="float32")), LoraConfig(r=rank, alpha=2 * rank))
    with torch.no_grad():  # a nonzero adapter, as after training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def _perturb(model: Any) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 1e-3)


def measure(base: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from rollout.engines.protocol import SamplingConfig
    from rollout.engines.vllm import VLLMEngine
    from trainer.lora import MergedWeightStream, save_adapter

    model = _policy(base, args.rank)
    params = SamplingConfig(max_tokens=args.tokens, temperature=1.0, min_tokens=args.tokens, stop=(), n=1, seed=0)
    prompts = [list(range(5, 40))] * args.batch
    out: dict[str, Any] = {"rank": args.rank, "batch": args.batch, "tokens": args.tokens}
    engine = VLLMEngine(base, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    sync, gen = [], []
    for _ in range(args.versions):
        _perturb(model)
        start = time.perf_counter()
        engine.update_weights(MergedWeightStream(model))
        sync.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.generate(prompts, params)
        gen.append(time.perf_counter() - start)
    engine.close()
    out["merged"] = {"sync_s": sync, "generate_s": gen}
    try:
        from vllm.lora.request import LoRARequest

        engine = VLLMEngine(base, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                            enable_lora=True, max_lora_rank=args.rank, max_loras=1)
    except Exception as err:  # the platform may not serve LoRA at all
        out["adapter"] = {"error": f"{type(err).__name__}: {err}"[:500]}
        return out
    sync, gen = [], []
    sampling = engine._sampling_params(params, 0)
    for version in range(1, args.versions + 1):
        _perturb(model)
        start = time.perf_counter()
        save_adapter(model, work / f"v{version}")
        sync.append(time.perf_counter() - start)
        request = LoRARequest(f"v{version}", version, str(work / f"v{version}"))
        start = time.perf_counter()
        engine.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, lora_request=request,
                            use_tqdm=False)
        gen.append(time.perf_counter() - start)  # includes loading the adapter
    engine.close()
    out["adapter"] = {"sync_s": sync, "generate_s": gen}
    return out


def main() -> None:
    args = _args()
    from trainer.tools.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        base = str(build_tiny(Path(tmp) / "tiny", seed=0)["tiny-qwen2"])
        print(json.dumps(measure(base, args, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
