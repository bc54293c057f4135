"""Reward functions named by the config's ``reward.fn``: a built-in, an importable function, or a weighted list.

``reward.fn`` is one of
- a built-in name in `REWARD_FNS` (``r1_zero``, ``question_only``);
- ``"package.module:function"``, importable from the run's ``PYTHONPATH``, with the signature
  ``fn(response: str, ground_truth: str) -> RewardResult`` (`response` is the completion after the prompt,
  `ground_truth` the example's gold answer). It must return a `RewardResult`: anything else (a float, a dict)
  scores that answer 0 and counts in ``reward/errors``;
- a list ``[{fn: r1_zero, weight: 1.0}, {fn: "mypkg.rewards:length_penalty", weight: 0.1}]`` of such names
  with finite weights, combined per answer into one `RewardResult`: ``reward = Σ weightᵢ · rewardᵢ``, while
  ``format_reward`` and ``answer_reward`` are the first entry's (list the task's grader first: evaluation
  accuracy and the EI/SFT filters read them; the other entries only shape the reward).

Every entry runs for the same answer inside the isolated worker pool (`rollout.reward.pool`) under one
per-answer time limit for all entries together; an entry that raises, hangs, kills its worker or returns
something else makes the whole answer score 0 (counted). Names are resolved at config load (the module is
imported and the function checked to take two arguments), so a typo is a config error, not a crash later.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag

from rollout.reward.functions import REWARD_FNS, RewardFn, RewardResult, check_result, get_reward_fn

__all__ = [
    "CombinedReward",
    "RewardFnSpec",
    "RewardTerm",
    "RewardTermConfig",
    "check_reward_ref",
    "load_reward_fn",
    "reward_fn_from_spec",
]


@dataclass(frozen=True)
class RewardTerm:
    """One entry of a weighted reward: a reward name (built-in or ``"package.module:function"``) and its weight."""

    fn: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"reward weight of {self.fn!r} must be a finite number, got {w!r}")


def load_reward_fn(ref: str) -> RewardFn:
    """The function `ref` names: a built-in name, or ``"package.module:function"`` (the module is imported).

    >>> load_reward_fn("rollout.reward.functions:r1_zero_reward") is load_reward_fn("r1_zero")
    True
    """
    if ":" not in ref:
        return get_reward_fn(ref)
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward function {ref!r}: write 'package.module:function' (both parts non-empty)")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ValueError(
            f"reward function {ref!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
            "put the directory that holds it on PYTHONPATH"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {ref!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {ref!r} is not callable (it is {type(obj).__name__})")
    _check_signature(ref, obj)
    return obj  # type: ignore[no-any-return]


def _check_signature(ref: str, fn: Any) -> None:
    """`fn` must accept ``(response, ground_truth)`` positionally (skipped when it has no signature)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind("response", "ground_truth")
    except TypeError as err:
        raise ValueError(
            f"reward function {ref!r} has signature {signature}; it must take (response: str, ground_truth: str) "
            f"and return a RewardResult ({err})"
        ) from None


def check_reward_ref(ref: str) -> str:
    """`ref` if it names a usable reward function, else ValueError saying why (for config validation)."""
    try:
        load_reward_fn(ref)
    except KeyError:
        raise ValueError(
            f"{ref!r} is neither a built-in reward ({', '.join(sorted(REWARD_FNS))}) nor 'package.module:function'"
        ) from None
    return ref


class CombinedReward:
    """The reward of weighted `terms` (module docstring): reward ``Σ wᵢ · rᵢ``, format and answer of the first.

    It pickles as its names and weights, so a worker process imports each function itself.

    >>> both = CombinedReward([RewardTerm("r1_zero", 1.0), RewardTerm("question_only", 0.5)])
    >>> both("so \\\\boxed{5} </think> <answer> 5 </answer>", "5")
    RewardResult(format_reward=1.0, answer_reward=1.0, reward=1.5)
    >>> both("so \\\\boxed{5}", "5")
    RewardResult(format_reward=0.0, answer_reward=0.0, reward=0.5)
    """

    def __init__(self, terms: Sequence[RewardTerm]) -> None:
        if not terms:
            raise ValueError("a combined reward needs at least one term")
        self.terms = tuple(terms)
        self._fns = [load_reward_fn(t.fn) for t in self.terms]

    def __reduce__(self) -> tuple[type[CombinedReward], tuple[tuple[RewardTerm, ...]]]:
        return CombinedReward, (self.terms,)

    def __repr__(self) -> str:
        return f"CombinedReward({list(self.terms)!r})"

    def __call__(self, response: str, ground_truth: str) -> RewardResult:
        results = [check_result(fn(response, ground_truth)) for fn in self._fns]
        first = results[0]
        if len(results) == 1 and self.terms[0].weight == 1.0:
            return first
        total = math.fsum(t.weight * r.reward for t, r in zip(self.terms, results, strict=True))
        return RewardResult(format_reward=first.format_reward, answer_reward=first.answer_reward, reward=total)


def _term(item: object) -> RewardTerm:
    if isinstance(item, RewardTerm):
        return item
    if isinstance(item, Mapping):
        return RewardTerm(str(item["fn"]), float(item.get("weight", 1.0)))
    fn, weight = getattr(item, "fn", None), getattr(item, "weight", 1.0)  # a config entry
    if not isinstance(fn, str):
        raise TypeError(f"reward term must have a 'fn' name and a 'weight', got {item!r}")
    return RewardTerm(fn, float(weight))


def reward_fn_from_spec(spec: str | Sequence[object]) -> RewardFn:
    """The reward function of a ``reward.fn`` value: a name (built-in or ``"package.module:function"``) or a
    list of terms (`RewardTerm`, ``{fn, weight}`` mappings or config entries with those attributes)."""
    if isinstance(spec, str):
        return get_reward_fn(spec) if ":" not in spec else CombinedReward([RewardTerm(spec)])
    return CombinedReward([_term(item) for item in spec])


# -- the config's field (trainer.config.RewardConfig.fn) ---------------------------------------------------

RewardName = Annotated[str, AfterValidator(check_reward_ref)]


class RewardTermConfig(BaseModel):
    """``{fn, weight}``, an entry of a weighted ``reward.fn`` (unknown keys and non-finite weights refused)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    fn: RewardName
    weight: float = 1.0


RewardFnSpec = Annotated[
    Annotated[RewardName, Tag("name")] | Annotated[list[RewardTermConfig], Tag("terms"), Field(min_length=1)],
    Discriminator(lambda v: "terms" if isinstance(v, (list, tuple)) else "name"),
]
"""``reward.fn``: a name, or a non-empty list of ``{fn, weight}``; problems are reported at
``reward.fn.name`` or ``reward.fn.terms.<i>.<key>``."""
