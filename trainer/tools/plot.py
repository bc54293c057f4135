"""`reasonrl plot RUN_DIR`: a PNG of training reward, eval accuracy and response-length curves."""

from __future__ import annotations

from pathlib import Path

from trainer.tracking import read_metrics

PANELS = [
    ("reward", ["reward/reward_mean", "reward/format_reward_rate"]),
    ("eval accuracy", ["eval/accuracy", "eval/format_rate"]),
    ("response length", ["rollout/response_len_mean", "eval/mean_length"]),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot the run's metrics.jsonl; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no records to plot")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval/") else None,
                        label=key, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
