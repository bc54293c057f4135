"""Reward scoring throughput on GSM8K-style responses.

    python benchmarks/rewards.py [--n 10000] [--data ../shared/data/gsm8k/test.jsonl]

Builds `n` R1-Zero responses from the GSM8K test golds (the dataset's own solutions as reasoning) in a
fixed mix of kinds — correct, correct but formatted (``$1,080``, ``18 dollars``, ``\\boxed{}``), LaTeX
/ prose (these take the math-verify path), wrong, malformed — and times `r1_zero_reward` in-process and
through `RewardScorer` with 1 and 2 workers. Prints samples/s, latency percentiles, and the share of
samples each grading path decided.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rollout.reward import RewardScorer, r1_zero_answer, r1_zero_reward  # noqa: E402
from rollout.reward.grading import grade_answer, warm_up  # noqa: E402
from trainer.data.tasks import load_gsm8k  # noqa: E402


def _commas(gold: str) -> str:
    return f"{int(gold):,}"


# kind -> (share, make(reasoning, gold, rng) -> response)
KINDS: dict[str, tuple[float, Callable[[str, str, random.Random], str]]] = {
    "correct": (0.35, lambda r, g, _: f"{r} </think> <answer> {g} </answer>"),
    "correct $1,000 / units": (
        0.10,
        lambda r, g, rng: (
            f"{r} </think> <answer> {rng.choice(['$' + _commas(g), g + ' dollars', g + '.'])} </answer>"
        ),
    ),
    "correct \\boxed": (0.10, lambda r, g, _: f"{r} </think> <answer> \\boxed{{{g}}} </answer>"),
    "correct LaTeX / prose": (
        0.10,
        lambda r, g, rng: (
            f"{r} </think> <answer> "
            + rng.choice([f"\\frac{{{2 * int(g)}}}{{2}}", f"x = {g}", f"The answer is {g}.", f"{g} \\cdot 1"])
            + " </answer>"
        ),
    ),
    "wrong": (
        0.25,
        lambda r, g, rng: f"{r} </think> <answer> {int(g) + rng.choice([-10, -1, 1, 2, 100])} </answer>",
    ),
    "malformed": (
        0.10,
        lambda r, g, rng: rng.choice(
            [f"{r} <answer> {g} </answer>", f"{r} </think> <answer> {g}", f"{r} so the answer is {g}", r[:50]]
        ),
    ),
}


def build(n: int, data: Path, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    examples = load_gsm8k(data)
    rng = random.Random(seed)
    names = list(KINDS)
    weights = [KINDS[k][0] for k in names]
    responses, golds, kinds = [], [], []
    for i in range(n):
        ex = examples[i % len(examples)]
        reasoning = ex.solution.rsplit("####", 1)[0].strip()
        kind = rng.choices(names, weights)[0]
        responses.append(KINDS[kind][1](reasoning, ex.answer, rng))
        golds.append(ex.answer)
        kinds.append(kind)
    return responses, golds, kinds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl")
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args()

    responses, golds, kinds = build(args.n, args.data)
    print(f"{args.n} responses from {args.data} (mean {sum(map(len, responses)) / args.n:.0f} chars)\n")

    # In-process first (caches cold, like a fresh worker), after the same sympy warm-up workers do.
    warm_up()
    rows = []
    start = time.perf_counter()
    expected = [r1_zero_reward(r, g) for r, g in zip(responses, golds, strict=True)]
    rows.append(("in-process (no isolation)", args.n / (time.perf_counter() - start), None))

    # Which path decides each sample (in-process; the pool runs the same code).
    paths: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    for response, gold, kind in zip(responses, golds, kinds, strict=True):
        answer = r1_zero_answer(response)
        method = "unformatted" if answer is None else grade_answer(answer, gold).method
        paths[method] += 1
        by_kind[kind][method] += 1
    print(f"{'kind':26} {'share':>6}  paths")
    for kind, counter in by_kind.items():
        total = sum(counter.values())
        detail = ", ".join(f"{m} {c / total:.0%}" for m, c in counter.most_common())
        print(f"{kind:26} {total / args.n:6.1%}  {detail}")
    print(f"{'all':26} {1:6.1%}  " + ", ".join(f"{m} {c / args.n:.1%}" for m, c in paths.most_common()))
    print()

    for workers in (1, 2):
        with RewardScorer("r1_zero", timeout_s=args.timeout, num_workers=workers) as scorer:
            scorer.score(responses[:64], golds[:64])  # workers up and warm
            scorer.metrics()
            start = time.perf_counter()
            out = scorer.score(responses, golds)
            rate = args.n / (time.perf_counter() - start)
            metrics = scorer.metrics()
            assert out == expected, "pool and in-process scores differ"
            rows.append((f"RewardScorer, {workers} worker{'s' * (workers > 1)}", rate, metrics))
            # Pool overhead alone: every response a plain number (fast path only).
            plain = [
                f"{r.split('</think>')[0].split('<answer>')[0]} </think> <answer> {g} </answer>"
                for r, g in zip(responses, golds, strict=True)
            ]
            start = time.perf_counter()
            scorer.score(plain, golds)
            rate = args.n / (time.perf_counter() - start)
            rows.append(("  same, fast-path-only input", rate, scorer.metrics()))

    mean = sum(r.reward for r in expected) / args.n
    fmt = sum(r.format_reward for r in expected) / args.n
    print(f"reward mean {mean:.3f}, format rate {fmt:.3f}\n")
    print(f"{'mode':28} {'samples/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'timeouts':>9} {'errors':>7}")
    for name, rate, m in rows:
        if m is None:
            print(f"{name:28} {rate:10.0f} {'-':>8} {'-':>8} {'-':>9} {'-':>7}")
        else:
            print(
                f"{name:28} {rate:10.0f} {m['reward/latency_p50_ms']:8.3f} {m['reward/latency_p99_ms']:8.2f}"
                f" {m['reward/timeouts']:9.0f} {m['reward/errors']:7.0f}"
            )


if __name__ == "__main__":
    main()
