"""Convert Anthropic HH-RLHF data to the preference JSONL read by ``mode: dpo``.

    python -m trainer.data.hh IN OUT [--split train]

IN is one HH file (``.jsonl[.gz]``, lines ``{"chosen": CONV, "rejected": CONV}``) or a folder searched
recursively for ``{split}.jsonl[.gz]`` (the ``Anthropic/hh-rlhf`` layout). OUT gets one line per kept pair,
``{"prompt", "chosen", "rejected", "source"}`` (``source``: the file's folder). As in the CS336 assignment 5
supplement, only single-turn conversations are kept: the prompt is the human message (raw; ``mode: dpo``
applies the template and EOS), the responses the two stripped assistant replies. A pair is dropped, and
counted, when a conversation is multi-turn or malformed, the human messages differ, a message is empty,
or the replies are identical. A line that is not a JSON object with string ``chosen``/``rejected`` is an
error naming file and line; so is an input with no kept pair.

Written here rather than with `datasets` because the work is the conversation parsing (splitting
``\n\nHuman:`` / ``\n\nAssistant:`` turns and the drop rules above), which `datasets` does not do; reading
the ``.jsonl.gz`` lines is a few lines of `gzip` and `json`, and a bad line is reported as ``file:line``
(`datasets` reports a byte position in an unnamed file).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from trainer.data.jsonl import DatasetFormatError, read_jsonl

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def parse_single_turn(conversation: str) -> tuple[str, str] | None:
    """(human message, assistant reply) of a one-turn HH conversation, or None if it is not one.

    >>> parse_single_turn("\\n\\nHuman: Hi there\\n\\nAssistant: Hello!")
    ('Hi there', 'Hello!')
    >>> parse_single_turn("\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant: d") is None
    True
    """
    if conversation.count(HUMAN) != 1 or conversation.count(ASSISTANT) != 1:
        return None
    before, human_and_reply = conversation.split(HUMAN)
    if before.strip() or ASSISTANT not in human_and_reply:
        return None
    human, reply = human_and_reply.split(ASSISTANT)
    return human.strip(), reply.strip()


def convert_pair(chosen: str, rejected: str) -> tuple[dict[str, str] | None, str]:
    """(``{"prompt", "chosen", "rejected"}`` or None, reason): the conversion of one HH line.

    >>> convert_pair("\\n\\nHuman: 2+2?\\n\\nAssistant: 4", "\\n\\nHuman: 2+2?\\n\\nAssistant: 5")
    ({'prompt': '2+2?', 'chosen': '4', 'rejected': '5'}, 'kept')
    """
    c, r = parse_single_turn(chosen), parse_single_turn(rejected)
    if c is None or r is None:
        return None, "multi_turn_or_malformed"
    if c[0] != r[0]:
        return None, "different_prompts"
    if not c[0] or not c[1] or not r[1]:
        return None, "empty_turn"
    if c[1] == r[1]:
        return None, "identical_responses"
    return {"prompt": c[0], "chosen": c[1], "rejected": r[1]}, "kept"


def input_files(source: Path, split: str) -> list[Path]:
    """`source` itself, or every ``{split}.jsonl[.gz]`` below it (sorted)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such file or folder")
    found = sorted(
        p for p in source.rglob(f"{split}.jsonl*") if p.name in (f"{split}.jsonl", f"{split}.jsonl.gz")
    )
    if not found:
        raise FileNotFoundError(f"{source}: no {split}.jsonl or {split}.jsonl.gz below this folder")
    both = sorted({p.parent for p in found if p.name.endswith(".gz") and p.with_suffix("") in found})
    if both:
        raise DatasetFormatError(f"{both[0]}: holds both {split}.jsonl and {split}.jsonl.gz, which would read "
                                 "every pair twice: keep one")
    return found


def _open(path: Path) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_hh(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, chosen, rejected) of each non-blank line; bad lines raise `DatasetFormatError`."""
    try:
        for lineno, record in read_jsonl(path, opener=_open):
            for key in ("chosen", "rejected"):
                if not isinstance(record.get(key), str):
                    raise DatasetFormatError(
                        f"{path}:{lineno}: missing or non-string key {key!r} (HH lines have 'chosen' and "
                        f"'rejected'; found {sorted(record)})"
                    )
            yield lineno, record["chosen"], record["rejected"]
    except (OSError, EOFError) as err:  # gzip: a truncated download, or not gzip at all
        raise DatasetFormatError(f"{path}: cannot be read ({err}); download it again") from None


def convert(source: str | Path, out: str | Path, split: str = "train") -> Counter[str]:
    """Write the preference JSONL for `source` to `out`; returns counts of kept and dropped pairs by reason."""
    counts: Counter[str] = Counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    files = input_files(Path(source), split)
    try:
        with tmp.open("w", encoding="utf-8") as sink:
            for path in files:
                for _, chosen, rejected in read_hh(path):
                    pair, reason = convert_pair(chosen, rejected)
                    counts[reason] += 1
                    if pair is not None:
                        sink.write(
                            json.dumps({**pair, "source": path.parent.name}, ensure_ascii=False) + "\n"
                        )
        if not counts["kept"]:
            raise DatasetFormatError(
                f"{source}: no single-turn preference pair found (counts: {dict(counts)})"
            )
        tmp.rename(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.hh", description=__doc__.splitlines()[0]
    )
    parser.add_argument("source", help="an HH .jsonl/.jsonl.gz file, or a folder of them (e.g. hh-rlhf/)")
    parser.add_argument("out", help="preference JSONL to write")
    parser.add_argument(
        "--split", default="train", help="in a folder, convert {split}.jsonl[.gz] (default train)"
    )
    args = parser.parse_args(argv)
    try:
        counts = convert(args.source, args.out, args.split)
    except (DatasetFormatError, OSError) as err:  # OSError: a missing input, an OUT that cannot be written
        print(f"hh_to_jsonl: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {counts['kept']} pairs to {args.out}; dropped: "
        + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "kept"),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
