"""The rollout-engine contract shared by the vLLM, HF and remote engines.

An engine turns prompts into `Sample`s, accepts new weights as an iterator of (name, tensor) (the typed
stream and its check are `rollout.weights`), can release and restore its accelerator memory (`sleep` /
`wake`) when colocated with the learner, and is closed once. Every sample is stamped with the policy
version that produced it, so the learner can tell how stale a rollout is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]
LogprobsMode = Literal["processed", "raw"]
"""What `Sample.logprobs` holds. ``processed`` (default): log-probs of the distribution the token was drawn
from: logits with the min-tokens EOS mask, divided by the temperature, top-p truncated and renormalised
(greedy, temperature < 1e-5: no temperature). ``raw``: ``log_softmax(logits)`` of the model, untouched."""


GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below this sample greedily


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters; `n` is the group size (samples per prompt).

    `stop` is a sequence of non-empty stop strings (stored as a tuple); a bare str is rejected, since both
    engines would otherwise treat each of its characters as a stop string.

    `first_index`: where the call's prompts start in a larger batch split over several calls (a data-parallel
    rank's shard): prompt i of the call is seeded as prompt ``first_index + i`` (`sample_seed`), so each shard
    samples exactly what the whole batch in one call would.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    min_tokens: int = 4
    stop: tuple[str, ...] = ("</answer>",)
    n: int = 1
    seed: int | None = None
    first_index: int = 0

    def __post_init__(self) -> None:
        # a bare str would be iterated as one stop string per character
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must be a sequence of strings, e.g. ('</answer>',), got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))  # a list is accepted and stored as a tuple
        problems = []
        if any(s == "" for s in self.stop):
            problems.append(f"stop={self.stop!r} must not contain an empty string (it would match at once)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            problems.append(f"min_tokens={self.min_tokens} must be in [0, max_tokens={self.max_tokens}]")
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if self.first_index < 0:
            problems.append(f"first_index={self.first_index} must be >= 0")
        if problems:
            raise ValueError("invalid SamplingConfig: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        """Whether vLLM samples greedily: temperature below its ``_SAMPLING_EPS`` (`GREEDY_EPS`). It then
        refuses ``n > 1``, so the engines ask for one sample and copy it ``n`` times."""
        return self.temperature < GREEDY_EPS

    def seed_of(self, prompt_index: int, k: int = 0) -> int | None:
        """`sample_seed` of sample k of the call's prompt `prompt_index`, counted from `first_index`."""
        return sample_seed(self.seed, self.first_index + prompt_index, self.n, k)


@dataclass
class Sample:
    """One generated completion. `logprobs[i]` is log p(response_ids[i]) under the sampling policy.

    `policy_version` is the version of the weights that drew the first token. Where the weights changed
    while the sample was being generated (in-flight weight updates, `rollout.engines.remote.RemoteEngine`
    with ``inflight=True``), `version_spans` lists ``[version, start, end]`` for each contiguous run of
    response tokens drawn by one version (first span's version = `policy_version`); empty means every token
    is `policy_version`'s (`token_versions` gives one version per token either way).
    """

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int
    extra: dict[str, float] = field(default_factory=dict)
    version_spans: list[list[int]] = field(default_factory=list)

    def token_versions(self) -> list[int]:
        """The policy version that drew each response token."""
        if not self.version_spans:
            return [self.policy_version] * len(self.response_ids)
        return [version for version, start, end in self.version_spans for _ in range(start, end)]


Prompt = str | Sequence[int]


@runtime_checkable
class RolloutEngine(Protocol):
    """What learners, evaluation and the weight sync use of a generation engine; every engine has all of it.

    `policy_version` belongs to the engine: it starts at the version the engine holds and only a complete
    `update_weights` advances it (to the stream's `rollout.weights.WeightStream.version`, else by one).
    `max_model_len` (prompt + response tokens) and `cache_block_size` (tokens per prefix-cache block) are
    None where the engine has no such limit or cache.
    """

    metrics: dict[str, float]  # the latest `rollout_metrics` and `rollout.weights.sync_metrics`

    @property
    def policy_version(self) -> int: ...

    @property
    def max_model_len(self) -> int | None: ...

    @property
    def cache_block_size(self) -> int | None: ...

    @property
    def sleep_supported(self) -> bool:
        """Whether `sleep` frees accelerator memory (False: sleep and wake are no-ops)."""
        ...

    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Sample]:
        """`params.n` samples per prompt, grouped: samples of prompt i are at [i*n, (i+1)*n)."""
        ...

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (every state-dict name, tied aliases included: `rollout.weights.iter_state_dict`,
        checked by `rollout.weights.WeightCheck`), then advance `policy_version` (`rollout.weights.next_version`)."""
        ...

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence (used by the stale-weight probe)."""
        ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


