"""Question sampler (resumable) and the token-id packing twin of tokenize_prompt_and_output."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from trainer.checkpoint import ResumeError
from trainer.data.batching import micro_batch_slices, pack_token_ids, pad_float_rows
from trainer.data.sampler import QuestionSampler
from trainer.data.tokenization import tokenize_prompt_and_output


def test_sampler_covers_each_epoch_without_replacement_and_resumes() -> None:
    items = list(range(10))
    a = QuestionSampler(items, seed=3)
    first_epoch = a.draw(10)
    assert sorted(first_epoch) == items
    a.draw(4)
    state = a.state_dict()
    expected = a.draw(9)  # crosses into epoch 2
    b = QuestionSampler(items, seed=3)
    b.load_state_dict(state)
    assert b.draw(9) == expected
    with pytest.raises(ValueError, match="empty"):
        QuestionSampler([], seed=0)


def test_resuming_over_other_training_data_is_refused() -> None:
    """The order depends on how many questions there are: a state saved over 20 would draw other questions
    (and skip the rest of the epoch) over 10. A state saved before the size was kept still loads."""
    saved = QuestionSampler(list(range(20)), seed=3)
    saved.draw(15)
    with pytest.raises(ResumeError, match=r"drawn over 20 training questions \(position 15 of epoch 0\), this run "
                                          r"has 10: the training data changed"):
        QuestionSampler(list(range(10)), seed=3).load_state_dict(saved.state_dict())
    with pytest.raises(ResumeError, match="position 15"):
        QuestionSampler(list(range(10)), seed=3).load_state_dict({"epoch": 0, "cursor": 15})
    old = QuestionSampler(list(range(20)), seed=3)
    old.load_state_dict({"epoch": 0, "cursor": 15})
    assert old.draw(5) == saved.draw(5)


def test_pack_token_ids_hand_example() -> None:
    """prompt [5, 6], response [7, 8, 9]; prompt [4], response [3]; pad 0.

    full rows: [5 6 7 8 9], [4 3 0 0 0] → input_ids drop the last column, labels the first;
    response labels: row 0 positions 1..3 (7, 8, 9), row 1 position 0 (3).
    """
    b = pack_token_ids([[5, 6], [4]], [[7, 8, 9], [3]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8], [4, 3, 0, 0]]
    assert b.labels.tolist() == [[6, 7, 8, 9], [3, 0, 0, 0]]
    assert b.response_mask.tolist() == [[False, True, True, True], [True, False, False, False]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    lp = pad_float_rows([[-1.0, -2.0, -3.0], [-4.0]], [1, 0], 4)
    assert lp.tolist() == [[0.0, -1.0, -2.0, -3.0], [-4.0, 0.0, 0.0, 0.0]]


def test_pack_token_ids_matches_tokenize_prompt_and_output(tiny_qwen2_path: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_path)
    prompts = ["What is 2 + 3?", "Janet has 16 eggs."]
    outputs = [" <think> 5 </think> <answer> 5 </answer>", " She eats 3."]
    ref = tokenize_prompt_and_output(prompts, outputs, tok)
    ids = pack_token_ids([tok.encode(p, add_special_tokens=False) for p in prompts],
                         [tok.encode(o, add_special_tokens=False) for o in outputs], tok.pad_token_id)
    assert torch.equal(ids.input_ids, ref["input_ids"])
    assert torch.equal(ids.labels, ref["labels"])
    assert torch.equal(ids.response_mask, ref["response_mask"].bool())


def test_micro_batch_slices() -> None:
    assert micro_batch_slices(6, 2) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(ValueError, match="does not split"):
        micro_batch_slices(5, 2)
