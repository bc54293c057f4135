"""A table of a few training rollouts, every ``logging.rollout_table_every`` steps.

What the learner trained on, row by row: the prompt the engine saw (decoded from its token ids, special
tokens included), the completion, the reward and its parts (format, answer), the group-normalised advantage
and the policy version that sampled it. The first ``logging.rollout_table_rows`` rows of the main process's
batch are taken, so with ``rows`` a multiple of ``grpo.group_size`` the table holds whole groups and each
advantage can be checked against its group's rewards. The tracker writes them to
``RUN_DIR/rollouts/step_N.jsonl`` and, with wandb on, logs a ``rollout/samples`` table on the train_step axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rollout.engines.protocol import Sample

if TYPE_CHECKING:
    from trainer.session import Session

COLUMNS = ("prompt", "completion", "reward", "format_reward", "answer_reward", "advantage", "policy_version",
           "length", "finish_reason")


def rollout_rows(samples: Sequence[Sample], rewards: torch.Tensor, advantages: torch.Tensor,
                 decode: Callable[[list[int]], str], n: int) -> list[dict[str, Any]]:
    """The first `n` rollouts as table rows (keys: `COLUMNS`); rewards, advantages: (N,) row-aligned with
    `samples`. The reward parts come from ``Sample.extra`` (set where the samples are scored); None when a
    sample carries none."""
    rows = []
    for x, reward, advantage in zip(samples[:n], rewards[:n].tolist(), advantages[:n].tolist(), strict=True):
        rows.append({
            "prompt": decode(x.prompt_ids), "completion": x.text, "reward": float(reward),
            "format_reward": x.extra.get("format_reward"), "answer_reward": x.extra.get("answer_reward"),
            "advantage": float(advantage), "policy_version": x.policy_version, "length": len(x.response_ids),
            "finish_reason": x.finish_reason,
        })
    return rows


def log_rollout_table(s: Session, step: int, samples: Sequence[Sample], rewards: torch.Tensor,
                      advantages: torch.Tensor) -> None:
    """Log the table at every ``logging.rollout_table_every``-th step (0: never), on the main process only."""
    log = s.cfg.logging
    if not log.rollout_table_every or step % log.rollout_table_every or not s.is_main:
        return
    tokenizer = s.learner.tokenizer

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=False))

    s.tracker.log_rollouts(rollout_rows(samples, rewards, advantages, decode, log.rollout_table_rows), step)
