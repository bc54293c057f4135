"""Stale-weight probe: after every weight sync, check that the engine really samples from the learner.

A fixed probe sequence is scored twice: by the learner (HF forward, `score_sequences`) and by the engine
(`RolloutEngine.prompt_logprobs`, in vLLM ``SamplingParams(prompt_logprobs=0, max_tokens=1)``). The token
log-prob differences are summarised as mean and max absolute difference; above the threshold the probe
raises `StaleWeightsError` (or only warns, ``on_mismatch="warn"``).

What it catches: a sync that did not happen or went to the wrong place, missing or misnamed tensors (a tied
``lm_head`` left behind), garbage after a level-2 sleep, a wrong dtype cast, a reload from an old directory.

Thresholds (`default_thresholds`): float32 engines agree with HF to ~1e-6 on the tiny model, so the
default is max 1e-3 there, tight enough to see a single small optimizer step. In bfloat16 the two sides run
different kernels (fused RMSNorm, flash attention, different reduction orders) and differ by ~1e-2 per
token on average, with single tokens off by a few tenths on 1B-scale models; the defaults are
max 1.0 / mean 0.05 there (float16: 0.5 / 0.02). Those still catch wrong or stale weights (mean differences
of whole nats) but not one small step; use a float32 probe run to check a bf16 pipeline finely.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rollout.engine import RolloutEngine
from rollout.hf_engine import score_sequences

logger = logging.getLogger(__name__)

PROBE_TEXT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it.\n"
    "User: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\n"
    "Assistant: <think> In May she sold 48 / 2 = 24 clips. Altogether 48 + 24 = 72. </think> "
    "<answer> 72 </answer>"
)


class StaleWeightsError(RuntimeError):
    """The engine's log-probs disagree with the learner's: the engine is not sampling from the learner."""


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe: absolute log-prob differences over all probe tokens."""

    mean_abs_diff: float
    max_abs_diff: float
    num_tokens: int
    max_threshold: float
    mean_threshold: float
    policy_version: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.max_threshold and self.mean_abs_diff <= self.mean_threshold

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/probe_mean_abs_diff": self.mean_abs_diff,
            "rollout/probe_max_abs_diff": self.max_abs_diff,
            "rollout/probe_ok": float(self.ok),
        }


def default_thresholds(dtype: torch.dtype) -> tuple[float, float]:
    """(max, mean) abs log-prob difference allowed for an engine running in `dtype`; see the module doc."""
    if dtype == torch.bfloat16:
        return 1.0, 0.05
    if dtype == torch.float16:
        return 0.5, 0.02
    return 1e-3, 1e-3


def probe_token_ids(tokenizer: Any, text: str = PROBE_TEXT) -> list[int]:
    """The fixed probe sequence as token ids (no special tokens added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def compare_logprobs(
    learner: Sequence[Sequence[float]], engine: Sequence[Sequence[float]]
) -> tuple[float, float, int]:
    """(mean, max, count) of |learner - engine| over all tokens; NaN/inf on either side counts as inf."""
    diffs: list[float] = []
    for a, b in zip(learner, engine, strict=True):
        if len(a) != len(b):
            raise ValueError(f"probe: learner scored {len(a)} tokens, engine {len(b)}")
        diffs.extend(
            abs(x - y) if math.isfinite(x) and math.isfinite(y) else math.inf
            for x, y in zip(a, b, strict=True)
        )
    if not diffs:
        raise ValueError("probe: no tokens to compare (probe sequences need >= 2 tokens)")
    return sum(diffs) / len(diffs), max(diffs), len(diffs)


class StaleWeightProbe:
    """Scores fixed sequences with the learner and the engine after each sync and compares.

    Args:
        token_ids: probe sequences (default: `PROBE_TEXT` via `tokenizer`).
        tokenizer: used only for the default probe.
        max_threshold / mean_threshold: None = `default_thresholds(dtype)`.
        dtype: the engine's dtype, for the default thresholds.
        on_mismatch: ``"raise"`` `StaleWeightsError`, or ``"warn"`` (log and return the result).
    """

    def __init__(
        self,
        token_ids: Sequence[Sequence[int]] | None = None,
        *,
        tokenizer: Any = None,
        max_threshold: float | None = None,
        mean_threshold: float | None = None,
        dtype: torch.dtype = torch.float32,
        on_mismatch: Literal["raise", "warn"] = "raise",
    ) -> None:
        if token_ids is None:
            if tokenizer is None:
                raise ValueError("StaleWeightProbe: pass token_ids or a tokenizer for the default probe text")
            token_ids = [probe_token_ids(tokenizer)]
        self.token_ids = [list(map(int, s)) for s in token_ids]
        default_max, default_mean = default_thresholds(dtype)
        self.max_threshold = default_max if max_threshold is None else max_threshold
        self.mean_threshold = default_mean if mean_threshold is None else mean_threshold
        if on_mismatch not in ("raise", "warn"):
            raise ValueError(f"StaleWeightProbe: on_mismatch={on_mismatch!r} must be 'raise' or 'warn'")
        self.on_mismatch = on_mismatch

    def __call__(self, engine: RolloutEngine, model: torch.nn.Module) -> ProbeResult:
        """Compare `engine` with the learner `model` (under ZeRO-3, call on every rank: the forward gathers)."""
        learner = score_sequences(model, self.token_ids)
        return self.check(learner, engine.prompt_logprobs(self.token_ids), engine.policy_version)

    def check(
        self, learner: Sequence[Sequence[float]], engine: Sequence[Sequence[float]], version: int = -1
    ) -> ProbeResult:
        """Compare precomputed learner / engine log-probs of the probe sequences."""
        mean, worst, count = compare_logprobs(learner, engine)
        result = ProbeResult(mean, worst, count, self.max_threshold, self.mean_threshold, version)
        if result.ok:
            logger.debug("weight probe ok: mean %.2e max %.2e", mean, worst)
            return result
        message = (
            f"stale weights: after sync to policy version {version} the engine's log-probs differ from the "
            f"learner's by max {worst:.3g} (threshold {self.max_threshold:.3g}), mean {mean:.3g} (threshold "
            f"{self.mean_threshold:.3g}) over {count} probe tokens. The engine is not sampling from the "
            "learner's weights: check the sync (names, tied lm_head, dtype, sleep level 2 without a sync) or "
            "loosen rollout.probe_threshold for low-precision engines."
        )
        if self.on_mismatch == "raise":
            raise StaleWeightsError(message)
        logger.warning(message)
        return result
