"""Turn sampled token ids into learner tensors, and split batches into micro-batches.

`deal_micro_batches` deals the rows of one optimizer batch to the data-parallel ranks so that every rank
runs the same number of micro-batches (DDP all-reduces and ZeRO-3 parameter gathers are collective: a rank
with one forward/backward fewer hangs the others); a rank short of rows runs zero-weight stand-ins.

`pack_token_ids` is the token-id twin of `trainer.data.tokenization.tokenize_prompt_and_output`: it uses the
ids the engine sampled (re-tokenising decoded text can give different tokens), concatenates prompt and
response, right-pads, and shifts by one. For ids that round-trip through the tokenizer the two agree
(tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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

    def zero_weight(self) -> TokenBatch:
        """The same rows with an all-False response mask: a forward/backward whose loss and gradient are
        exactly 0 under every `trainer.losses.aggregate_loss` mode (and that adds no response token)."""
        return TokenBatch(self.input_ids, self.labels, torch.zeros_like(self.response_mask), self.attention_mask)


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


@dataclass(frozen=True)
class MicroRows:
    """Row indices of one micro-batch; a `dummy` one is a zero-weight stand-in (`TokenBatch.zero_weight`)
    that keeps a rank short of rows in step with the others: its row also trains elsewhere, or nowhere."""

    rows: list[int]
    dummy: bool = False


def _chunk_count(n: int, grad_accum: int) -> int:
    """Micro-batches of `n` rows cut in chunks of ``ceil(n / grad_accum)`` (0 for no rows)."""
    return math.ceil(n / math.ceil(n / grad_accum)) if n else 0


def micro_batches_per_rank(n_rows: int, grad_accum: int, world: int = 1) -> int:
    """Micro-batches every rank runs for an optimizer batch of `n_rows`: the most any rank's share
    ``rows[rank::world]`` is cut into. The same on every rank, from numbers every rank knows (no
    communication). Not monotone in the share (5 rows, 4 steps: 3 chunks of 2, 2, 1; 4 rows: 4 chunks)."""
    if grad_accum < 1 or world < 1:
        raise ValueError(f"gradient accumulation steps and world size must be >= 1; got {grad_accum}, {world}")
    shares = {n_rows // world, -(-n_rows // world)}  # the two share sizes rows[rank::world] can have
    return max(_chunk_count(m, grad_accum) for m in shares)


def deal_micro_batches(rows: Sequence[int], grad_accum: int, rank: int = 0, world: int = 1) -> list[MicroRows]:
    """This rank's micro-batches of one optimizer batch `rows` (the same list on every rank).

    The rank's rows ``rows[rank::world]`` are cut in chunks of ``ceil(len / grad_accum)`` (at most
    `grad_accum` micro-batches; on one process exactly the old split, no dummy ever), then padded with
    one-row ``dummy`` micro-batches up to `micro_batches_per_rank`, so every rank runs the same number of
    forward/backward passes — also a rank with no row at all (fewer rows than ranks). The dummy's row is
    the rank's first row, or the batch's first. ``[]`` only for an empty batch.

    >>> [(m.rows, m.dummy) for m in deal_micro_batches([0, 1, 2, 3, 4], 4, rank=1, world=2)]
    [([1], False), ([3], False), ([1], True)]
    """
    rows = list(rows)
    if not rows:
        return []
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    mine = rows[rank::world]
    size = max(1, math.ceil(len(mine) / grad_accum))
    real = [MicroRows(mine[i : i + size]) for i in range(0, len(mine), size)]
    stand_in = MicroRows([(mine or rows)[0]], dummy=True)
    return real + [stand_in] * (micro_batches_per_rank(len(rows), grad_accum, world) - len(real))


def pack_micro_batches(micro: Sequence[MicroRows], pack: Callable[[list[int]], TokenBatch]) -> list[TokenBatch]:
    """`pack` each micro-batch's rows into a `TokenBatch`; dummies get their response mask zeroed."""
    out = []
    for m in micro:
        batch = pack(m.rows)
        out.append(batch.zero_weight() if m.dummy else batch)
    return out
