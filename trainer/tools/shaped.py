"""Random-weight checkpoints shaped exactly like real ones, for GPU benchmarks where no hub is reachable.

``python -m trainer.tools.shaped OUT_DIR [--shape qwen2.5-math-1.5b] [--dtype bfloat16]`` writes a
`Qwen2ForCausalLM` with Qwen2.5-Math-1.5B's dimensions (1.54B parameters: 28 layers, hidden 1536, MLP 8960,
12 query / 2 key-value heads, 151,936-token vocabulary, tied embeddings; from its public ``config.json``)
and random weights, plus the locally trained tiny BPE tokenizer (`trainer.tools.tiny`) padded with added tokens
``<|rN|>`` up to the model's vocabulary, so every id the random policy samples decodes. Compute per token is
that of the real model; the text is meaningless, so only speed and memory are measured with it.

The checkpoint is written into a new folder beside OUT_DIR and renamed to it when complete, with
``reasonrl_shaped.json`` (shape, dtype, seed) written last. OUT_DIR must be new, empty or such an earlier output:
one of the same settings is kept as it is, one of other settings is replaced, and any other folder is refused
before anything is built (as `reasonrl models` and `reasonrl demo` treat theirs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from trainer.stop_signal import interrupt_in_one_line
from trainer.tools.models import save_beside
from trainer.tools.tiny import build_tokenizer

QWEN25_MATH_15B = {
    "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False,
}
SHAPES: dict[str, dict[str, Any]] = {"qwen2.5-math-1.5b": QWEN25_MATH_15B}
MARKER = "reasonrl_shaped.json"  # written last: OUT_DIR holds a complete checkpoint of the settings it records


def shaped_config(shape: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**shape, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def padded_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """The tiny BPE tokenizer with added tokens ``<|r0|>``, ``<|r1|>`` … up to `vocab_size` entries."""
    tokenizer = build_tokenizer(seed)
    tokenizer.add_tokens([f"<|r{i}|>" for i in range(vocab_size - len(tokenizer))])
    return tokenizer


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse, before anything is built, an `out_dir` that cannot take the checkpoint: a file (transformers only
    logs a warning then, and nothing is written), a path under a file, a folder holding anything but an earlier
    output of this command (it would be overwritten), or one whose parent this process cannot write (the
    checkpoint is written beside `out_dir`, then renamed to it)."""
    out = Path(out_dir)
    if out.name in ("", ".", ".."):
        raise FileExistsError(f"{out_dir}: name the checkpoint's own folder (e.g. /tmp/shaped), not . or ..")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out_dir}: a file, not a folder for the checkpoint")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out_dir}: not empty and not a checkpoint this command wrote (no {MARKER}), so it "
                              "is left as it is: give a new or empty folder")
    existing = next(p for p in out.parents if p.exists())  # the folder the checkpoint is written in, then renamed
    if not existing.is_dir():
        raise NotADirectoryError(f"{out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{out_dir}: cannot write under {existing} (permission denied)")


def build_shaped(out_dir: str | Path, shape: dict[str, Any], dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write a random `Qwen2ForCausalLM` of `shape` and its padded tokenizer to `out_dir`; returns it. An
    `out_dir` this command wrote with the same shape, dtype and seed is kept as it is (nothing is built).

    Weights are initialised on the GPU when there is one (seconds instead of a minute for 1.5B)."""
    check_out_dir(out_dir)
    out, record = Path(out_dir), {"shape": shape, "dtype": dtype, "seed": seed}
    if _recorded(out) == record:
        print(f"{out}: already holds this checkpoint (same shape, dtype and seed), kept: delete it to build again",
              file=sys.stderr)
        return out
    import torch
    from transformers import Qwen2ForCausalLM

    model_cls: Any = Qwen2ForCausalLM
    tokenizer = padded_tokenizer(shape["vocab_size"], seed)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = model_cls(shaped_config(shape, tokenizer)).to(getattr(torch, dtype))
    save_beside(out, model, tokenizer, MARKER, record, replace_marked=True)  # an earlier output of other settings
    return out


def _recorded(out: Path) -> Any:
    """The settings an earlier build recorded in `out` (None where it holds no readable marker)."""
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> None:
    with interrupt_in_one_line():  # Ctrl-C: one line, then death by SIGINT, as `reasonrl` does
        _main(argv)


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.tools.shaped", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the model and its tokenizer to: new, empty or an "
                        "earlier output of this command (kept when of the same settings, else replaced)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-math-1.5b",
                        help="whose dimensions (default qwen2.5-math-1.5b)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="weight dtype (default bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokenizer (default 0)")
    args = parser.parse_args(argv)
    try:
        check_out_dir(args.out_dir)
    except OSError as err:
        parser.error(str(err))
    try:
        print(build_shaped(args.out_dir, SHAPES[args.shape], args.dtype, args.seed))
    except OSError as err:  # a failed write (disk full): one line, not a traceback
        parser.exit(1, f"{parser.prog}: error: cannot write {args.out_dir}: {err}\n")


if __name__ == "__main__":
    main()
