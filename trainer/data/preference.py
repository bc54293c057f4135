"""Preference pairs for DPO / IPO / SimPO: JSONL ``{"prompt", "chosen", "rejected"}`` (Anthropic HH converts
with ``python -m trainer.data.hh``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.jsonl import read_jsonl_records


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    where: str = field(default="", compare=False)  # "file:line", for messages


def read_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """``{"prompt", "chosen", "rejected"}`` lines of `path`; errors name the file and line."""
    records = read_jsonl_records(path, ("prompt", "chosen", "rejected"), field="data.preference_path")
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"{path}:{n}") for n, r in records]
