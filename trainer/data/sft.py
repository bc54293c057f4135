"""SFT datasets: reasoning pairs and packed instruction-tuning blocks, as optimizer batches of micro-batches.

Reasoning pairs: JSONL ``{"prompt", "response"}`` with an optional gold ``"answer"``, ``"gold"`` or
``"ground_truth"`` (`read_sft_examples`); each pair is tokenised as by `tokenize_prompt_and_output`, the
loss covering response tokens only (`pair_data`).

Packed instruction tuning (CS336 assignment 5 supplement): each line becomes one document, the
Alpaca-formatted text, tokenised, with the tokenizer's BOS in front only if the tokenizer itself adds one,
and EOS at the end. Documents (shuffled with `seed`, or in file order) are concatenated into one token
stream ``s``; example ``i`` of block length ``m`` is ``input_ids = s[i·m : (i+1)·m]``, ``labels =
s[i·m+1 : (i+1)·m+1]``. The last partial block is dropped, so there are ``(len(s) − 1) // m`` examples.
Every token is a target (no prompt masking), as in the reference (`PackedSFTDataset`, `packed_data`).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset, Subset

from trainer.config import SFTConfig
from trainer.data.batching import TokenBatch, deal_micro_batches, pack_micro_batches
from trainer.data.jsonl import DatasetFormatError, read_jsonl, read_jsonl_records
from trainer.data.prompts import ALPACA
from trainer.data.sampler import epoch_batches, step_stream, steps_per_epoch
from trainer.data.tokenization import pair_batch

GOLD_KEYS = ("answer", "gold", "ground_truth")  # optional gold field of an SFT line (CS336's: ground_truth)


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    gold: str | None = None
    where: str = ""  # "file:line", for error messages


def read_sft_examples(path: str | Path) -> list[SFTExample]:
    """``{"prompt", "response"[, "answer" | "gold" | "ground_truth"]}`` lines of `path` (errors name file and
    line); the first gold key present is used. A numeric gold (``"answer": 5``) becomes its ``str`` ("5"),
    as CS336 converts numeric ground truth; any other non-string gold is a `DatasetFormatError`."""
    records = read_jsonl_records(path, ("prompt", "response"), (), "data.sft_path")
    return [
        SFTExample(r["prompt"], r["response"], _gold_of(r, f"{path}:{n}"), f"{path}:{n}") for n, r in records
    ]


def _gold_of(record: dict[str, Any], where: str) -> str | None:
    key = next((k for k in GOLD_KEYS if k in record), None)
    if key is None:
        return None
    gold = record[key]
    if isinstance(gold, str):
        return gold
    if isinstance(gold, int | float) and not isinstance(gold, bool):
        if not math.isfinite(gold):
            raise DatasetFormatError(f"{where}: {key!r} is {gold}, not a finite number")
        return str(gold)
    raise DatasetFormatError(f"{where}: {key!r} must be a string or a number, got {type(gold).__name__}")


class Tokenizer(Protocol):
    """The part of a HF tokenizer used here."""

    bos_token_id: int | None
    eos_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Mapping[str, Any]: ...


def tokenizer_adds_bos(tokenizer: Tokenizer) -> bool:
    """True iff tokenising with special tokens puts the tokenizer's BOS id in front (checked, not assumed)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special: list[int] = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without: list[int] = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return len(with_special) > len(without) and with_special[0] == bos


