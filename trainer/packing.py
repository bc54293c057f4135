"""Micro-batch layouts for the learner's forward pass: trimmed padding, length sorting and packing.

Rollouts are right-padded to the longest sequence of the whole rollout batch (`trainer.data.batching`), so a
micro-batch taken as-is spends compute on padding. Three layouts remove it, each exact:

- **trim** (always on): cut a micro-batch's columns to its own longest real sequence.
- **sort by length** (`length_sorted_order`): order the rows of an optimizer batch by length before
  splitting it into micro-batches, so rows of similar length share a micro-batch. Every aggregation mode of
  `trainer.masking.aggregate_loss` sums over rows with equal-sized micro-batches, so the accumulated
  gradient does not depend on which rows share a micro-batch.
- **pack** (`model.packing`): concatenate the real tokens of a micro-batch into one row, with position ids
  restarting at 0 for each sequence and no attention mask; HF models then attend within each sequence only
  (a block-diagonal causal mask under ``sdpa``/``eager``; variable-length kernels under
  ``flash_attention_2``/``flash_attention_3``, which is where packing pays: their cost is Σ lᵢ², while
  ``sdpa`` with a block mask computes the whole (Σ lᵢ)² square).

Naive twin of every layout: the padded forward ``model(input_ids, attention_mask=...)`` of
`trainer.logprobs.get_response_log_probs`; `tests/test_packing.py` checks log-probs, entropies and
gradients against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data.batching import TokenBatch
from trainer.logprobs import chunked_label_log_probs, get_response_log_probs, scale_logits


def real_lengths(tokens: TokenBatch) -> torch.Tensor:
    """Real (non-pad) input positions of each row; (batch,) long."""
    return tokens.attention_mask.sum(dim=-1)


def trim(tokens: TokenBatch) -> TokenBatch:
    """The same rows with the columns after the longest real sequence removed (right padding only)."""
    width = int(real_lengths(tokens).max()) if len(tokens) else 0
    return tokens.select_columns(slice(0, max(width, 1)))


def length_sorted_order(tokens: TokenBatch, rows: torch.Tensor) -> torch.Tensor:
    """`rows` (indices into `tokens`) ordered by real length, longest first (stable, so deterministic)."""
    lengths = real_lengths(tokens)[rows]  # (n,)
    return rows[torch.sort(lengths, descending=True, stable=True).indices]


@dataclass
class PackedRow:
    """The real tokens of a right-padded micro-batch laid end to end; tensors are (1, total_tokens)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    source_rows: torch.Tensor  # (total_tokens,) row of the padded batch each packed token came from
    source_cols: torch.Tensor  # (total_tokens,) its column there
    padded_shape: tuple[int, int]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """(1, total_tokens) per-token values back to the padded (batch, seq) layout, 0 on padding."""
        out = values.new_zeros(self.padded_shape)
        out[self.source_rows, self.source_cols] = values[0]
        return out


def pack(tokens: TokenBatch) -> PackedRow:
    """Lay the real positions of each (right-padded) row end to end; positions restart at 0 per row."""
    real = tokens.attention_mask.bool()  # (batch, seq)
    rows, cols = real.nonzero(as_tuple=True)  # row-major: each row's tokens in order
    return PackedRow(
        input_ids=tokens.input_ids[rows, cols].unsqueeze(0),
        position_ids=cols.unsqueeze(0),  # right padding: the column is the position within the sequence
        labels=tokens.labels[rows, cols].unsqueeze(0),
        source_rows=rows,
        source_cols=cols,
        padded_shape=(int(real.shape[0]), int(real.shape[1])),
    )


def forward_log_probs(
    model: torch.nn.Module, tokens: TokenBatch, *, return_token_entropy: bool = False, packed: bool = False,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """`get_response_log_probs` of a micro-batch in the trimmed (or packed) layout, returned padded.

    Returns ``{"log_probs": (batch, seq)}`` (+ ``"token_entropy"``) in `tokens`' own width, equal to the
    padded twin on real positions and exactly 0 on padding in every layout (so log-prob ratios between
    layouts are 1 there, never ``exp`` of a padding value). `temperature`: as in `get_response_log_probs`.
    """
    width = tokens.input_ids.shape[1]
    if packed:
        row = pack(tokens)
        # use_cache=False: HF detects packing from position_ids only when there is no KV cache
        logits = model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False).logits
        logits = scale_logits(logits, temperature)
        log_probs, entropy = chunked_label_log_probs(logits, row.labels, return_token_entropy=return_token_entropy)
        out = {"log_probs": row.unpack(log_probs)}
        if entropy is not None:
            out["token_entropy"] = row.unpack(entropy)
        return out
    short = trim(tokens)
    out = get_response_log_probs(model, short.input_ids, short.labels, return_token_entropy,
                                 attention_mask=short.attention_mask, temperature=temperature)
    real = short.attention_mask.bool()  # (batch, w)
    return {k: _pad_columns(torch.where(real, v, 0.0), width) for k, v in out.items()}


def _pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, w) -> (batch, width) with zeros on the right."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))
