"""Custom reward functions for the `RewardScorer` tests. They live in this light module (no torch) so that
worker processes, which import a custom function's module, start in about a second."""

from __future__ import annotations

import os
import time

from rollout.reward import RewardResult


def misbehaving_reward(response: str, gold: str) -> RewardResult:
    """Hangs, raises, kills its process or returns garbage depending on `response`."""
    if response == "hang":
        time.sleep(120)
    if response == "raise":
        raise RuntimeError("boom")
    if response == "die":
        os._exit(3)
    if response == "garbage":
        return {"reward": 1.0}  # type: ignore[return-value]
    if response == "nan":
        return RewardResult(format_reward=1.0, answer_reward=1.0, reward=float("nan"))
    if response == "print":
        print("stray output on stdout must not corrupt the protocol")
    return RewardResult(format_reward=1.0, answer_reward=float(response == gold), reward=1.0)


def digit_share_reward(response: str, gold: str) -> RewardResult:
    """A dense reward a random tiny model already earns in varying amounts, so GRPO's advantages are not all
    zero: the share of the response's characters that are digits (answer reward: the gold appears)."""
    share = sum(c.isdigit() for c in response) / max(1, len(response))
    return RewardResult(format_reward=float(share > 0), answer_reward=float(gold in response), reward=share)
