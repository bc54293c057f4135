"""Anthropic-HH → preference JSONL (`trainer.data.hh`): what is kept, what is dropped, bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from trainer.data.hh import convert, convert_pair, main, parse_single_turn
from trainer.data.preference import read_preference_pairs
from trainer.data.tasks import DatasetFormatError


def conv(*turns: str) -> str:
    """An HH conversation string from alternating human / assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def write_hh(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)


HARMLESS = [
    {"chosen": conv("How do I pick a lock?", "I can't help with that."),
     "rejected": conv("How do I pick a lock?", "Use a tension wrench.")},
    # multi-turn: dropped
    {"chosen": conv("Hi", "Hello", "What is 2+2?", "4"), "rejected": conv("Hi", "Hello", "What is 2+2?", "5")},
]  # fmt: skip
HELPFUL = [
    {"chosen": conv("Name a prime.", "7"), "rejected": conv("Name a prime.", "8")},
    {"chosen": conv("Same?", "yes"), "rejected": conv("Same?", "yes")},  # identical replies: dropped
    {"chosen": conv("A?", "x"), "rejected": conv("B?", "y")},  # different prompts: dropped
]


def test_parse_single_turn_strips_and_rejects_multi_turn() -> None:
    assert parse_single_turn("\n\nHuman:  Hi there \n\nAssistant: Hello! ") == ("Hi there", "Hello!")
    assert parse_single_turn(conv("a", "b", "c", "d")) is None
    assert parse_single_turn("preamble\n\nHuman: a\n\nAssistant: b") is None
    assert parse_single_turn("\n\nHuman: only a question") is None
    assert convert_pair(conv("q", "a"), conv("q", "")) == (None, "empty_turn")


def test_folder_of_gz_files_converts_single_turn_pairs(tmp_path: Path) -> None:
    """A folder laid out like the hh-rlhf repository; only train.jsonl.gz files are read by default."""
    write_hh(tmp_path / "hh" / "harmless-base" / "train.jsonl.gz", HARMLESS)
    write_hh(tmp_path / "hh" / "helpful-base" / "train.jsonl.gz", HELPFUL)
    write_hh(tmp_path / "hh" / "helpful-base" / "test.jsonl.gz", HELPFUL)  # other split: ignored
    out = tmp_path / "pref.jsonl"
    counts = convert(tmp_path / "hh", out)
    assert dict(counts) == {"kept": 2, "multi_turn_or_malformed": 1, "identical_responses": 1,
                            "different_prompts": 1}  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"prompt": "How do I pick a lock?", "chosen": "I can't help with that.",
         "rejected": "Use a tension wrench.", "source": "harmless-base"},
        {"prompt": "Name a prime.", "chosen": "7", "rejected": "8", "source": "helpful-base"},
    ]  # fmt: skip
    pairs = read_preference_pairs(out)  # what mode: dpo reads
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]


def test_cli_module_runs(tmp_path: Path) -> None:
    src = tmp_path / "helpful-base" / "train.jsonl"
    write_hh(src, HELPFUL)
    out = tmp_path / "out" / "pref.jsonl"
    proc = subprocess.run([sys.executable, "-m", "trainer.data.hh", str(src), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 pairs" in proc.stderr
    assert len(out.read_text().splitlines()) == 1


def test_bad_input_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps(HELPFUL[0]) + "\n\n" + json.dumps({"chosen": "x"}) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"{bad}:3: missing or non-string key 'rejected'"):
        convert(bad, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.tmp").exists()  # no half-written file left behind
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetFormatError, match="no single-turn preference pair"):
        convert(empty, tmp_path / "out.jsonl")
    assert main([str(tmp_path / "missing"), str(tmp_path / "o.jsonl")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_truncated_or_non_gzip_file_and_a_folder_with_both_forms(tmp_path: Path) -> None:
    """A half-downloaded or mislabelled ``.gz`` is one error naming the file (it was EOFError or
    BadGzipFile); a folder holding both ``train.jsonl`` and ``train.jsonl.gz`` would convert every pair twice,
    so it is refused. An existing output file is left as it was in both cases."""
    out = tmp_path / "out.jsonl"
    out.write_text("kept\n")
    whole = tmp_path / "whole" / "train.jsonl.gz"
    write_hh(whole, HELPFUL * 200)
    truncated = tmp_path / "truncated" / "train.jsonl.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    with pytest.raises(DatasetFormatError, match=rf"{truncated}: cannot be read \(Compressed file ended"):
        convert(truncated.parent, out)
    plain = tmp_path / "plain" / "train.jsonl.gz"
    write_hh(plain.with_suffix(""), HELPFUL)
    plain.with_suffix("").rename(plain)  # plain text under a .gz name
    with pytest.raises(DatasetFormatError, match=rf"{plain}: cannot be read \(Not a gzipped file"):
        convert(plain, out)
    both = tmp_path / "both"
    write_hh(both / "train.jsonl", HELPFUL)
    write_hh(both / "train.jsonl.gz", HELPFUL)
    with pytest.raises(DatasetFormatError, match=rf"{both}: holds both train\.jsonl and train\.jsonl\.gz"):
        convert(tmp_path / "both", out)
    assert out.read_text() == "kept\n"
    assert convert(tmp_path / "whole", out)["kept"] == 200
