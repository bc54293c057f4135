"""Checkpoints of a model whose LM head is its input embedding (``tie_word_embeddings``, like Qwen2.5-Math-1.5B
and the tiny Qwen2): accelerate's warning about the shared tensor it stores once is dropped, and only that one,
because loading ties the head again and the restored weights are exactly the saved ones."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.checkpoint import TiedHeadNotice, load_checkpoint, save_checkpoint, tied_embedding_names
from trainer.config_io import config_from_dict

NOTICE = ("Removed shared tensor {names} while saving. This should be OK, but check by verifying that you don't "
          "receive any warning while reloading")


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("accelerate.utils.other", logging.WARNING, __file__, 1, message, None, None)


def test_the_notice_is_dropped_for_the_tied_head_only() -> None:
    notice = TiedHeadNotice({"model.embed_tokens.weight", "lm_head.weight"})
    assert not notice.filter(record(NOTICE.format(names={"lm_head.weight"})))
    assert not notice.filter(record("[RANK 0] " + NOTICE.format(names={"lm_head.weight"})))  # accelerate's prefix
    assert not notice.filter(record(NOTICE.format(names={"module.model.embed_tokens.weight"})))  # a DDP wrapper's name
    assert notice.filter(record(NOTICE.format(names={"lm_head.weight", "model.layers.0.mlp.up_proj.weight"})))
    assert notice.filter(record(NOTICE.format(names={"model.norm.weight"})))
    assert notice.filter(record("Model weights saved in run/state/model.safetensors"))
    assert TiedHeadNotice(set()).filter(record(NOTICE.format(names={"lm_head.weight"})))  # untied: kept


def test_tied_names_of_a_tied_and_an_untied_model(tiny_qwen2_path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
    assert tied_embedding_names(model) == {"model.embed_tokens.weight", "lm_head.weight"}
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert tied_embedding_names(model) == set()
    assert tied_embedding_names(torch.nn.Linear(2, 2)) == set()


@pytest.fixture
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate's state is a process-wide singleton: start from none and leave none behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_save_is_quiet_and_resume_exact(tiny_qwen2_path: str, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # weights unlike the checkpoint on disk, so a load from there would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model = acc.prepare(model)
    cfg = config_from_dict({"model": {"path": tiny_qwen2_path}})
    with caplog.at_level(logging.INFO):
        save_checkpoint(acc, model, AutoTokenizer.from_pretrained(tiny_qwen2_path), tmp_path, 1,
                        {"policy_version": 1}, cfg, keep_last=1)
    assert any("Model weights saved" in r.getMessage() for r in caplog.records)  # accelerate's log was captured
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    assert not logging.getLogger("accelerate.utils.other").filters  # the filter is gone after the save

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_checkpoint(acc, tmp_path / "checkpoints" / "step_000001")
    unwrapped = acc.unwrap_model(model)
    assert unwrapped.lm_head.weight is unwrapped.model.embed_tokens.weight
    for name, value in unwrapped.state_dict().items():
        assert torch.equal(value, saved[name]), name