def normalize_device(device: str | torch.device, current_cuda: int | None = None) -> torch.device:
    """`device` with its index. A bare ``cuda`` is the current CUDA device, as torch and accelerate mean it
    (a single-process GPU learner reports ``cuda``): `current_cuda` where given, else this process's
    (``torch.cuda.current_device()``; ``cuda:0`` where CUDA is unavailable). Other devices are returned as
    parsed. The one rule for both config validation (`trainer.config`) and the vLLM engine's GPU
    (`rollout.engines.vllm.engine_gpu`), so a dedicated engine runs where validation checked it would.

    >>> normalize_device("cuda", 2), normalize_device("cuda:1", 2), normalize_device("cpu", 2)
    (device(type='cuda', index=2), device(type='cuda', index=1), device(type='cpu'))
    """
    parsed = torch.device(device)
    if parsed.type == "cuda" and parsed.index is None:
        if current_cuda is None:
            current_cuda = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return torch.device("cuda", current_cuda)
    return parsed


def check_prompts(prompts: Sequence[Prompt]) -> None:
    """TypeError where one prompt was passed for the list of prompts: every engine would take each character of a
    bare str, or each id of a flat token-id list, as a prompt of its own.

    >>> check_prompts(["What is 2 + 3?", [5, 6, 7]])
    >>> check_prompts("What is 2 + 3?")
    Traceback (most recent call last):
    ...
    TypeError: prompts must be a list of prompts, e.g. ['What is 2 + 3?'], got a bare str
    """
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of prompts, e.g. [{prompts[:40]!r}], got a bare str")
    if any(isinstance(p, int) for p in prompts):
        raise TypeError(
            f"prompts must be a list of prompts (str or token-id lists), e.g. [{list(prompts)[:8]!r}], got a flat "
            "list of token ids"
        )


def sample_seed(seed: int | None, prompt_index: int, n: int, k: int) -> int | None:
    """Seed of sample k of prompt i in a batch sampled with `seed`: ``mix(seed, i) + k``, or None.

    Seeding every prompt with `seed` itself would give identical samples for identical prompts, and vLLM's
    parallel sampling gives child k of a request ``request_seed + k``; so request i gets ``mix(seed, i)``,
    a 62-bit hash (splitmix64) of (seed, i), and its samples get consecutive seeds after it. Seeds of
    different (seed, i) are far apart, so batches sampled with ``seed = base + step`` do not share streams.
    `n` only documents the group size (seeds of one request are ``mix + 0 .. mix + n-1``).

    >>> [sample_seed(7, 0, 2, k) - sample_seed(7, 0, 2, 0) for k in range(2)]
    [0, 1]
    >>> sample_seed(None, 0, 2, 0) is None
    True
    """
    if seed is None:
        return None
    if not 0 <= k < n:
        raise ValueError(f"sample index k={k} must be in [0, n={n})")
    x = (seed * 0x9E3779B97F4A7C15 + prompt_index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((x ^ (x >> 31)) >> 2) + k


def rollout_metrics(samples: Sequence[Sample], seconds: float) -> dict[str, float]:
    """Per-rollout metrics, namespaced ``rollout/``: throughput, lengths, finish-reason counts."""
    lengths = [len(s.response_ids) for s in samples]
    prompt_tokens = sum(len(s.prompt_ids) for s in samples)
    out_tokens = sum(lengths)
    return {
        "rollout/generate_s": seconds,
        "rollout/samples": float(len(samples)),
        "rollout/prompt_tokens": float(prompt_tokens),
        "rollout/output_tokens": float(out_tokens),
        "rollout/output_tokens_per_s": out_tokens / seconds if seconds > 0 else 0.0,
        "rollout/response_len_mean": out_tokens / len(samples) if samples else 0.0,
        "rollout/response_len_max": float(max(lengths, default=0)),
        "rollout/finish_stop": float(sum(s.finish_reason == "stop" for s in samples)),
        "rollout/finish_length": float(sum(s.finish_reason == "length" for s in samples)),
    }
