"""`reasonrl eval`: evaluate any checkpoint (or the config's base model: the zero-shot baseline)."""

from __future__ import annotations

import time
from pathlib import Path

from trainer.config import RunConfig
from trainer.session import Session


def resolve_checkpoint(path: str) -> str:
    """Accept an HF model dir or a run checkpoint dir (whose model lives in ``hf/``)."""
    p = Path(path)
    if (p / "hf" / "config.json").exists():
        return str(p / "hf")
    if (p / "config.json").exists():
        return str(p)
    raise FileNotFoundError(f"--checkpoint {path}: neither an HF model dir nor a run checkpoint (no config.json)")


def run_eval(cfg: RunConfig, checkpoint: str | None, out: str | None) -> dict[str, float]:
    if checkpoint:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": resolve_checkpoint(checkpoint)})})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = cfg.model_copy(update={"output_dir": str(Path(cfg.output_dir) / "standalone_eval" / stamp)})
    with Session(cfg) as s:
        metrics = s.evaluate(0, tag="_eval")
        if out:
            Path(out).write_text((s.run_dir / "eval" / "step_000000_eval.jsonl").read_text())
        return metrics
