"""Build tiny, seeded, random-init models and a byte-level BPE tokenizer locally (no hub access).

`build_tiny(out_dir)` writes two self-contained checkpoints, each loadable with
`AutoTokenizer.from_pretrained(path)` / `AutoModelForCausalLM.from_pretrained(path)` exactly like a
user's checkpoint:

- ``out_dir/tiny-gpt2``: `GPT2LMHeadModel` (2 layers, 64 hidden, 2 heads).
- ``out_dir/tiny-qwen2``: `Qwen2ForCausalLM` (2 layers, 128 hidden, 2 heads → head_dim 64, which vLLM's
  CPU attention kernels need: head_dim ≥ 32).

The tokenizer is trained with `tokenizers` on a generated corpus (arithmetic, GSM8K-like sentences and the
prompt templates), so digits, operators and the `<think>`/`<answer>` tags tokenize compactly.

`write_tiny_data(out_dir)` writes the data of the tiny SFT and DPO configs beside them, from the synthetic
arithmetic task: ``sft_arithmetic.jsonl`` (200 r1_zero reasoning pairs on single-digit addition) and
``preferences_arithmetic.jsonl`` (400 pairs "What is a + b?" for a, b in 0..19: chosen the right sum,
rejected one 10 too big).

Usage: ``python -m trainer.tools.tiny OUT_DIR`` (or ``reasonrl tiny OUT_DIR``): models and data.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from trainer.data.prompts import format_prompt
from trainer.data.tasks import make_arithmetic

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 1024
MAX_POSITIONS = 2048

_NAMES = ["Janet", "Tom", "Maria", "Ali", "Chen", "Sara", "Lee", "Ravi", "Olga", "Ben"]
_THINGS = ["apples", "eggs", "books", "marbles", "dollars", "cookies", "pencils", "cards", "shells", "stamps"]
_TEMPLATES = [
    "{n} has {a} {t}. {n} buys {b} more {t}. How many {t} does {n} have now?",
    "{n} had {a} {t} and gave away {b}. How many {t} are left?",
    "Each box holds {a} {t}. {n} has {b} boxes. How many {t} are there in total?",
    "{n} earns ${a} per hour and works {b} hours. How much money does {n} make?",
    "A shop sells {t} for ${a} each. {n} pays for {b} of them. What is the total cost?",
]
_PROMPT_TEXT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>.\nUser: {q}\nAssistant: <think>"
)
_ALPACA_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{q}\n\n### Response:\n{r}"
)


def tiny_corpus(n_lines: int = 600, seed: int = 0) -> list[str]:
    """Generated training text for the tokenizer: arithmetic, word problems, prompt templates."""
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = rng.choice(_TEMPLATES).format(n=rng.choice(_NAMES), t=rng.choice(_THINGS), a=a, b=b)
        lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {value}. #### {value:,}")
        lines.append(f"<think> {a} {op} {b} = {value} </think> <answer> {value} </answer>")
        lines.append(question)
        if i % 50 == 0:
            lines.append(_PROMPT_TEXT.format(q=question))
            lines.append(_ALPACA_TEXT.format(q=question, r=f"The answer is {value}."))
    return lines


def build_tokenizer(seed: int = 0) -> Any:  # PreTrainedTokenizerFast
    """Train a byte-level BPE tokenizer on `tiny_corpus` with EOS and pad special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(seed=seed), trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def _gpt2_config(tokenizer: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=MAX_POSITIONS, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _qwen2_config(tokenizer: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``tiny-gpt2`` and ``tiny-qwen2`` checkpoints (model + tokenizer) under `out_dir`."""
    import torch
    from transformers import GPT2LMHeadModel, Qwen2ForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(seed)
    paths: dict[str, Path] = {}
    builders: list[tuple[str, Any, Any]] = [
        ("tiny-gpt2", GPT2LMHeadModel, _gpt2_config),
        ("tiny-qwen2", Qwen2ForCausalLM, _qwen2_config),
    ]
    for name, model_cls, config_fn in builders:
        torch.manual_seed(seed)
        model: Any = model_cls(config_fn(tokenizer))
        model.to(torch.float32)
        path = out / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def sft_rows(n: int = 200, seed: int = 5) -> list[dict[str, str]]:
    """r1_zero reasoning SFT lines ``{"prompt", "response", "answer"}`` on single-digit addition."""
    return [{"prompt": format_prompt("r1_zero", question=ex.question),
             "response": f" {ex.solution} </think> <answer> {ex.answer} </answer>", "answer": ex.answer}
            for ex in make_arithmetic(n, seed=seed, level=1)]


def preference_rows() -> list[dict[str, str]]:
    """``{"prompt", "chosen", "rejected"}``: "What is a + b?" for a, b in 0..19, rejected 10 too big."""
    return [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}", "rejected": f"{a} + {b} = {a + b + 10}"}
            for a in range(20) for b in range(20)]


def write_tiny_data(out_dir: str | Path) -> dict[str, Path]:
    """Write the tiny SFT and DPO data files under `out_dir` (module docstring); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sft": out / "sft_arithmetic.jsonl", "dpo": out / "preferences_arithmetic.jsonl"}
    for key, rows in (("sft", sft_rows()), ("dpo", preference_rows())):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reasonrl tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write tiny-gpt2/, tiny-qwen2/ and the tiny SFT/DPO data into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokenizer (default 0)")
    args = parser.parse_args(argv)
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        parser.error(f"{args.out_dir} is a file, not a directory")
    try:
        written = build_tiny(args.out_dir, args.seed) | write_tiny_data(args.out_dir)
    except OSError as err:  # unwritable: one line, not a traceback
        parser.exit(1, f"{parser.prog}: error: cannot write under {args.out_dir}: {err}\n")
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
