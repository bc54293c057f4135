"""DAPO's two treatments of responses cut off at the length limit (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale", arXiv 2503.14476, §3.4). Both are off by default.

Overlong reward shaping (``grpo.overlong_buffer`` = L_cache > 0, DAPO eq. 13). With L_max =
``rollout.max_tokens`` and |y| the response's token count::

    R_length(y) = 0                              |y| ≤ L_max − L_cache
                = ((L_max − L_cache) − |y|) / L_cache     L_max − L_cache < |y| ≤ L_max
                = −1                             |y| > L_max   (generation stops at L_max: never reached)

times ``grpo.overlong_penalty`` (1 in DAPO), added to each response's task reward before the group
normalisation (and before DAPO dynamic sampling's zero-std test): advantages, ``reward/reward_*`` and the
rollout table see the shaped reward; ``reward/answer_reward_rate`` and ``reward/format_reward_rate`` stay the
task's, and ``reward/overlong_penalty_mean`` is the mean R_length · factor.

Overlong filtering (``grpo.mask_truncated``): a response that hit the limit (finish reason ``length``) keeps
its reward in its group's mean and std, but none of its tokens enters the loss (its row of the response mask is
emptied), so a truncated answer is neither reinforced nor punished for being cut off. Under
``length_normalization: token`` (DAPO's) the loss is then exactly that of the batch without those rows; under
``sequence_mean`` and ``constant`` a masked row still counts in the mean over rows (as a 0), so the loss is
that batch's × kept/total rows (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from rollout.engines.protocol import Sample
from rollout.reward import RewardResult
from trainer.data.batching import TokenBatch


def overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO eq. 13 (module docstring) times `factor`: 0 up to ``max_tokens − buffer`` tokens, then falling
    linearly to ``−factor`` at ``max_tokens``.

    >>> [overlong_penalty(n, 10, 4) for n in (3, 6, 7, 8, 10, 11)]
    [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    """
    if not 0 < buffer < max_tokens:
        raise ValueError(f"the overlong buffer must be in 1..{max_tokens - 1} (max_tokens={max_tokens}), got {buffer}")
    start = max_tokens - buffer
    if length <= start:
        return 0.0
    return -factor * min(length - start, buffer) / buffer


def shape_overlong(samples: Sequence[Sample], scores: Sequence[RewardResult], max_tokens: int, buffer: int,
                   factor: float) -> list[RewardResult]:
    """Each score with its response's `overlong_penalty` added to ``reward`` (format and answer rewards
    unchanged); the penalty is also kept in the sample's ``extra["overlong_penalty"]`` (for the metric)."""
    shaped = []
    for sample, score in zip(samples, scores, strict=True):
        penalty = overlong_penalty(len(sample.response_ids), max_tokens, buffer, factor)
        sample.extra["overlong_penalty"] = penalty
        shaped.append(replace(score, reward=score.reward + penalty))
    return shaped


def mask_truncated(tokens: TokenBatch, samples: Sequence[Sample]) -> int:
    """Empty, in place, the response mask of every row whose sample stopped at the length limit; returns how
    many rows that was. Rows are `samples` in order."""
    truncated = [i for i, sample in enumerate(samples) if sample.finish_reason == "length"]
    tokens.response_mask[truncated] = False
    return len(truncated)
