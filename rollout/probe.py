"""Stale-weight probe: after every weight sync, check that the engine really samples from the learner.

Two checks, both against the learner's own log-probs (HF forward, `score_sequences`):

1. Prompt scoring: a fixed probe sequence is scored by the engine (`RolloutEngine.prompt_logprobs`, in vLLM
   ``SamplingParams(prompt_logprobs=0, max_tokens=1)``) token by token.
2. Cached-prefix generation (``generation_check=True``, the default): one greedy token is generated
   (`RolloutEngine.generate`, ``max_tokens=1``) after a prefix made of the probe sequence repeated to fill
   two prefix-cache blocks and a few tokens more (the engine's ``cache_block_size``, where it has one: 128
   tokens on vLLM's CPU backend, usually 16 on CUDA; else the probe sequence itself), and its log-prob is
   compared with the learner's log-prob of that token after the same prefix.

The differences are summarised as mean and max absolute difference over all these tokens; above the
threshold the probe raises `StaleWeightsError` (or only warns, ``on_mismatch="warn"``).

What it catches: a sync that did not happen or went to the wrong place, missing or misnamed tensors (a tied
``lm_head`` left behind), garbage after a level-2 sleep, a wrong dtype cast, a reload from an old directory
(check 1 and 2); a prefix cache not reset after the sync (check 2 only).

Why check 2: vLLM never reads its prefix cache for a request with prompt log-probs (vLLM sets
``skip_reading_prefix_cache=True`` for those, in 0.26 and 0.32 alike), so check 1 always sees freshly
computed KV and passes even when rollouts reuse KV cached under the old weights. A normal generation does
read the cache: the previous probe left the prefix's blocks there, computed under the previous weights, so
after a sync without a prefix-cache reset the engine attends to stale KV and its log-prob of the token
differs from the learner's (tested: stub out the reset and the probe raises).

What it cannot see: a stale prefix cache whose probe blocks were evicted since the previous probe (vLLM
evicts cached blocks only under KV-cache pressure, least recently used first, so a rollout that fills the
whole KV cache can evict them; check 2 then computes fresh KV and passes), and any stale cache where the
prefix fills no whole block (on engines without ``cache_block_size``, e.g. a remote server, the prefix is
the probe sequence alone: enough blocks at CUDA's usual 16 tokens, none at the CPU backend's 128). The
prefix is cut to the engine's ``max_model_len`` - 1. Check 2 is one token among the probe's, so in bfloat16
(loose thresholds, below) it sees a stale cache only after weight changes that move that token's log-prob
by more than the max threshold, as check 1 sees stale weights.

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

from rollout.engines.hf import score_sequences
from rollout.engines.protocol import RolloutEngine, SamplingConfig

logger = logging.getLogger(__name__)

PROBE_TEXT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it.\n"
    "User: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\n"
    "Assistant: <think> In May she sold 48 / 2 = 24 clips. Altogether 48 + 24 = 72. </think> "
    "<answer> 72 </answer>"
)


# the cached-prefix generation check: blocks of prefix to cache, tokens past them, one greedy token
PREFIX_BLOCKS = 2
PREFIX_EXTRA_TOKENS = 8
GENERATION = SamplingConfig(max_tokens=1, temperature=0.0, min_tokens=0, stop=(), n=1, seed=0)


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
    generation_abs_diff: float | None = None  # the cached-prefix generation check's token (also in the above)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.max_threshold and self.mean_abs_diff <= self.mean_threshold

    def metrics(self) -> dict[str, float]:
        metrics = {
            "rollout/probe_mean_abs_diff": self.mean_abs_diff,
            "rollout/probe_max_abs_diff": self.max_abs_diff,
            "rollout/probe_ok": float(self.ok),
        }
        if self.generation_abs_diff is not None:
            metrics["rollout/probe_generation_abs_diff"] = self.generation_abs_diff
        return metrics


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
        generation_check: also run the cached-prefix generation check (see the module docstring).
        prefix_len: that check's prefix length in tokens; None = from the engine (`generation_prefix`).
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
        generation_check: bool = True,
        prefix_len: int | None = None,
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
        if prefix_len is not None and prefix_len < 1:
            raise ValueError(f"StaleWeightProbe: prefix_len={prefix_len} must be >= 1")
        self.generation_check = generation_check
        self.prefix_len = prefix_len

    def __call__(self, engine: RolloutEngine, model: torch.nn.Module) -> ProbeResult:
        """Compare `engine` with the learner `model` (under ZeRO-3, call on every rank: the forward gathers)."""
        learner = score_sequences(model, self.token_ids)
        if not self.generation_check:
            return self.check(learner, engine.prompt_logprobs(self.token_ids), engine.policy_version)
        # generation first: it must read the cache the previous probe left, before this probe's prompt
        # scoring (which writes fresh blocks for the probe sequence) touches it
        prefix = self.generation_prefix(engine)
        (sample,) = engine.generate([prefix], GENERATION)
        scored = engine.prompt_logprobs(self.token_ids)
        (generated,) = score_sequences(model, [[*prefix, sample.response_ids[0]]])
        return self.check(
            [*learner, generated[-1:]], [*scored, sample.logprobs[:1]], engine.policy_version, generation=True
        )

    def generation_prefix(self, engine: Any) -> list[int]:
        """The generation check's prompt: the first probe sequence repeated to `prefix_len` tokens, by default
        ``PREFIX_BLOCKS`` blocks of the engine's ``cache_block_size`` plus ``PREFIX_EXTRA_TOKENS`` (at least
        the probe sequence less its last token; the sequence alone where the engine has no block size), cut
        to the engine's ``max_model_len`` - 1 where it has one."""
        base = self.token_ids[0]
        length = self.prefix_len
        if length is None:
            length = len(base) - 1
            block = getattr(engine, "cache_block_size", None)
            if block:
                length = max(length, PREFIX_BLOCKS * int(block) + PREFIX_EXTRA_TOKENS)
        limit = getattr(engine, "max_model_len", None)
        if limit:
            length = min(length, int(limit) - 1)
        return [base[i % len(base)] for i in range(max(length, 1))]

    def check(
        self,
        learner: Sequence[Sequence[float]],
        engine: Sequence[Sequence[float]],
        version: int = -1,
        *,
        generation: bool = False,
    ) -> ProbeResult:
        """Compare precomputed learner / engine log-probs of the probe sequences; with `generation` the last
        sequence of each is the cached-prefix generation check's one token."""
        mean, worst, count = compare_logprobs(learner, engine)
        generation_diff = compare_logprobs(learner[-1:], engine[-1:])[1] if generation else None
        result = ProbeResult(
            mean, worst, count, self.max_threshold, self.mean_threshold, version, generation_diff
        )
        if result.ok:
            logger.debug("weight probe ok: mean %.2e max %.2e", mean, worst)
            return result
        message = (
            f"stale weights: after sync to policy version {version} the engine's log-probs differ from the "
            f"learner's by max {worst:.3g} (threshold {self.max_threshold:.3g}), mean {mean:.3g} (threshold "
            f"{self.mean_threshold:.3g}) over {count} probe tokens. The engine is not sampling from the "
            "learner's weights: check the sync (names, tied lm_head, dtype, sleep level 2 without a sync) or "
            "loosen rollout.probe_threshold (max) / rollout.probe_mean_threshold (mean) for low-precision "
            "engines."
        )
        if generation and len(learner) > 1:
            prompt_mean, prompt_worst, _ = compare_logprobs(learner[:-1], engine[:-1])
            if prompt_worst <= self.max_threshold and prompt_mean <= self.mean_threshold:
                message += (
                    f" Only the token generated after a cached prefix differs ({generation_diff:.3g}); the "
                    "prompt log-probs, which vLLM never reads from its prefix cache, agree: a stale prefix "
                    "cache (not reset after the sync)."
                )
        if self.on_mismatch == "raise":
            raise StaleWeightsError(message)
        logger.warning(message)
        return result
