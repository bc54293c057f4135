"""The rollout-engine interface shared by the vLLM and HF engines.

An engine turns prompts into `Sample`s, accepts new weights as an iterator of (name, tensor), can
release and restore its accelerator memory (`sleep` / `wake`) when colocated with the learner, and is
closed once. Every sample is stamped with the policy version that produced it (bumped by each
`update_weights`), so the learner can tell how stale a rollout is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters; `n` is the group size (samples per prompt)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    min_tokens: int = 4
    stop: tuple[str, ...] = ("</answer>",)
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
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
        if problems:
            raise ValueError("invalid SamplingConfig: " + "; ".join(problems))


@dataclass
class Sample:
    """One generated completion. `logprobs[i]` is log p(response_ids[i]) under the sampling policy."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int
    extra: dict[str, float] = field(default_factory=dict)


Prompt = str | Sequence[int]


@runtime_checkable
class RolloutEngine(Protocol):
    """What the learners need from a generation engine."""

    policy_version: int

    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Sample]:
        """`params.n` samples per prompt, grouped: samples of prompt i are at [i*n, (i+1)*n)."""
        ...

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF parameter names) and bump `policy_version`."""
        ...

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence (used by the stale-weight probe)."""
        ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


def iter_state_dict(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs of a model's parameters and buffers without copying the state dict."""
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor.detach()
