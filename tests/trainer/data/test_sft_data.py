"""PackedSFTDataset / iterate_batches: hand-packed stream, naive reference on the tiny BPE, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from trainer.data.prompts import ALPACA
from trainer.data.sft import PackedSFTDataset, iterate_batches, read_sft_jsonl, tokenizer_adds_bos

BARE = "{instruction}|{response}"


class CharTokenizer:
    """id = ord(ch); EOS 0; BOS 5, prepended with add_special_tokens=True only when `adds_bos`."""

    eos_token_id = 0
    bos_token_id: int | None = 5

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, Any]:
        prefix = [5] if (self.adds_bos and add_special_tokens) else []
        return {"input_ids": prefix + [ord(ch) for ch in text]}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_packing_hand_values_without_bos(tmp_path: Path) -> None:
    """docs "a|b", "c|d" (template "{instruction}|{response}") → stream [97, 124, 98, 0, 99, 124, 100, 0];
    m = 3 → (8 − 1) // 3 = 2 examples:
    0: input [97, 124, 98], labels [124, 98, 0]; 1: input [0, 99, 124], labels [99, 124, 100]."""
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    )
    ds = PackedSFTDataset(CharTokenizer(adds_bos=False), path, 3, shuffle=False, template=BARE)
    assert len(ds) == 2
    assert ds[0]["input_ids"].tolist() == [97, 124, 98]
    assert ds[0]["labels"].tolist() == [124, 98, 0]
    assert ds[1]["input_ids"].tolist() == [0, 99, 124]
    assert ds[1]["labels"].tolist() == [99, 124, 100]
    assert ds[-1]["labels"].tolist() == [99, 124, 100]
    with pytest.raises(IndexError):
        ds[2]


def test_packing_hand_values_with_bos(tmp_path: Path) -> None:
    """Same docs, tokenizer adds BOS 5 → stream [5, 97, 124, 98, 0, 5, 99, 124, 100, 0] (len 10);
    m = 3 → 3 examples; example 2: input [99, 124, 100], labels [124, 100, 0]."""
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    )
    tok = CharTokenizer(adds_bos=True)
    assert tokenizer_adds_bos(tok)
    assert not tokenizer_adds_bos(CharTokenizer(adds_bos=False))
    ds = PackedSFTDataset(tok, path, 3, shuffle=False, template=BARE)
    assert len(ds) == 3
    assert ds[0]["input_ids"].tolist() == [5, 97, 124]
    assert ds[2]["input_ids"].tolist() == [99, 124, 100]
    assert ds[2]["labels"].tolist() == [124, 100, 0]


def _records(n: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}. The answer is {2 * i}."}
        for i in range(n)
    ]


def test_matches_naive_stream_on_tiny_bpe(tmp_path: Path, tiny_gpt2_path: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    assert not tokenizer_adds_bos(tok)  # bos_token is set, but this tokenizer does not add it
    records = _records(12)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    m = 16
    ds = PackedSFTDataset(tok, path, m, shuffle=False)
    stream: list[int] = []
    for r in records:
        stream += tok.encode(
            ALPACA.format(instruction=r["prompt"], response=r["response"]), add_special_tokens=False
        )
        stream.append(tok.eos_token_id)
    assert len(ds) == (len(stream) - 1) // m
    for i in range(len(ds)):
        assert ds[i]["input_ids"].tolist() == stream[i * m : (i + 1) * m]
        assert ds[i]["labels"].tolist() == stream[i * m + 1 : (i + 1) * m + 1]
        assert ds[i]["input_ids"].dtype == torch.long


def test_shuffle_reorders_documents_deterministically(tmp_path: Path) -> None:
    records = [{"prompt": chr(ord("a") + i), "response": chr(ord("A") + i)} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    tok = CharTokenizer(adds_bos=False)

    def docs(ds: PackedSFTDataset) -> list[str]:
        return "".join(chr(t) if t else "\n" for t in ds.tokens.tolist()).split("\n")[:-1]

    plain = docs(PackedSFTDataset(tok, path, 4, shuffle=False, template=BARE))
    shuffled = docs(PackedSFTDataset(tok, path, 4, shuffle=True, seed=1, template=BARE))
    again = docs(PackedSFTDataset(tok, path, 4, shuffle=True, seed=1, template=BARE))
    other = docs(PackedSFTDataset(tok, path, 4, shuffle=True, seed=2, template=BARE))
    assert plain == [f"{r['prompt']}|{r['response']}" for r in records]
    assert sorted(shuffled) == sorted(plain) and shuffled != plain
    assert shuffled == again and other != shuffled


def test_bad_jsonl_lines_name_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: missing key 'response'"):
        PackedSFTDataset(CharTokenizer(False), path, 4, shuffle=False)
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_sft_jsonl(path)
    path.write_text('["a", "b"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a JSON object"):
        read_sft_jsonl(path)
    path.write_text('{"prompt": 3, "response": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'prompt' must be a string"):
        read_sft_jsonl(path)


@pytest.mark.parametrize(("n_docs", "batch_size"), [(10, 3), (10, 1), (10, 100)])
def test_iterate_batches_len_shapes_and_coverage(tmp_path: Path, n_docs: int, batch_size: int) -> None:
    """n examples, batch size bs → ceil(n/bs) batches; the last is short; one epoch sees each example once."""
    path = write_jsonl(tmp_path / "d.jsonl", _records(n_docs))
    tok = CharTokenizer(adds_bos=False)
    ds = PackedSFTDataset(tok, path, 8, shuffle=False)
    n = len(ds)
    for shuffle in (False, True):
        batches = iterate_batches(ds, batch_size, shuffle)
        assert len(batches) == -(-n // batch_size)
        got = list(batches)
        assert len(got) == len(batches)
        assert all(b["input_ids"].shape[1] == 8 and b["labels"].shape == b["input_ids"].shape for b in got)
        assert [b["input_ids"].shape[0] for b in got[:-1]] == [batch_size] * (len(got) - 1)
        rows = sorted(tuple(r) for b in got for r in b["input_ids"].tolist())
        assert rows == sorted(tuple(ds[i]["input_ids"].tolist()) for i in range(n))
        if not shuffle:
            assert torch.equal(got[0]["input_ids"][0], ds[0]["input_ids"])


def test_iterate_batches_shuffle_is_seeded_and_varies_by_epoch(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", _records(20))
    ds = PackedSFTDataset(CharTokenizer(adds_bos=False), path, 8, shuffle=False)
    first = iterate_batches(ds, 4, shuffle=True, seed=3)
    second = iterate_batches(ds, 4, shuffle=True, seed=3)
    epoch_a = [b["input_ids"] for b in first]
    assert all(torch.equal(x, y["input_ids"]) for x, y in zip(epoch_a, second, strict=True))
    epoch_b = [b["input_ids"] for b in first]
    assert not all(torch.equal(x, y) for x, y in zip(epoch_a, epoch_b, strict=True))
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(ds, 0, shuffle=False)
