"""Random-weight checkpoints shaped exactly like real ones, for GPU benchmarks where no hub is reachable.

``python -m trainer.tools.shaped OUT_DIR [--shape qwen2.5-math-1.5b] [--dtype bfloat16]`` writes a
`Qwen2ForCausalLM` with Qwen2.5-Math-1.5B's dimensions (1.54B parameters: 28 layers, hidden 1536, MLP 8960,
12 query / 2 key-value heads, 151,936-token vocabulary, tied embeddings; from its public ``config.json``)
and random weights, plus the locally trained tiny BPE tokenizer (`trainer.tools.tiny`) padded with added tokens
``<|rN|>`` up to the model's vocabulary, so every id the random policy samples decodes. Compute per token is
that of the real model; the text is meaningless, so only speed and memory are measured with it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from trainer.tools.tiny import build_tokenizer

QWEN25_MATH_15B = {
    "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False,
}
SHAPES: dict[str, dict[str, Any]] = {"qwen2.5-math-1.5b": QWEN25_MATH_15B}


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
    logs a warning then, and nothing is written), a path under a file, or a folder this process cannot write."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out_dir}: a file, not a folder for the checkpoint")
    existing = next(p for p in (out, *out.parents) if p.exists())  # the folder that mkdir would create it in
    if not existing.is_dir():
        raise NotADirectoryError(f"{out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{out_dir}: cannot write under {existing} (permission denied)")


def build_shaped(out_dir: str | Path, shape: dict[str, Any], dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write a random `Qwen2ForCausalLM` of `shape` and its padded tokenizer to `out_dir`; returns it.

    Weights are initialised on the GPU when there is one (seconds instead of a minute for 1.5B)."""
    check_out_dir(out_dir)
    import torch
    from transformers import Qwen2ForCausalLM

    model_cls: Any = Qwen2ForCausalLM
    tokenizer = padded_tokenizer(shape["vocab_size"], seed)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = model_cls(shaped_config(shape, tokenizer)).to(getattr(torch, dtype))
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.tools.shaped", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the model and its tokenizer to")
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
