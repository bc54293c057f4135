"""Run configs as files: read a YAML file, apply ``dotted.key=value`` overrides, validate every problem at once
(field errors plus `trainer.config`'s cross-field rules, as one `ConfigError`), and write the resolved config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from trainer.config import ConfigError, RunConfig, batch_arithmetic_problems, placement_problems


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key (check spelling; see configs/ for valid keys)")
        elif e["type"] == "value_error" and not e["loc"]:
            problems.extend(str(e["ctx"]["error"]).split("; "))
        elif e["type"] == "finite_number":
            problems.append(f"{where}={e.get('input')!r}: must be a finite number (not .inf or .nan)")
        else:
            problems.append(f"{where}={e.get('input')!r}: {e['msg']}")
    return problems


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides in place; values are parsed as YAML (``x=1e-5`` → float)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r} must look like section.key=value"], "command line")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {part!r} is not a section"], "command line")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a mapping, reporting every field and batch-arithmetic problem together."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = _format_validation_error(err)
        grpo, rollout = raw.get("grpo"), raw.get("rollout")
        if isinstance(grpo, dict):
            problems += [p for p in batch_arithmetic_problems(grpo) if p not in problems]
        if isinstance(rollout, dict):
            problems += [p for p in placement_problems(rollout) if p not in problems]
        raise ConfigError(problems, source) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply overrides, validate; raises `ConfigError` listing all problems."""
    path = Path(path)
    try:
        raw = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError(["top level must be a mapping of sections"], str(path))
    return config_from_dict(apply_overrides(raw, overrides or []), str(path))


def _read_text(path: Path) -> str:
    """The config file's text; a missing file, a directory, an unreadable file or bytes that are not UTF-8
    (named by line and column) are a `ConfigError` naming the file."""
    if path.is_dir():
        raise ConfigError([f"{path} is a directory, not a config file: give a YAML file (e.g. configs/*.yaml)"],
                          str(path))
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], str(path))
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError([f"cannot read {path}: {err.strerror}"], str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError([f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
                           "re-save the file as UTF-8"], str(path)) from None


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
