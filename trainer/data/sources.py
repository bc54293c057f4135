"""Where a task's records come from: a local JSONL, JSON or Parquet file (or a folder holding
``{split}.jsonl``, ``{split}.json`` or ``{split}.parquet``), or a dataset id on the Hugging Face hub.

JSON and Parquet files and hub ids are read with `datasets` (``load_dataset``: a hub dataset is downloaded
once and then loads from the cache under ``HF_HOME``, offline too). JSONL stays with `trainer.data.jsonl`,
which names the file, line and column of a bad record, where `datasets`' JSON reader names neither. A hub
id that cannot be loaded (no network, ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` without a cached
copy, a misspelt id) is one `DatasetUnavailableError` naming the id and the local-file alternative.

A source is local when it exists on disk or ends in one of `LOCAL_SUFFIXES` (a missing local file is a
`FileNotFoundError`, never a hub look-up); anything else is a hub id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.data.jsonl import DatasetFormatError, read_jsonl

__all__ = ["LOCAL_SUFFIXES", "DatasetUnavailableError", "is_local", "read_records", "resolve_file"]

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
KNOWN_HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}  # datasets whose default needs a config name

Record = tuple[str, dict[str, Any]]  # (where: "file:line" or "id[split]:row", the record)


class DatasetUnavailableError(FileNotFoundError):
    """A hub dataset that cannot be loaded (offline, not cached, no such id); the message says what to do."""


def is_local(source: str | Path) -> bool:
    """Whether `source` names a local file or folder rather than a hub id (see the module docstring)."""
    return Path(source).exists() or str(source).endswith(LOCAL_SUFFIXES)


def resolve_file(source: str | Path, split: str, what: str) -> Path:
    """The file of `split` that `source` names: the file itself, or a folder's ``{split}`` file."""
    path = Path(source)
    if path.is_dir():
        found = [path / f"{split}{suffix}" for suffix in LOCAL_SUFFIXES if (path / f"{split}{suffix}").is_file()]
        path = found[0] if found else path / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} data not found: {path} (give a .jsonl file or a folder holding {split}.jsonl)"
        )
    if path.suffix not in LOCAL_SUFFIXES:
        raise DatasetFormatError(f"{path}: unknown file type {path.suffix!r}; give a .jsonl, .json or .parquet file")
    return path


def read_records(
    source: str | Path, split: str, limit: int | None, hub_config: str | None, what: str
) -> tuple[str, Iterator[Record]]:
    """(the name of what is read, its records, at most `limit`): a local file of `split` or a hub split."""
    if is_local(source):
        path = resolve_file(source, split, what)
        if path.suffix == ".jsonl":
            return str(path), ((f"{path}:{n}", record) for n, record in read_jsonl(path, limit=limit))
        rows = _load_local(path)
        return str(path), ((f"{path}[{i}]", dict(row)) for i, row in enumerate(_first(rows, limit)))
    name = hub_config or KNOWN_HUB_CONFIGS.get(str(source))
    rows = _load_hub(str(source), name, split, what)
    where = f"{source}[{split}]"
    return where, ((f"{where}:{i}", dict(row)) for i, row in enumerate(_first(rows, limit)))


def _first(rows: Any, limit: int | None) -> Any:
    return rows if limit is None else rows.select(range(min(limit, len(rows))))


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "reading JSON, Parquet or hub datasets needs the 'datasets' package (a dependency of reasonrl: "
            "pip install datasets), or pass a local JSONL file"
        ) from None
    return datasets


def _load_local(path: Path) -> Any:
    """A JSON (a list of objects, or JSON lines) or Parquet file as a `datasets.Dataset`."""
    datasets = _datasets()
    builder = "parquet" if path.suffix == ".parquet" else "json"
    if builder == "parquet" and _parquet_rows(path) == 0:  # datasets fails on a zero-row Parquet file
        raise DatasetFormatError(f"{path}: no records (the file holds no rows)")
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except ValueError as err:
        if "corresponds to no data" in str(err):  # an empty file, or an empty list
            raise DatasetFormatError(f"{path}: no records (the file holds no rows)") from None
        raise DatasetFormatError(f"{path}: cannot be read as {builder.upper()}: {err}") from None
    except Exception as err:  # pyarrow and datasets raise many types for a malformed file
        cause = err.__cause__ or err
        raise DatasetFormatError(f"{path}: cannot be read as {builder.upper()}: {cause}") from None
    if len(rows) == 0:
        raise DatasetFormatError(f"{path}: no records (the file holds no rows)")
    return rows


def _parquet_rows(path: Path) -> int | None:
    """The row count in a Parquet file's footer; None when it cannot be read (left to `datasets` to report)."""
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:
        return None


def _load_hub(source: str, name: str | None, split: str, what: str) -> Any:
    """Split `split` of hub dataset `source` (configuration `name`), or `DatasetUnavailableError`."""
    datasets = _datasets()
    try:
        return datasets.load_dataset(source, name, split=split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        config = f", configuration {name!r}" if name else ""
        raise DatasetUnavailableError(
            f"{what} dataset {source!r} (split {split!r}{config}) cannot be loaded from the Hugging Face hub: "
            f"{err} (and there is no local file or folder of that name). Load it once while online (it is then "
            "cached under HF_HOME and loads offline), or give a "
            f"local .jsonl, .json or .parquet file (or a folder holding {split}.jsonl) as data.train_source / "
            "data.eval_source"
        ) from None
    except ValueError as err:  # an unknown split or configuration
        raise DatasetUnavailableError(f"{what} dataset {source!r}: {err}") from None
