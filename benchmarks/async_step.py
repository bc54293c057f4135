"""Synchronous vs asynchronous GRPO on the same workload, one run each against one rollout server.

Usage::

    python benchmarks/async_step.py                       # CPU: tiny Qwen2, configs/grpo_tiny_cpu.yaml, 8 steps
    python benchmarks/async_step.py --steps 10 --staleness 1 2 -- rollout.max_tokens=64   # "--" ends --staleness
    python benchmarks/async_step.py --inflight -- rollout.max_tokens=128 rollout.min_tokens=128

Starts a vLLM rollout server (`rollout.server.RolloutServer`, the model at ``model.path``, default a freshly
built tiny Qwen2), then trains ``--steps`` GRPO steps with ``grpo.max_staleness = 0`` (synchronous) and with
each ``--staleness`` k on the remote placement, and prints, as means over the steps after the first:
step time; learner idle (waiting for rollouts: generate + score when synchronous, ``time/wait_rollouts``
when asynchronous); engine idle (step − generate: the engine only works while generating); the producer's
wait for weights; and each run's step time over the synchronous one's and over the model
max(generate + score, train + sync) (the goal: within 10% of it, not of the sum). ``--inflight`` adds, for
each k, a run with ``grpo.inflight_weight_updates`` (row ``k+if``): the same schedule, weights loaded into
the batch being generated; its ``tok_lag`` (mean lag over response tokens) shows what that buys.

On CPU the learner and the server share the machine's cores (two on the CI machine) and slow each other
down, so the overlap buys less than on separate devices. To model separate devices, the server's processes
run on the last usable core (``taskset``; its compute threads bound there by ``VLLM_CPU_OMP_THREADS_BIND``)
and this process on the others (``--no-split``: no binding); other load on the machine still counts. Extra
arguments are config overrides.
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
sys.path.insert(0, str(REPO))


def phase_means(run: Path) -> dict[str, float]:
    """Mean seconds per phase over the steps after the first; the step leaves out evaluation and saving."""
    from trainer.tracking import read_metrics

    steps = [r for r in read_metrics(run) if "time/train" in r][1:]
    if not steps:
        raise SystemExit("need --steps >= 2 (the first step is excluded)")

    def mean(key: str) -> float:
        return statistics.mean(float(r.get(key, 0.0)) for r in steps)

    out = {k: mean(f"time/{k}") for k in ("generate", "score", "train", "old_log_probs", "sync", "wait_rollouts",
                                          "wait_weights", "push_weights")}
    out["step"] = statistics.mean(float(r["time/step"]) - float(r.get("time/eval", 0.0))
                                  - float(r.get("time/save", 0.0)) for r in steps)
    out["lag"] = mean("rollout/policy_lag")
    out["tok_lag"] = mean("rollout/policy_lag_token_mean")
    return out


def row(label: str, m: dict[str, float], sync_step: float) -> str:
    rollouts = m["generate"] + m["score"] + m["push_weights"]  # the engine's side (the push: asynchronous)
    learner = m["train"] + m["old_log_probs"] + m["sync"]  # synchronous: sync includes the push
    learner_idle = m["wait_rollouts"] if label != "0" else rollouts
    bound = max(rollouts, learner)
    return (f"{label:>4} {m['step']:>8.3f} {rollouts:>9.3f} {learner:>9.3f} {learner_idle:>12.3f} "
            f"{m['step'] - m['generate']:>11.3f} {m['wait_weights']:>12.3f} {m['lag']:>4.1f} {m['tok_lag']:>7.2f} "
            f"{m['step'] / sync_step:>9.2f} {m['step'] / bound:>10.2f}")


def pinned_server(argv: list[str], core: str | None, **kwargs: Any) -> Any:
    """A `RolloutServer` whose processes (API server, engine core, worker) all run on `core` (``taskset``)."""
    from rollout.server import RolloutServer

    class Pinned(RolloutServer):
        def command(self) -> list[str]:
            return ["taskset", "-c", core, *super().command()] if core is not None else super().command()

    return Pinned(argv, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "grpo_tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--staleness", type=int, nargs="+", default=[1])
    parser.add_argument("--no-split", action="store_true", help="CPU: do not give each side its own cores")
    parser.add_argument("--inflight", action="store_true", help="also each k with grpo.inflight_weight_updates")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from rollout.auth import TOKEN_ENV
    from rollout.server import free_port
    from trainer.config_io import load_config
    from trainer.learners.grpo import train_grpo
    from trainer.tools.tiny import build_tiny

    out = Path(tempfile.mkdtemp(prefix="async_bench_"))
    os.environ.setdefault(TOKEN_ENV, os.urandom(16).hex())  # the server and the client read the secret here
    model = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("model.path=")), None)
    model = model or str(build_tiny(out / "tiny")["tiny-qwen2"])
    base = load_config(args.config, [f"model.path={model}", *args.overrides])
    argv = ["--model", model, "--port", str(free_port()), "--dtype", base.rollout.dtype or base.model.dtype,
            "--max-model-len", str(base.rollout.max_model_len), "--weights-dir", str(out / "weights")]
    if not torch.cuda.is_available():  # CPU: no compilation, a small KV cache
        argv += ["--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20)]
    else:  # one GPU holds the server and the learner: the server takes the config's share of it
        argv += ["--gpu-memory-utilization", str(base.rollout.gpu_memory_utilization)]
        argv += ["--enforce-eager"] if base.rollout.enforce_eager else []
    env, cores, pin = {}, sorted(os.sched_getaffinity(0)), None
    if not torch.cuda.is_available() and not args.no_split and len(cores) > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = pin = str(cores[-1])  # the server: the last core; we: the rest
        os.sched_setaffinity(0, cores[:-1])
        torch.set_num_threads(len(cores) - 1)
    server = pinned_server(argv, pin, startup_timeout_s=600, log_path=out / "server.log", env=env)
    results = {}
    try:
        server.start()
        runs = [(str(k), k, False) for k in [0, *args.staleness]]
        runs += [(f"{k}+if", k, True) for k in args.staleness if args.inflight]
        for label, k, inflight in runs:
            run = out / f"k{label}"
            cfg = load_config(args.config, [
                f"model.path={model}", f"output_dir={run}", f"grpo.n_grpo_steps={args.steps}", "warmstart.steps=0",
                "eval.every=0", "eval.limit=8", "logging.progress=false", "checkpoint.save_every=0",
                "rollout.placement=remote", f"rollout.server_url={server.url}", "rollout.sleep_between_rollouts=false",
                f"rollout.weight_transfer_dir={out / 'weights'}", f"grpo.max_staleness={k}",
                f"grpo.inflight_weight_updates={str(inflight).lower()}", *args.overrides])
            train_grpo(cfg)
            results[label] = phase_means(run)
    finally:
        server.close()
    print(f"\nGRPO step, synchronous (k=0) vs asynchronous, mean of steps 2..{args.steps} "
          f"({base.grpo.rollout_batch_size} rollouts of <= {base.rollout.max_tokens} tokens; seconds)")
    print("   k     step  rollouts   learner learner_idle engine_idle wait_weights  lag tok_lag  vs_sync  vs_bound")
    for label, m in results.items():
        print(row(label, m, results["0"]["step"]))
    print("rollouts = generate + score (+ the producer's weight push); learner = train + old log-probs + sync;"
          " bound = max(rollouts, learner);\n"
          "lag = the oldest token's (max), tok_lag = mean over response tokens; k+if = in-flight weight updates")


if __name__ == "__main__":
    main()
