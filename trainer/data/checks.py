"""A run's data, checked before anything is loaded or written, and the items training cannot use, skipped.

`check_data` reads every data file the configured mode will train or evaluate on, so that a missing file,
an empty or blank-only one, or an SFT file whose responses are all empty is one clear error naming the
file, raised before the model is loaded and before ``config.yaml`` is written (`trainer.session.Session`
calls it first). Items that are unusable one by one are skipped, counted and logged (`skip_unusable`):
prompts longer than the rollout engine's context (`drop_long_prompts`: vLLM would reject the whole batch)
and DPO pairs whose chosen and rejected responses are the same text (`drop_identical_pairs`: their loss
is constant, so the gradient is numerical noise). More than ``data.max_skipped_fraction`` of a dataset
skipped is an error: the data, or the context length, is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from trainer.config import RunConfig
from trainer.data.jsonl import DatasetFormatError
from trainer.data.preference import PreferencePair, read_preference_pairs
from trainer.data.prompts import format_prompt
from trainer.data.sft import read_sft_examples
from trainer.data.tasks import Columns, Example, columns_for, load_task

logger = logging.getLogger("reasonrl")
T = TypeVar("T")


def task_name(cfg: RunConfig) -> str:
    """The `load_task` name of the configured task (``arithmetic:<level>[:heldout]``, ``gsm8k``, ``math``)."""
    d = cfg.data
    return f"arithmetic:{d.arithmetic_level}{':heldout' * d.arithmetic_heldout}" if d.task == "arithmetic" else d.task


def task_columns(cfg: RunConfig) -> Columns | None:
    """The configured dataset's columns, answer parser and hub configuration (None for generated tasks)."""
    d = cfg.data
    return None if d.task == "arithmetic" else columns_for(
        d.task, d.question_column, d.answer_column, d.answer_parser, d.hub_config)


def check_data(cfg: RunConfig) -> None:
    """Read the data files of `cfg`'s mode (module docstring); raises `FileNotFoundError` or
    `DatasetFormatError` naming the config key or the file (and line). Hub datasets are loaded too (from the
    cache after the first time), so one that cannot be reached fails here (`DatasetUnavailableError`)."""
    d = cfg.data
    if cfg.mode in ("grpo", "ei") and d.task != "arithmetic":
        load_task(task_name(cfg), d.train_source, "train", d.train_limit, cfg.seed, task_columns(cfg))
    if cfg.mode == "sft":
        if not d.sft_path:
            raise FileNotFoundError('mode \'sft\' needs data.sft_path (JSONL of {"prompt", "response"})')
        examples = read_sft_examples(d.sft_path)
        if not cfg.sft.packed and not any(ex.response for ex in examples):
            raise DatasetFormatError(
                f"{d.sft_path}: every 'response' is empty ({len(examples)} lines, from {examples[0].where}): "
                "SFT trains on response tokens only, so there is nothing to learn")
    if cfg.mode == "dpo":
        if not d.preference_path:
            raise FileNotFoundError('mode "dpo" needs data.preference_path (JSONL of {"prompt","chosen","rejected"})')
        usable, _ = drop_identical_pairs(read_preference_pairs(d.preference_path), d.max_skipped_fraction,
                                         d.preference_path)
        if len(usable) < 2:
            raise DatasetFormatError(f"{d.preference_path}: {len(usable)} usable pair(s): DPO needs at least 2 (a "
                                     "share is held out to validate, dpo.validation_fraction)")
    evaluates = cfg.mode in ("grpo", "ei") or (cfg.mode == "sft" and cfg.sft.eval_generation)
    if evaluates and d.task != "arithmetic":
        load_task(task_name(cfg), d.eval_source, "test", cfg.eval.limit or d.eval_limit, cfg.seed, task_columns(cfg))


