"""Rewards: reward functions (`functions`), the config's choice of them (`custom`: built-in, importable or
weighted), answer grading (`grading`), answer parsers (`parsers`) and the isolated scoring pool (`pool`, on
the fork server in `forkserver`)."""

from rollout.reward.custom import CombinedReward, RewardTerm, reward_fn_from_spec
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
    "CombinedReward",
    "RewardFn",
    "RewardResult",
    "RewardScorer",
    "RewardTerm",
    "get_reward_fn",
    "question_only_reward",
    "r1_zero_answer",
    "r1_zero_reward",
    "reward_fn_from_spec",
]
