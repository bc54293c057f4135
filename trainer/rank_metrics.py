"""One record from every rank's metrics: what rank 0 logs in a data-parallel run.

Ranks do not all measure the same things (a rank with no share of the evaluation has no evaluation time), so
values are matched by name, never by position. Each metric is combined by what it is:

- totals of the job: counts, token counts and throughputs (ranks work in parallel, so the job's tokens/s
  is the sum of the ranks') are **summed**;
- maxima (``…_max``, ``rollout/policy_lag``) take the **largest** rank value;
- everything else (losses, means, rates, seconds, MFU) is the **mean over the ranks that reported it**;
- keys named in `already_global` were computed from every rank's data already and are taken as they are.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

SUMMED_SUFFIXES = (
    "_tokens_per_s", "/model_tflops_per_s", "/samples", "/prompt_tokens", "/output_tokens", "/finish_stop",
    "/finish_length", "/dropped_zero_std_groups", "/timeouts", "/errors", "/worker_restarts",
)  # fmt: skip
MAXED_SUFFIXES = ("_max", "/policy_lag")


def combine_rank_metrics(per_rank: Sequence[dict[str, float]],
                         already_global: Collection[str] = ()) -> dict[str, float]:
    """Combine ``per_rank[r]`` (rank r's metrics) by the rules above.

    >>> combine_rank_metrics([{"train/loss": 1.0, "time/eval": 4.0, "rollout/samples": 8.0},
    ...                       {"train/loss": 3.0, "rollout/samples": 8.0}])
    {'rollout/samples': 16.0, 'time/eval': 4.0, 'train/loss': 2.0}
    """
    keys = sorted(set().union(*per_rank))
    out: dict[str, float] = {}
    for key in keys:
        values = [float(m[key]) for m in per_rank if key in m]
        if key in already_global:
            out[key] = values[0]
        elif key.endswith(SUMMED_SUFFIXES):
            out[key] = sum(values)
        elif key.endswith(MAXED_SUFFIXES):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out
