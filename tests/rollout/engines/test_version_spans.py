"""`rollout.engines.remote.version_spans`: vLLM's per-sample weight-version spans turned into
`Sample.version_spans`, and the answers that cannot be right refused."""

from __future__ import annotations

import pytest

from rollout.engines.remote import version_spans


def span(version: str, start: int, end: int) -> dict[str, object]:
    return {"version": version, "start": start, "end": end}


def test_spans_by_hand() -> None:
    raw = [span("default", 0, 3), span("4", 3, 5), span("5", 5, 9)]
    assert version_spans(raw, 9, 3) == [[3, 0, 3], [4, 3, 5], [5, 5, 9]]  # "default": the version asked with
    assert version_spans(None, 2, 7) == version_spans([], 2, 7) == [[7, 0, 2]]


@pytest.mark.parametrize("raw", [
    [span("1", 0, 3)],  # stops short of the 5 tokens
    [span("1", 0, 2), span("2", 3, 5)],  # a gap
    [span("1", 0, 3), span("2", 2, 5)],  # an overlap
    [span("1", 1, 5)],  # does not start at 0
    [span("1", 0, 0), span("2", 0, 5)],  # an empty span
])
def test_spans_that_do_not_tile_the_tokens_are_refused(raw: list[dict[str, object]]) -> None:
    with pytest.raises(RuntimeError, match=r"weight-version spans .* do not tile 5 tokens"):
        version_spans(raw, 5, 0)
