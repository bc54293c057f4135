"""Tokenise (prompt, output) pairs into shifted ``input_ids`` / ``labels`` with a response mask (CS336 §4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trainer.data.batching import TokenBatch, pack_token_ids


def pad_token_id_of(tokenizer: Any) -> int:
    """The id used for right padding: the tokenizer's pad id, or its EOS id when it has no pad token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
    return int(pad_id)


def tokenize_prompt_and_output(
    prompt_strs: list[str],
    output_strs: list[str],
    tokenizer: Any,
) -> dict[str, torch.Tensor]:
    """Tokenise each prompt and output separately, concatenate, right-pad, and shift for next-token loss.

    For example ``i`` with prompt tokens ``p`` and output tokens ``o`` (no special tokens added), the
    sequence is ``x = p ⧺ o ⧺ pad…`` of length ``T = max_j(|p_j| + |o_j|)``; then
    ``input_ids = x[:-1]``, ``labels = x[1:]`` and ``response_mask[t] = 1`` iff ``labels[t]`` is an output
    token, i.e. ``|p| - 1 <= t < |p| + |o| - 1``. Padding uses the pad id (EOS if there is no pad token).

    Returns:
        ``input_ids`` (batch, T-1) long, ``labels`` (batch, T-1) long,
        ``response_mask`` (batch, T-1) **bool**.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"got {len(prompt_strs)} prompts but {len(output_strs)} outputs")
    if not prompt_strs:
        raise ValueError("tokenize_prompt_and_output needs at least one (prompt, output) pair")
    pad_id = pad_token_id_of(tokenizer)
    prompt_ids: list[list[int]] = tokenizer(prompt_strs, add_special_tokens=False)["input_ids"]
    output_ids: list[list[int]] = tokenizer(output_strs, add_special_tokens=False)["input_ids"]
    total = max(len(p) + len(o) for p, o in zip(prompt_ids, output_ids, strict=True))
    if total < 2:
        raise ValueError("every (prompt, output) pair tokenises to fewer than 2 tokens; nothing to predict")

    full = torch.full((len(prompt_strs), total), pad_id, dtype=torch.long)  # (batch, T)
    is_output = torch.zeros((len(prompt_strs), total), dtype=torch.bool)  # (batch, T)
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        full[i, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        is_output[i, len(p) : len(p) + len(o)] = True
    return {
        "input_ids": full[:, :-1],  # (batch, T-1)
        "labels": full[:, 1:],  # (batch, T-1)
        "response_mask": is_output[:, 1:],  # (batch, T-1) bool
    }


def pair_batch(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]) -> TokenBatch:
    """`tokenize_prompt_and_output` as a `TokenBatch`: the same ids, labels and response mask (built by its
    token-id twin `pack_token_ids`), plus the attention mask of the real tokens, 0 on the right padding, so
    that `real_lengths` (throughput, MFU) and `model.packing` leave the padding out."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} outputs")
    if not prompts:
        raise ValueError("pair_batch needs at least one (prompt, output) pair")
    prompt_ids: list[list[int]] = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids: list[list[int]] = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    if max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)) < 2:
        raise ValueError("every (prompt, output) pair tokenises to fewer than 2 tokens; nothing to predict")
    return pack_token_ids(prompt_ids, response_ids, pad_token_id_of(tokenizer))
