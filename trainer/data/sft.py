"""Packed SFT data (CS336 assignment 5 supplement, instruction tuning): documents concatenated, cut in blocks.

Each JSONL line ``{"prompt": ..., "response": ...}`` becomes one document: the Alpaca-formatted text,
tokenised, with the tokenizer's BOS in front only if the tokenizer itself adds one, and EOS at the end.
Documents (shuffled with `seed`, or in file order) are concatenated into one token stream ``s``; example
``i`` of block length ``m`` is ``input_ids = s[i·m : (i+1)·m]``, ``labels = s[i·m+1 : (i+1)·m+1]``. The
last partial block is dropped, so there are ``(len(s) − 1) // m`` examples. Every token is a target (no
prompt masking), as in the reference.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from trainer.data.jsonl import read_jsonl
from trainer.data.prompts import ALPACA


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
