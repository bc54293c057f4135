"""Reading JSONL datasets: one record (a JSON object) per non-blank line, errors naming file and line.

Kept instead of `datasets`' JSON reader (which `trainer.data.sources` uses for JSON and Parquet files and hub
ids) because of the errors: for a line with a missing comma, ``load_dataset("json", ...)`` raises
"Unexpected character found when decoding object value at position 17", naming neither the file nor the
line. Here a bad line is one `DatasetFormatError` with ``file:line:column``, raised while reading, and the
records stream from the file without an Arrow copy written to the cache first.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     p = Path(d) / "x.jsonl"
...     _ = p.write_text('{"a": "1"}\\n\\n{"a": "2"}\\n', encoding="utf-8")
...     list(read_jsonl(p, ("a",)))
[(1, {'a': '1'}), (3, {'a': '2'})]
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["DatasetFormatError", "read_jsonl", "read_jsonl_records"]


class DatasetFormatError(ValueError):
    """A dataset line that cannot be used; the message names the file, the line and the problem."""


def _decoded_lines(path: Path, handle: IO[Any], binary: bool) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each line of `handle`, decoded one line at a time, so that a byte
    that is not UTF-8 is reported with its line and column (a text handle decodes whole blocks ahead of
    the line being read, and its UnicodeDecodeError names neither). A UTF-8 text handle with a
    ``buffer`` (what ``open`` and ``gzip.open`` return in text mode) is read through that buffer."""
    raw_handle: Any = handle
    encoding, errors = "utf-8", "strict"
    if not binary:
        raw_handle = getattr(handle, "buffer", None) if isinstance(handle, io.TextIOBase) else None
        encoding = getattr(handle, "encoding", None) or "utf-8"
        errors = getattr(handle, "errors", None) or "strict"
        if raw_handle is None or codecs.lookup(encoding).name not in ("utf-8", "utf-8-sig"):
            lineno = 0  # no bytes to split into lines (or not an ASCII-compatible encoding): read as text
            try:
                for lineno, text in enumerate(handle, start=1):
                    yield lineno, text
            except UnicodeDecodeError as err:
                raise DatasetFormatError(
                    f"{path}: not valid {err.encoding} after line {lineno} ({err.reason})"
                ) from None
            return
    for lineno, raw in enumerate(raw_handle, start=1):
        if lineno == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # what some editors write first; not part of the record
        try:
            yield lineno, raw.decode(encoding, errors)
        except UnicodeDecodeError as err:
            column = len(raw[: err.start].decode(encoding, "replace")) + 1
            raise DatasetFormatError(
                f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
                "re-save the file as UTF-8"
            ) from None


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
    strings. `opener` opens the file as text (default: the file's bytes, read as UTF-8; e.g. one that
    also reads ``.gz``). Problems, bytes that are not valid UTF-8 included, raise `DatasetFormatError`
    ``"{path}:{lineno}: ..."``.
    """
    path = Path(path)
    count = 0
    handle: IO[Any] = path.open("rb") if opener is None else opener(path)
    with handle:
        if limit is not None and limit <= 0:
            return
        for lineno, line in _decoded_lines(path, handle, binary=opener is None):
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
            if limit is not None and count >= limit:  # stop before reading (or decoding) another line
                return


def read_jsonl_records(
    path: str | Path, required: Sequence[str], optional: Sequence[str] = (), field: str = "data file"
) -> list[tuple[int, dict[str, str]]]:
    """(line number, record) of every non-blank line; each record has the `required` string keys.

    Raises FileNotFoundError naming `field` (the config key that named the file) for a missing file, and
    `DatasetFormatError` naming the file and 1-based line for invalid JSON, a non-object, a missing or
    non-string key, or a file with no records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r}: no such file")
    out: list[tuple[int, dict[str, str]]] = list(read_jsonl(path, required, optional=optional))
    if not out:
        raise DatasetFormatError(f"{path}: no records (empty file); expected JSONL lines with {list(required)}")
    return out
