"""`reasonrl eval`: evaluate any checkpoint (or the config's base model: the zero-shot baseline).

Results go beside what was evaluated: ``CHECKPOINT/eval/<time>/`` for ``--checkpoint CHECKPOINT`` (a run's
``checkpoints/step_N`` or an HF model directory), else ``<output_dir>/standalone_eval/<time>/`` (the base
model may be a hub id, with no directory of its own). Each holds ``metrics.jsonl``, the resolved
``config.yaml`` and the per-sample records ``eval/step_000000_eval.jsonl`` (copied to ``--out`` too when
given); the command prints the directory.
"""

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
    if (p / "checkpoints").is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: a run directory; give one of its checkpoints "
                                f"({p / 'checkpoints'}/step_N)")
    raise FileNotFoundError(f"--checkpoint {path}: neither an HF model dir nor a run checkpoint (no config.json)")


def check_out(out: str | None) -> None:
    """``--out`` must be a file path; checked before anything is evaluated (a folder failed after the work)."""
    if out and Path(out).is_dir():
        raise FileExistsError(f"--out {out}: a directory; give the path of the JSONL file to write")


def results_dir(cfg: RunConfig, checkpoint: str | None) -> Path:
    """A new directory name for this evaluation's results (module docstring); never one already used."""
    root = Path(checkpoint) / "eval" if checkpoint else Path(cfg.output_dir) / "standalone_eval"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = root / stamp, 1
    while out.exists():
        n += 1
        out = root / f"{stamp}-{n}"
    return out


def run_eval(cfg: RunConfig, checkpoint: str | None, out: str | None) -> dict[str, float]:
    check_out(out)
    if checkpoint:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": resolve_checkpoint(checkpoint)})})
    cfg = cfg.model_copy(update={"output_dir": str(results_dir(cfg, checkpoint))})
    with Session(cfg) as s:
        metrics = s.evaluate(0, tag="_eval")
        samples = s.run_dir / "eval" / "step_000000_eval.jsonl"
        if s.is_main:
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(samples.read_text())
            print(f"eval results: {s.run_dir} (metrics.jsonl; per-sample records: {samples}"
                  f"{f', copied to {out}' if out else ''})", flush=True)
        return metrics
