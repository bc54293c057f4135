"""Turn sampled token ids into learner tensors, and split batches into micro-batches.

`pack_token_ids` is the token-id twin of `trainer.tokenization.tokenize_prompt_and_output`: it uses the
ids the engine sampled (re-tokenising decoded text can give different tokens), concatenates prompt and
response, right-pads, and shifts by one. For ids that round-trip through the tokenizer the two agree
(tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """Right-padded learner inputs; every tensor is (batch, seq) where seq = max(len(prompt+response)) - 1."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    response_mask: torch.Tensor  # bool: label is a response token
    attention_mask: torch.Tensor  # long: input position is a real token

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.labels, self.response_mask,
                                                   self.attention_mask)))

    def select(self, index: slice | torch.Tensor) -> TokenBatch:
        return TokenBatch(self.input_ids[index], self.labels[index], self.response_mask[index],
                          self.attention_mask[index])

    def select_columns(self, columns: slice) -> TokenBatch:
        return TokenBatch(self.input_ids[:, columns], self.labels[:, columns], self.response_mask[:, columns],
                          self.attention_mask[:, columns])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def pack_token_ids(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   pad_id: int) -> TokenBatch:
    """Concatenate, right-pad with `pad_id`, and shift: input_ids drops the last token, labels the first."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    full = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(len(f) for f in full)
    ids = torch.full((len(full), width), pad_id, dtype=torch.long)  # (batch, width)
    is_response = torch.zeros((len(full), width), dtype=torch.bool)
    real = torch.zeros((len(full), width), dtype=torch.long)
    for i, (p, f) in enumerate(zip(prompt_ids, full, strict=True)):
        ids[i, : len(f)] = torch.tensor(f, dtype=torch.long)
        is_response[i, len(p) : len(f)] = True
        real[i, : len(f)] = 1
    return TokenBatch(ids[:, :-1], ids[:, 1:], is_response[:, 1:], real[:, :-1])


def pad_float_rows(rows: Sequence[Sequence[float]], offsets: Sequence[int], width: int) -> torch.Tensor:
    """Place each row at its offset in a zero (batch, width) float tensor (e.g. rollout log-probs)."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (row, start) in enumerate(zip(rows, offsets, strict=True)):
        values = torch.tensor(list(row), dtype=torch.float32)[: max(0, width - start)]
        out[i, start : start + len(values)] = values
    return out


def micro_batch_slices(n: int, micro_batch_size: int) -> list[slice]:
    """Consecutive slices of size `micro_batch_size` covering range(n) (n must divide evenly)."""
    if n % micro_batch_size:
        raise ValueError(f"batch of {n} does not split into micro-batches of {micro_batch_size}")
    return [slice(i, i + micro_batch_size) for i in range(0, n, micro_batch_size)]
