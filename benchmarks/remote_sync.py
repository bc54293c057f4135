"""Weight sync into a rollout server: the filesystem transfer against the gloo broadcast, same server, same weights.

Starts one vLLM rollout server (`rollout.server.RolloutServer` with ``--weights-dir`` and ``--weight-transfer
gloo``) and pushes the same learner weights through each transport, ``--repeats`` times after one warm-up push
(`RemoteEngine.update_weights`: pause, transfer, reload, prefix-cache reset, resume). Filesystem: safetensors
shards written to the directory both sides see, then the server's ``reload_weights`` from it; gloo: every tensor
broadcast over TCP into the server's worker as it loads (`rollout.transfer`), nothing on disk. After each
transport's pushes the stale-weight probe checks that the server serves the learner's weights.

Prints per transport the bytes moved, the best and median sync seconds, GB/s at the median, and the median over
the filesystem's.

Usage: ``python benchmarks/remote_sync.py [--model PATH] [--repeats 5] [--dtype float32]``; default model: a
fresh tiny Qwen2. A real size: ``reasonrl models smollm2 DIR``, then ``--model DIR``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the packages, ahead of this folder's rollout.py

TRANSPORTS = ("filesystem", "gloo")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF checkpoint directory (default: a fresh tiny Qwen2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="the learner's and the server's weights")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def _learner(path: str, dtype: str) -> Any:
    """The checkpoint at `path`, nudged so that every push changes what the server serves."""
    import torch

    from trainer.config import ModelConfig
    from trainer.learner import load_model

    model = load_model(ModelConfig(path=path, dtype=dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    return model


def measure(engine: Any, learner: Any, probe: Any, repeats: int) -> dict[str, Any]:
    """Sync seconds of `repeats` pushes after one warm-up (gloo: its rendezvous), the bytes moved, the probe."""
    from rollout.weights import WeightStream

    seconds = []
    for i in range(repeats + 1):
        engine.update_weights(WeightStream(learner))
        if i:
            seconds.append(engine.metrics["rollout/sync_s"])
    return {"seconds": seconds, "gb": engine.metrics["rollout/sync_gb"], "probe": probe(engine, learner)}


def table(results: dict[str, dict[str, Any]]) -> str:
    base = statistics.median(results["filesystem"]["seconds"])
    lines = [f"{'transport':<11} {'MB':>8} {'best_s':>8} {'median_s':>9} {'GB/s':>6} {'vs_fs':>6} {'probe':>10}"]
    for name, r in results.items():
        median = statistics.median(r["seconds"])
        lines.append(f"{name:<11} {r['gb'] * 1e3:>8.1f} {min(r['seconds']):>8.3f} {median:>9.3f} "
                     f"{r['gb'] / median:>6.2f} {median / base:>6.2f} {r['probe'].max_abs_diff:>10.1e}")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    import torch
    from transformers import AutoTokenizer

    from rollout.auth import TOKEN_ENV
    from rollout.engines.remote import RemoteEngine
    from rollout.server import RolloutServer, free_port
    from trainer.sync import StaleWeightProbe
    from trainer.tools.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="remote_sync_"))
    os.environ.setdefault(TOKEN_ENV, os.urandom(16).hex())  # the server and the clients read the secret here
    model = args.model or str(build_tiny(work / "tiny")["tiny-qwen2"])
    learner = _learner(model, args.dtype)
    probe = StaleWeightProbe(tokenizer=AutoTokenizer.from_pretrained(model), on_mismatch="warn")
    argv = ["--model", model, "--port", str(free_port()), "--dtype", args.dtype, "--max-model-len", "512",
            "--weights-dir", str(work / "weights"), "--weight-transfer", "gloo"]  # fmt: skip
    argv += [] if torch.cuda.is_available() else ["--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20)]
    results: dict[str, dict[str, Any]] = {}
    with RolloutServer(argv, startup_timeout_s=600, log_path=work / "server.log") as server:
        for name in TRANSPORTS:
            options: dict[str, Any] = (
                {"weights_dir": work / "weights"} if name == "filesystem" else {"weight_transfer": "gloo"}
            )
            engine = RemoteEngine(server.url, timeout_s=600, **options)
            try:
                results[name] = measure(engine, learner, probe, args.repeats)
            finally:
                engine.close()
    print(f"\nWeight sync into a rollout server ({model}, {args.dtype}; {args.repeats} pushes after one warm-up)")
    print(table(results))
    print("MB = bytes moved per push (1e6); vs_fs = median over the filesystem transfer's; probe = the largest "
          "|log-prob| difference, server vs learner, after the last push")


if __name__ == "__main__":
    main()
