"""Held-out evaluation shared by every mode and by `reasonrl eval`.

Generates ``eval.samples_per_question`` samples (n, default 1) per question with the eval sampling params
(CS336: temperature 1.0, top_p 1.0, max 1024 tokens, stop ``</answer>``), grades with the reward module, and
reports accuracy (answer reward, the mean over every sample: avg@n), format rate, mean response length
overall / for correct / for incorrect answers and, when a policy model is given (``eval.token_entropy``, on by
default), mean token entropy of the responses under it. With n > 1 also pass@k for k = 1, 2, 4, ... up to n:
the probability that at least one of k samples drawn from a question's n is correct, averaged over questions,
with the unbiased estimator 1 - C(n-c, k) / C(n, k) for c correct of n (Chen et al. 2021, "Evaluating Large
Language Models Trained on Code", eq. 1). Per-sample JSONL (question index, sample index, prompt, response,
gold, rewards, length, entropy or null) is written to `out_path`. A log line at the start and one at the end
(with the phase times) report progress, terminal or not.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rollout.engines.protocol import RolloutEngine, SamplingConfig
from rollout.reward.pool import RewardScorer
from trainer.checkpoint import write_failure
from trainer.config import SamplingSection
from trainer.data.batching import pack_token_ids
from trainer.data.prompts import format_prompt
from trainer.data.tasks import Example
from trainer.logprobs import forward_log_probs

logger = logging.getLogger("reasonrl")
ENTROPY_BATCH = 8  # responses per entropy forward pass

def sampling_config(cfg: SamplingSection, seed: int, n: int = 1) -> SamplingConfig:
    """The sampling parameters of an ``eval`` or ``rollout`` config section, `n` samples per prompt."""
    return SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                          min_tokens=cfg.min_tokens, stop=tuple(cfg.stop), n=n, seed=seed)


@torch.inference_mode()
def response_entropy(model: torch.nn.Module, samples: Sequence[Any], pad_id: int, batch_size: int = ENTROPY_BATCH,
                     passes: int = 0) -> list[float]:
    """Mean per-token entropy of each sample's response under `model`, `batch_size` samples per forward pass.

    With `passes`, at least that many passes run: a stand-in (this rank's first batch again, or one pad token
    where it has none) makes up the rest and its result is dropped. Under DeepSpeed ZeRO-3 every forward
    gathers the parameters from all ranks, so every rank must run as many (`entropy_passes`)."""
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    stand_in = batches[0] if batches else [SimpleNamespace(prompt_ids=[pad_id], response_ids=[pad_id])]
    out: list[float] = []
    for i in range(max(len(batches), passes)):
        entropies = _batch_entropy(model, batches[i] if i < len(batches) else stand_in, pad_id)
        if i < len(batches):
            out += entropies
    return out


def _batch_entropy(model: torch.nn.Module, chunk: Sequence[Any], pad_id: int) -> list[float]:
    device = next(model.parameters()).device
    batch = pack_token_ids([s.prompt_ids for s in chunk], [s.response_ids for s in chunk], pad_id).to(device)
    ent = forward_log_probs(model, batch, return_token_entropy=True, response_only=True)["token_entropy"]  # (b, s)
    mask = batch.response_mask.float()  # (b, s)
    entropies: list[float] = ((ent * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    return entropies


def entropy_passes(n_questions: int, world: int, shared_engine: bool, batch_size: int = ENTROPY_BATCH,
                   samples_per_question: int = 1) -> int:
    """The most entropy passes any rank runs over the samples of its `eval_share` (the same number on every rank).

    >>> entropy_passes(17, 2, False), entropy_passes(17, 2, True), entropy_passes(0, 2, False)
    (2, 3, 0)
    >>> entropy_passes(17, 2, False, samples_per_question=4)  # 9 questions x 4 samples on rank 0
    5
    """
    largest = max(len(eval_share(n_questions, world, r, shared_engine)) for r in range(world))
    return math.ceil(largest * samples_per_question / batch_size)


def sample_records(engine: RolloutEngine, examples: Sequence[Example], template: str, sampling: SamplingConfig,
                   scorer: RewardScorer, policy: torch.nn.Module | None = None,
                   pad_id: int = 0, passes: int = 0) -> tuple[list[dict[str, Any]], list[float]]:
    """Generate, grade and (with a `policy`) score the entropy of ``sampling.n`` samples per question: the
    per-sample records (question by question), and the seconds of those three phases. A data-parallel rank
    passes its share of the questions, with ``sampling.first_index`` at the share's start (and, under ZeRO-3,
    every rank's `entropy_passes` as `passes`)."""
    n = sampling.n
    prompts = [format_prompt(template, question=ex.question) for ex in examples]
    logger.info("evaluation: %d questions%s (generate, score%s) ...", len(prompts), f" x {n} samples" * (n > 1),
                ", entropy" * (policy is not None))
    times = [time.perf_counter()]
    samples = engine.generate(prompts, sampling)
    times.append(time.perf_counter())
    prompts, examples = [p for p in prompts for _ in range(n)], [ex for ex in examples for _ in range(n)]
    scores = scorer.score([s.text for s in samples], [ex.answer for ex in examples], tally=False)
    times.append(time.perf_counter())
    entropies: list[float | None] = [None] * len(samples)
    if policy is not None:
        entropies = list(response_entropy(policy, samples, pad_id, passes=passes))
    times.append(time.perf_counter())
    records = [
        {"question": sampling.first_index + i // n, "sample": i % n, "prompt": p, "response": s.text, "gold": ex.answer,
         **sc.as_dict(), "length": len(s.response_ids), "entropy": h, "finish_reason": s.finish_reason}
        for i, (p, s, ex, sc, h) in enumerate(zip(prompts, samples, examples, scores, entropies, strict=True))
    ]
    return records, [b - a for a, b in pairwise(times)]