def skip_unusable(items: Sequence[T], unusable: Callable[[T], bool], what: str, source: str,
                  max_fraction: float, where: Callable[[T], str] = lambda _: "") -> tuple[list[T], int]:
    """(the usable items, how many were skipped): the skip is logged as a warning naming the first few, and
    more than `max_fraction` of `items` skipped is a `DatasetFormatError` (``data.max_skipped_fraction``)."""
    usable: list[T] = []
    skipped: list[T] = []
    for item in items:
        (skipped if unusable(item) else usable).append(item)
    if not skipped:
        return usable, 0
    first = ", ".join(w for w in (where(x) for x in skipped[:3]) if w)
    first = f" ({first}{', ...' if len(skipped) > 3 else ''})" if first else ""
    fraction = len(skipped) / len(items)
    if not usable:
        raise DatasetFormatError(f"{source}: all {len(items)} {what}{first}: nothing left to use; fix the data")
    if fraction > max_fraction:
        raise DatasetFormatError(
            f"{source}: {len(skipped)} of {len(items)} {what}{first}: more than data.max_skipped_fraction="
            f"{max_fraction} of the data; fix the data, or raise data.max_skipped_fraction to skip them")
    logger.warning("%s: skipping %d of %d %s%s", source, len(skipped), len(items), what, first)
    return usable, len(skipped)


def drop_identical_pairs(pairs: Sequence[PreferencePair], max_fraction: float,
                         source: str) -> tuple[list[PreferencePair], int]:
    """The pairs whose chosen and rejected responses differ, and how many did not (`skip_unusable`)."""
    return skip_unusable(pairs, lambda p: p.chosen == p.rejected, "pairs with chosen == rejected (no preference)",
                         source, max_fraction, lambda p: p.where)


def prompt_lengths(examples: Sequence[Example], template: str, tokenizer: Any, limit: int | None) -> list[int]:
    """The token count of each example's formatted prompt, as the engines encode it (the tokenizer's default
    special tokens). A prompt of more characters than `limit` times the longest vocabulary entry counts as
    `limit` without being tokenized (a 10 MB line would take seconds to tokenize); `limit` None: all counted."""
    longest_token = max((len(t) for t in tokenizer.get_vocab()), default=1) if limit is not None else 0

    def count(ex: Example) -> int:
        prompt = format_prompt(template, question=ex.question)
        if limit is not None and len(prompt) > limit * max(longest_token, 1):
            return limit
        return len(tokenizer(prompt)["input_ids"])

    return [count(ex) for ex in examples]


def drop_long_prompts(examples: Sequence[Example], template: str, tokenizer: Any, limit: int | None,
                      max_fraction: float, source: str, lengths: Sequence[int] | None = None) -> tuple[list[Example], int]:
    """The examples whose formatted prompt leaves the engine room for a response (fewer than `limit` tokens,
    `prompt_lengths`, or the `lengths` given), and how many did not. `limit` None: no limit known, nothing
    dropped."""
    if limit is None:
        return list(examples), 0
    counted = list(zip(examples, prompt_lengths(examples, template, tokenizer, limit) if lengths is None else lengths,
                       strict=True))
    what = f"prompts of {limit} tokens or more (the rollout engine's context: no room for a response)"
    kept, skipped = skip_unusable(counted, lambda pair: pair[1] >= limit, what, source, max_fraction,
                                  lambda pair: f"{pair[0].question[:40]!r}")
    return [ex for ex, _ in kept], skipped


def context_limit(cfg: RunConfig, model_config: Any, engine_limit: int | None = None) -> int | None:
    """The prompt + response token limit of the rollout engine: `engine_limit` (a built engine's
    `max_model_len`) where known, else ``rollout.max_model_len`` for vLLM, and never more than the model's
    own positions (``max_position_embeddings`` / ``n_positions``; the HF engine's only limit)."""
    own = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    configured = engine_limit or (cfg.rollout.max_model_len if cfg.rollout.engine == "vllm" and
                                  cfg.rollout.placement != "remote" else None)
    limits = [x for x in (configured, own) if isinstance(x, int)]
    return min(limits) if limits else None
