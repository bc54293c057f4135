"""Rewards: reward functions (`functions`), answer grading (`grading`), answer parsers (`parsers`) and the
isolated scoring pool (`pool`, on the fork server in `forkserver`)."""

from rollout.reward.functions import (
    REWARD_FNS,
    RewardFn,
    RewardResult,
    get_reward_fn,
    question_only_reward,
    r1_zero_answer,
    r1_zero_reward,
)
from rollout.reward.pool import RewardScorer

__all__ = [
    "REWARD_FNS",
    "RewardFn",
    "RewardResult",
    "RewardScorer",
    "get_reward_fn",
    "question_only_reward",
    "r1_zero_answer",
    "r1_zero_reward",
]
