"""Shaped random checkpoints (`trainer.tools.shaped`): the 1.5B shape's parameter count by hand, and a small
shape written and loaded back through `from_pretrained` like a user checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from trainer.tools.shaped import QWEN25_MATH_15B, build_shaped, main, padded_tokenizer, shaped_config


def test_qwen25_math_15b_parameter_count() -> None:
    """Embedding 151,936·1536 = 233,373,696 (tied: the output layer adds nothing). Per layer: q 1536·1536 + 1536,
    k and v 1536·256 + 256 each, o 1536·1536, MLP 3·1536·8960, two norms 2·1536 = 46,797,824; 28 layers
    = 1,310,339,072; final norm 1536. Total 1,543,714,304 (the model card's "1.54B")."""
    tokenizer = padded_tokenizer(QWEN25_MATH_15B["vocab_size"])
    assert len(tokenizer) == 151_936
    with torch.device("meta"):
        model = Qwen2ForCausalLM(shaped_config(QWEN25_MATH_15B, tokenizer))
    assert sum(p.numel() for p in model.parameters()) == 1_543_714_304


def test_small_shape_round_trips(tmp_path: Path) -> None:
    shape = {**QWEN25_MATH_15B, "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    path = build_shaped(tmp_path / "m", shape, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer) == 2048
    assert tokenizer.decode([2047]) == f"<|r{2047 - 1022}|>"  # 1022 BPE entries, then the added tokens
    ids = tokenizer("<think> 2 + 3 = 5 </think>", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_cli_rejects_unknown_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "unused"), "--shape", "llama-70b"])
    assert "invalid choice: 'llama-70b'" in capsys.readouterr().err
    assert not (tmp_path / "unused").exists()


def test_unusable_out_dir_is_refused_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """OUT_DIR a file: the 1.5B model was built (a minute on CPU), then transformers only logged "should be a
    directory, not a file", nothing was written, and the command printed the path and exited 0; a path under a
    file was a NotADirectoryError traceback after the build. Now both are one error line (exit 2) before
    anything is built."""
    import trainer.tools.shaped as shaped

    def no_build(*args: object) -> None:
        raise AssertionError("built before OUT_DIR was checked")

    monkeypatch.setattr(shaped, "padded_tokenizer", no_build)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    for out, why in ((notes, f"{notes}: a file, not a folder for the checkpoint"),
                     (notes / "m", f"{notes / 'm'}: {notes} is a file, not a folder")):
        with pytest.raises(SystemExit) as exit_:
            main([str(out)])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"python -m trainer.tools.shaped: error: {why}"
        with pytest.raises(NotADirectoryError, match=re.escape(why)):
            build_shaped(out, QWEN25_MATH_15B)
    assert notes.read_text() == "x"
