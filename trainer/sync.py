"""The learner side of a weight sync: stream the learner's weights into the rollout engine, then probe it.

`sync_weights` builds the `rollout.weights.WeightStream` of the learner's module and hands it to the engine
(which checks and loads it, `rollout.weights`), then `StaleWeightProbe` compares the engine's log-probs of a
fixed sequence with the learner's own (`learner_logprobs`, the learner's one forward path
`trainer.logprobs.forward_log_probs`). Two checks: (1) prompt scoring (`RolloutEngine.prompt_logprobs`; each
sequence cut to ``max_model_len - 1``), and (2) one greedy token generated after a prefix that fills ``PREFIX_BLOCKS`` prefix-cache blocks
(`RolloutEngine.cache_block_size`; the probe sequence alone where there is none), cut to ``max_model_len - 1``.
(2) exists because vLLM never reads its prefix cache for prompt log-probs, so only a generation sees KV cached
under the old weights (a prefix cache not reset after the sync); it is blind once the probe's blocks were
evicted, and where the prefix fills no whole block.

Catches: a sync that did not happen or went elsewhere, missing or misnamed tensors (a tied ``lm_head`` left
behind), a wrong dtype cast, garbage after a level-2 sleep, a stale prefix cache. Thresholds:
`default_thresholds`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rollout.engines.protocol import RolloutEngine, SamplingConfig
from trainer.config import RunConfig
from trainer.data.batching import pack_token_ids
from trainer.engines import engine_dtype, shares_engine
from trainer.learner import DTYPES, Learner
from trainer.logprobs import forward_log_probs
from trainer.lora import weight_stream

logger = logging.getLogger(__name__)


def sync_weights(engine: RolloutEngine, learner: Learner, cfg: RunConfig, probe: StaleWeightProbe | None = None,
                 version: int | None = None) -> dict[str, float]:
    """Stream the learner's weights into `engine`, then probe it; its ``rollout/sync*`` and probe metrics.
    Call on every rank.

    `version`: the policy version the engine takes for these weights (a resumed run's checkpoint); None = the
    engine's next. Where the ranks share one engine (`shares_engine`: a remote server) rank 0's engine alone
    sends (`trainer.engines.build_engine`): rank 0's version is broadcast first so that every rank's engine
    takes the same one, the other ranks only read the stream (under ZeRO-3 each bucket's gather is
    collective), and a barrier holds them until the server has the weights. Every rank then probes (the
    learner's forward is collective under ZeRO-3, and a stale engine must stop every rank alike). If rank 0's
    send fails, the others wait in a gather or the barrier until the process group's timeout.
    """
    accelerator = learner.accelerator
    shared = shares_engine(cfg, accelerator.num_processes)
    if shared:
        version = broadcast_from_main(engine.policy_version + 1 if version is None else version)
    module = learner.unwrapped  # under model.lora: merged weights, base names (trainer.lora)
    engine.update_weights(weight_stream(module, cfg.rollout.sync_bucket_mb, version, getattr(engine, "model", None)))
    if shared:
        accelerator.wait_for_everyone()
    result = (probe or make_probe(cfg, learner))(engine, learner.unwrapped)
    sync = {k: float(v) for k, v in engine.metrics.items() if k.startswith("rollout/sync")}
    return sync | result.metrics()


def broadcast_from_main(value: int) -> int:
    """Rank 0's `value` on every rank (a collective)."""
    from accelerate.utils import broadcast_object_list

    return int(broadcast_object_list([value], from_process=0)[0])


def make_probe(cfg: RunConfig, learner: Learner) -> StaleWeightProbe:
    """The probe's default thresholds follow `probe_dtype` (bf16 kernels differ from the learner's)."""
    dtype = probe_dtype(cfg, learner.accelerator.mixed_precision)
    return StaleWeightProbe(tokenizer=learner.tokenizer, max_threshold=cfg.rollout.probe_threshold,
                            mean_threshold=cfg.rollout.probe_mean_threshold,
                            dtype=dtype, on_mismatch=cfg.rollout.probe_action)


MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}  # accelerate's --mixed_precision


def probe_dtype(cfg: RunConfig, mixed_precision: str = "no") -> torch.dtype:
    """The least precise of the learner's (``model.dtype``, or the launch's ``--mixed_precision``, under which
    the learner computes in bf16/fp16 and DeepSpeed even holds its weights so) and the engine's dtype: the probe
    compares the two sides, so a bf16 learner against a float32 engine differs by bf16 rounding (~1e-3 on the
    tiny model), more than the float32 thresholds allow."""
    dtypes = [DTYPES[cfg.model.dtype], DTYPES[engine_dtype(cfg)]]
    if mixed_precision in MIXED_PRECISION:
        dtypes.append(MIXED_PRECISION[mixed_precision])
    return max(dtypes, key=default_thresholds)


@torch.no_grad()
def learner_logprobs(model: torch.nn.Module, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
    """log p(token_t | tokens_<t) for t >= 1 of each sequence under `model` in eval mode, float32, through the
    learner's forward path (`forward_log_probs`, padded). Under ZeRO-3 every rank must call it (the forward
    gathers parameters collectively)."""
    seqs = [[int(t) for t in s] for s in token_ids]
    tokens = pack_token_ids([[] for _ in seqs], seqs, pad_id=0)  # (b, s-1): inputs and next-token labels
    was_training = model.training
    model.eval()
    try:
        log_probs = forward_log_probs(model, tokens.to(next(model.parameters()).device))["log_probs"]
    finally:
        model.train(was_training)
    return [log_probs[row, : len(seq) - 1].tolist() for row, seq in enumerate(seqs)]


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
    """(max, mean) abs log-prob difference allowed for an engine running in `dtype`.

    float32 engines agree with the learner to ~1e-6 on the tiny model: max 1e-3 sees one small optimizer
    step. In bfloat16 the two sides run different kernels (fused RMSNorm, flash attention, reduction orders),
    ~1e-2 per token on average and a few tenths on single tokens at 1B scale: max 1.0 / mean 0.05 (float16
    0.5 / 0.02) still catch wrong or stale weights (whole nats), not one small step.
    """
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
        sequences = self.scored_sequences(engine)
        learner = learner_logprobs(model, sequences)
        if not self.generation_check:
            return self.check(learner, engine.prompt_logprobs(sequences), engine.policy_version)
        # generation first: it must read the cache the previous probe left, before this probe's prompt
        # scoring (which writes fresh blocks for the probe sequence) touches it
        prefix = self.generation_prefix(engine)
        (sample,) = engine.generate([prefix], GENERATION)
        scored = engine.prompt_logprobs(sequences)
        (generated,) = learner_logprobs(model, [[*prefix, sample.response_ids[0]]])
        return self.check(
            [*learner, generated[-1:]], [*scored, sample.logprobs[:1]], engine.policy_version, generation=True
        )

    def scored_sequences(self, engine: RolloutEngine) -> list[list[int]]:
        """The probe sequences as scored: each cut to `max_model_len` - 1 tokens (vLLM refuses a prompt that
        leaves no room for one generated token, prompt log-probs included)."""
        if not engine.max_model_len:
            return self.token_ids
        return [seq[: engine.max_model_len - 1] for seq in self.token_ids]

    def generation_prefix(self, engine: RolloutEngine) -> list[int]:
        """The generation check's prompt: the first probe sequence repeated to `prefix_len` tokens, by default
        ``PREFIX_BLOCKS`` blocks of the engine's `cache_block_size` plus ``PREFIX_EXTRA_TOKENS`` (at least the
        probe sequence less its last token; that alone without a block size), cut to `max_model_len` - 1."""
        base = self.token_ids[0]
        length = self.prefix_len
        if length is None:
            length = len(base) - 1
            if engine.cache_block_size:
                length = max(length, PREFIX_BLOCKS * engine.cache_block_size + PREFIX_EXTRA_TOKENS)
        if engine.max_model_len:
            length = min(length, engine.max_model_len - 1)
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