def read_sft_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a JSONL file; blank lines are skipped.

    Raises `DatasetFormatError` (a ValueError) naming the file, the 1-based line number and the problem
    (invalid JSON, not an object, a missing key, a non-string value).
    """
    return [(r["prompt"], r["response"]) for _, r in read_jsonl(path, ("prompt", "response"))]


class PackedSFTDataset(Dataset[dict[str, torch.Tensor]]):
    """Fixed-length blocks of the concatenated, tokenised documents (module docstring).

    ``dataset[i]`` is ``{"input_ids": (seq_length,) long, "labels": (seq_length,) long}``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        dataset_path: str | Path,
        seq_length: int,
        shuffle: bool,
        seed: int = 0,
        template: str = ALPACA,
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1; got {seq_length}")
        if tokenizer.eos_token_id is None:
            raise ValueError("PackedSFTDataset needs a tokenizer with an EOS token")
        pairs = read_sft_jsonl(dataset_path)
        if shuffle:
            random.Random(seed).shuffle(pairs)
        prefix = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
        stream: list[int] = []
        for prompt, response in pairs:
            text = template.format(instruction=prompt, response=response)
            ids: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            stream.extend([*prefix, *ids, tokenizer.eos_token_id])  # type: ignore[list-item]
        self.seq_length = seq_length
        self.tokens = torch.tensor(stream, dtype=torch.long)  # (stream_len,)
        self._n = max(0, (len(stream) - 1) // seq_length)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} examples")
        i %= self._n
        m = self.seq_length
        return {
            "input_ids": self.tokens[i * m : (i + 1) * m],  # (seq_length,)
            "labels": self.tokens[i * m + 1 : (i + 1) * m + 1],  # (seq_length,)
        }


class BatchIterator:
    """One epoch of stacked batches over a map-style dataset of equal-shape tensor dicts.

    ``len() == ceil(len(dataset) / batch_size)``; the last batch may be short. With `shuffle`, each
    ``iter()`` draws a fresh permutation from a generator seeded with `seed` (reproducible sequence of
    epochs).
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, torch.Tensor]] | Dataset[dict[str, torch.Tensor]],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._rng = random.Random(seed)

    def _size(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return math.ceil(self._size() / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = list(range(self._size()))
        if self.shuffle:
            self._rng.shuffle(order)
        for start in range(0, len(order), self.batch_size):
            items = [self.dataset[j] for j in order[start : start + self.batch_size]]
            yield {key: torch.stack([item[key] for item in items]) for key in items[0]}


def iterate_batches(
    dataset: Sequence[Mapping[str, torch.Tensor]] | Dataset[dict[str, torch.Tensor]],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
) -> BatchIterator:
    """One epoch of batches ``{"input_ids": (batch, m), "labels": (batch, m)}``; ``len = ceil(n / bs)``."""
    return BatchIterator(dataset, batch_size, shuffle, seed)


# ---- optimizer batches of this rank's micro-batches ------------------------------------------------
@dataclass
class SFTData:
    """Training data as, per epoch, optimizer batches of this rank's micro-batches; held-out micro-batches."""

    n_train: int
    steps_per_epoch: int
    epoch: Callable[[int], Iterator[list[TokenBatch]]]
    heldout: list[TokenBatch]

    def stream(self, start_step: int) -> Iterator[list[TokenBatch]]:
        """Micro-batches of every optimizer step after `start_step`, cycling over epochs."""
        return step_stream(self.epoch, self.steps_per_epoch, start_step)


def pair_data(tokenizer: Any, train: Sequence[SFTExample], held: Sequence[SFTExample], sft: SFTConfig,
              seed: int, rank: int, world: int) -> SFTData:
    """Reasoning pairs: optimizer batches of ``sft.batch_size`` rows (a fresh seeded shuffle each epoch),
    each rank taking rows ``rank::world`` in ``sft.gradient_accumulation_steps`` micro-batches
    (`deal_micro_batches`: a rank short of rows pads with zero-weight stand-ins)."""
    micro = max(1, sft.batch_size // sft.gradient_accumulation_steps)

    def batch_of(exs: Sequence[SFTExample]) -> TokenBatch:
        return pair_batch(tokenizer, [ex.prompt for ex in exs], [ex.response for ex in exs])

    def epoch(e: int) -> Iterator[list[TokenBatch]]:
        for rows in epoch_batches(len(train), sft.batch_size, seed * 100_003 + e):
            micro_rows = deal_micro_batches(rows, sft.gradient_accumulation_steps, rank, world)
            yield pack_micro_batches(micro_rows, lambda m: batch_of([train[i] for i in m]))

    heldout = [batch_of(held[i : i + micro]) for i in range(0, len(held), micro)]
    return SFTData(len(train), steps_per_epoch(len(train), sft.batch_size), epoch, heldout)


def packed_data(tokenizer: Tokenizer, path: str | Path, sft: SFTConfig, seed: int, rank: int,
                world: int) -> SFTData:
    """Packed blocks of ``sft.seq_length`` tokens; the last ``validation_fraction`` of the blocks is held
    out (a document may straddle the boundary) and ``max_examples`` caps the training blocks."""
    dataset = PackedSFTDataset(tokenizer, str(path), sft.seq_length, shuffle=True, seed=seed)
    n_held = 0 if sft.validation_fraction == 0 else max(1, round(sft.validation_fraction * len(dataset)))
    train_set = Subset(dataset, range(len(dataset) - n_held)[: sft.max_examples])
    if len(train_set) == 0:
        raise ValueError(
            f"{path}: too little text for one training block of "
            f"sft.seq_length={sft.seq_length} tokens plus the held-out blocks"
        )

    def rows_of(batch: dict[str, torch.Tensor], rows: list[int]) -> TokenBatch:
        return _blocks({k: v[rows] for k, v in batch.items()})

    def epoch(e: int) -> Iterator[list[TokenBatch]]:
        for batch in iterate_batches(train_set, sft.batch_size, shuffle=True, seed=seed * 100_003 + e):
            micro_rows = deal_micro_batches(
                range(len(batch["input_ids"])), sft.gradient_accumulation_steps, rank, world
            )
            yield pack_micro_batches(micro_rows, functools.partial(rows_of, batch))

    micro = max(1, sft.batch_size // sft.gradient_accumulation_steps)
    held_set = Subset(dataset, range(len(dataset) - n_held, len(dataset)))
    heldout = [_blocks(b) for b in iterate_batches(held_set, micro, shuffle=False)] if n_held else []
    return SFTData(len(train_set), steps_per_epoch(len(train_set), sft.batch_size), epoch, heldout)


def _blocks(batch: dict[str, torch.Tensor]) -> TokenBatch:
    ones = torch.ones_like(batch["input_ids"])  # (b, seq_length): every token is a target
    return TokenBatch(batch["input_ids"], batch["labels"], ones.bool(), ones)