def report(records: Sequence[dict[str, Any]], out_path: str | Path | None, seconds: Sequence[float]) -> dict[str, float]:
    """Write the records to `out_path` (if given), log the result line; the ``eval/…`` metrics."""
    if out_path is not None:
        write_samples(Path(out_path), records)
    metrics = summarize(records)
    logger.info("evaluation: accuracy %.3f, format rate %.3f (generate %.1f s, score %.1f s, entropy %.1f s)",
                metrics["eval/accuracy"], metrics["eval/format_rate"], *seconds)
    return metrics


def eval_share(n_questions: int, world: int, rank: int, shared_engine: bool) -> range:
    """The questions rank `rank` of `world` evaluates: a contiguous share, the first ``n mod world`` ranks one
    more (so the shares, gathered rank by rank, are the questions in order); all on rank 0 where the ranks
    share one engine (a remote server: it samples them all at once anyway).

    >>> [eval_share(7, 2, r, False) for r in range(2)], eval_share(7, 2, 1, True)
    ([range(0, 4), range(4, 7)], range(0, 0))
    """
    if shared_engine or world == 1:
        return range(n_questions) if rank == 0 else range(0)
    base, extra = divmod(n_questions, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def write_samples(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """One JSON line per sample; a failed write (full disk, read-only directory) is a `StorageError` naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    except OSError as err:
        raise write_failure(err, "evaluation samples", path) from None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    correct = [r for r in records if r["answer_reward"] > 0]
    wrong = [r for r in records if r["answer_reward"] <= 0]
    return pass_at_ks(records) | {
        "eval/accuracy": mean([r["answer_reward"] for r in records]),
        "eval/reward": mean([r["reward"] for r in records]),
        "eval/format_rate": mean([r["format_reward"] for r in records]),
        "eval/mean_length": mean([r["length"] for r in records]),
        "eval/mean_length_correct": mean([r["length"] for r in correct]),
        "eval/mean_length_incorrect": mean([r["length"] for r in wrong]),
        "eval/n": float(len({r["question"] for r in records})),
    } | token_entropy(records)


def token_entropy(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``eval/token_entropy``, the mean of the records' response entropies; nothing where they were not
    scored (``eval.token_entropy: false``: their entropy is None)."""
    if any(r["entropy"] is None for r in records):
        return {}
    return {"eval/token_entropy": sum(r["entropy"] for r in records) / len(records) if records else float("nan")}


def pass_at_ks(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``eval/pass@k`` for k = 1, 2, 4, ... up to n (and n itself) when each question has n > 1 samples: the
    mean over questions of `pass_at_k` (module docstring). Nothing with one sample per question."""
    correct: dict[int, list[bool]] = {}
    for r in records:
        correct.setdefault(r["question"], []).append(r["answer_reward"] > 0)
    n = len(next(iter(correct.values()), []))
    if n < 2:
        return {}
    if any(len(c) != n for c in correct.values()):
        raise ValueError(f"pass@k needs the same number of samples per question: {n} and "
                         f"{sorted({len(c) for c in correct.values()})}")
    ks = sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})
    return {f"eval/pass@{k}": sum(pass_at_k(n, sum(c), k) for c in correct.values()) / len(correct) for k in ks}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that k of n samples, c of them correct, drawn without replacement include a correct one:
    1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021, eq. 1).

    >>> pass_at_k(4, 0, 2), pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 3, 2)
    (0.0, 0.25, 0.5, 1.0)
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
