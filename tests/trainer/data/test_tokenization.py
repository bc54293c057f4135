"""tokenize_prompt_and_output: hand case with a character tokenizer, naive reference on the tiny BPE."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from trainer.data.tokenization import tokenize_prompt_and_output


class CharTokenizer:
    """One id per character: a=10, b=11, c=12, d=13, ...; records what it was asked."""

    def __init__(self, pad_token_id: int | None = 1, eos_token_id: int | None = 0) -> None:
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.calls: list[bool] = []

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        self.calls.append(add_special_tokens)
        return {"input_ids": [[ord(ch) - ord("a") + 10 for ch in t] for t in texts]}


def test_hand_case_char_tokenizer() -> None:
    """prompts ["ab", "a"], outputs ["c", "bcd"], pad 1:
    full rows [10, 11, 12, 1] and [10, 11, 12, 13] (T = 4);
    input_ids = [[10, 11, 12], [10, 11, 12]], labels = [[11, 12, 1], [11, 12, 13]],
    response_mask = [[F, T, F], [T, T, T]] (labels that are output tokens)."""
    tok = CharTokenizer()
    out = tokenize_prompt_and_output(["ab", "a"], ["c", "bcd"], tok)
    assert out["input_ids"].tolist() == [[10, 11, 12], [10, 11, 12]]
    assert out["labels"].tolist() == [[11, 12, 1], [11, 12, 13]]
    assert out["response_mask"].tolist() == [[False, True, False], [True, True, True]]
    assert out["response_mask"].dtype == torch.bool
    assert out["input_ids"].dtype == torch.long
    assert tok.calls == [False, False]  # no special tokens added


def test_pads_with_eos_when_no_pad_token() -> None:
    """Same as above without a pad token: row 0 is padded with EOS id 0 → labels[0] = [11, 12, 0]."""
    out = tokenize_prompt_and_output(["ab", "a"], ["c", "bcd"], CharTokenizer(pad_token_id=None))
    assert out["labels"].tolist() == [[11, 12, 0], [11, 12, 13]]


def test_errors() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        tokenize_prompt_and_output(["a", "b"], ["c"], CharTokenizer())
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        tokenize_prompt_and_output(["a"], ["b"], CharTokenizer(pad_token_id=None, eos_token_id=None))


def test_matches_naive_on_tiny_bpe(tiny_gpt2_path: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    prompts = ["What is 2 + 3?", "Janet has 16 eggs. How many are left?", "Q"]
    outputs = [" <think> 2 + 3 = 5 </think> <answer> 5 </answer>", " 9", " The answer is 1,234."]
    out = tokenize_prompt_and_output(prompts, outputs, tok)

    rows = []
    for p, o in zip(prompts, outputs, strict=True):
        p_ids = tok.encode(p, add_special_tokens=False)
        o_ids = tok.encode(o, add_special_tokens=False)
        rows.append((p_ids, o_ids))
    width = max(len(p) + len(o) for p, o in rows)
    assert out["input_ids"].shape == out["labels"].shape == out["response_mask"].shape == (3, width - 1)
    for i, (p_ids, o_ids) in enumerate(rows):
        full = p_ids + o_ids + [tok.pad_token_id] * (width - len(p_ids) - len(o_ids))
        assert out["input_ids"][i].tolist() == full[:-1]
        assert out["labels"][i].tolist() == full[1:]
        mask = [len(p_ids) - 1 <= t < len(p_ids) + len(o_ids) - 1 for t in range(width - 1)]
        assert out["response_mask"][i].tolist() == mask
        # the masked labels are exactly the output, which decodes back to the output string
        response_labels = out["labels"][i][out["response_mask"][i]].tolist()
        assert response_labels == o_ids
        assert tok.decode(response_labels) == outputs[i]
    assert tok.pad_token_id == 1
