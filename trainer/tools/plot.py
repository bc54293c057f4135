"""`reasonrl plot RUN_DIR`: a PNG of training reward, eval accuracy (and the largest k's pass@k, where the
evaluation drew several samples per question) and response-length curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.tracking import read_metrics

PANELS = [
    ("reward", ["reward/reward_mean", "reward/format_reward_rate"]),
    ("eval accuracy", ["eval/accuracy", "eval/format_rate"]),
    ("response length", ["rollout/response_len_mean", "eval/mean_length"]),
]


def panel_keys(keys: list[str], records: list[dict[str, Any]]) -> list[str]:
    """`keys`, and beside ``eval/accuracy`` the run's ``eval/pass@k`` of the largest k (``eval.samples_per_question``).

    >>> panel_keys(["eval/accuracy"], [{"eval/pass@1": 0.2, "eval/pass@2": 0.3}, {"eval/pass@8": 0.5}])
    ['eval/accuracy', 'eval/pass@8']
    """
    if "eval/accuracy" not in keys:
        return keys
    ks = [int(k[len("eval/pass@"):]) for r in records for k in r
          if k.startswith("eval/pass@") and k[len("eval/pass@"):].isdigit()]
    return [*keys, f"eval/pass@{max(ks)}"] if ks else keys


class PlotError(ValueError):
    """A run that cannot be plotted (no run directory, no metrics.jsonl, an undecodable record) or a PNG path
    that matplotlib cannot write."""


def run_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``; whatever keeps them from being read is a `PlotError` naming
    the path."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).exists():
        raise PlotError(f"{run_dir}: no such run directory")
    if not Path(run_dir).is_dir():
        raise PlotError(f"{run_dir}: not a directory (give the run directory that holds metrics.jsonl)")
    if not path.is_file():
        raise PlotError(f"{path}: not found (not a reasonrl run directory, or no step logged yet)")
    try:
        records = read_metrics(run_dir)
    except UnicodeDecodeError:
        raise PlotError(f"{path}: not UTF-8 text") from None
    except ValueError as err:  # an undecodable line, which read_metrics names
        raise PlotError(str(err)) from None
    if not records:
        raise PlotError(f"{path} has no records to plot")
    if not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in records):
        raise PlotError(f"{path}: not reasonrl metrics (every record needs an integer \"step\")")
    return records


def png_path(run_dir: str | Path, out: str | Path | None) -> Path:
    """Where the PNG goes: `out`, inside it when it is a directory, with ``.png`` added when it has no suffix
    (matplotlib picks the format from the suffix and adds ``.png`` itself otherwise)."""
    if not out:
        return Path(run_dir) / "curves.png"
    path = Path(out)
    if path.is_dir():
        return path / "curves.png"
    return path if path.suffix else path.with_suffix(".png")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot the run's metrics.jsonl; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run_records(run_dir)
    path = png_path(run_dir, out)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        for key in panel_keys(keys, records):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval/") else None,
                        label=key, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:  # a panel with no data has no legend (matplotlib warns about an empty one)
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if path.suffix[1:].lower() not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise PlotError(f"--out {out}: matplotlib cannot write {path.suffix} files (use .png)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
