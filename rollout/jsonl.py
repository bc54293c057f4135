"""Reading JSONL datasets: one record (a JSON object) per non-blank line, errors naming file and line.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     p = Path(d) / "x.jsonl"
...     _ = p.write_text('{"a": "1"}\\n\\n{"a": "2"}\\n', encoding="utf-8")
...     list(read_jsonl(p, ("a",)))
[(1, {'a': '1'}), (3, {'a': '2'})]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["DatasetFormatError", "read_jsonl"]


class DatasetFormatError(ValueError):
    """A dataset line that cannot be used; the message names the file, the line and the problem."""


def read_jsonl(
    path: str | Path,
    required: Sequence[str] = (),
    *,
    optional: Sequence[str] = (),
    limit: int | None = None,
    opener: Callable[[Path], IO[str]] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, record) for each non-blank line of `path`, stopping after `limit` records.

    Each record must be a JSON object whose `required` keys, and whichever `optional` keys it has, hold
    strings. `opener` opens the file as text (default: UTF-8 ``path.open``; e.g. one that also reads
    ``.gz``). Problems raise `DatasetFormatError` ``"{path}:{lineno}: ..."``.
    """
    path = Path(path)
    count = 0
    with path.open(encoding="utf-8") if opener is None else opener(path) as handle:
        for lineno, line in enumerate(handle, start=1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetFormatError(
                    f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(record, dict):
                keys = f" with keys {list(required)}" if required else ""
                raise DatasetFormatError(
                    f"{path}:{lineno}: expected a JSON object{keys}, got {type(record).__name__}"
                )
            for key in (*required, *(k for k in optional if k in record)):
                if key not in record:
                    raise DatasetFormatError(
                        f"{path}:{lineno}: missing key {key!r} (each line needs {list(required)}; "
                        f"found {sorted(record)})"
                    )
                if not isinstance(record[key], str):
                    raise DatasetFormatError(
                        f"{path}:{lineno}: {key!r} must be a string, got {type(record[key]).__name__}"
                    )
            count += 1
            yield lineno, record
