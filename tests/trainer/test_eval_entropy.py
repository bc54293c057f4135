"""Held-out token entropy with stand-in passes (`trainer.evaluate.response_entropy`, `entropy_passes`).

Under DeepSpeed ZeRO-3 every forward pass gathers the parameters from all ranks, so each rank must run the
same number of entropy passes, a rank with fewer questions (or none) included. The whole-run check is
`test_deepspeed_runs.py`; here the pieces: the stand-ins change no result and bring the pass count to what
was asked, and `entropy_passes` is the largest share's batch count; ``eval.token_entropy: false`` runs none.
"""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO
from transformers import AutoModelForCausalLM

from trainer import evaluate
from trainer.config_io import load_config
from trainer.evaluate import ENTROPY_BATCH, entropy_passes, eval_share, response_entropy
from trainer.tools.eval_cli import run_eval


class CountingForward(torch.nn.Module):
    """The model, counting its forward passes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.fixture(scope="module")
def counted(tiny_qwen2_path: str) -> CountingForward:
    return CountingForward(AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32).eval())


def _samples(n: int) -> list[SimpleNamespace]:
    gen = torch.Generator().manual_seed(n)
    return [SimpleNamespace(prompt_ids=torch.randint(3, 200, (4 + i % 3,), generator=gen).tolist(),
                            response_ids=torch.randint(3, 200, (2 + i % 5,), generator=gen).tolist())
            for i in range(n)]  # fmt: skip


def test_stand_in_passes_change_nothing(counted: CountingForward) -> None:
    samples = _samples(9)  # 2 batches of 8
    plain = response_entropy(counted, samples, pad_id=0)
    assert counted.calls == 2 and len(plain) == 9
    assert all(math.isfinite(h) and h > 0 for h in plain)
    counted.calls = 0
    padded = response_entropy(counted, samples, pad_id=0, passes=4)
    assert counted.calls == 4, "two stand-in passes after the two real ones"
    assert padded == plain
    counted.calls = 0
    assert response_entropy(counted, samples, pad_id=0, passes=1) == plain  # never fewer than needed
    assert counted.calls == 2


def test_a_rank_without_samples_still_runs_the_passes(counted: CountingForward) -> None:
    counted.calls = 0
    assert response_entropy(counted, [], pad_id=0, passes=2) == []
    assert counted.calls == 2
    counted.calls = 0
    assert response_entropy(counted, [], pad_id=0) == []
    assert counted.calls == 0


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("shared", [False, True])
def test_entropy_passes_is_the_largest_share(world: int, shared: bool) -> None:
    for n in range(0, 40):
        shares = [eval_share(n, world, r, shared) for r in range(world)]
        assert sum(len(s) for s in shares) == n
        need = max(math.ceil(len(s) / ENTROPY_BATCH) for s in shares)
        assert entropy_passes(n, world, shared) == need, (n, world, shared)


def test_docstring_examples() -> None:
    assert doctest.testmod(evaluate).failed == 0


@pytest.mark.usefixtures("one_torch_thread")
def test_token_entropy_off_skips_the_pass_and_changes_nothing_else(tiny_qwen2_path: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``eval.token_entropy=false`` (`reasonrl eval`, HF engine): no entropy forward pass runs, the records'
    entropy is null and ``eval/token_entropy`` is not logged; every other record field and metric is what the
    evaluation with entropy gives."""
    passes: list[int] = []
    scored = evaluate._batch_entropy
    monkeypatch.setattr(evaluate, "_batch_entropy", lambda model, chunk, pad_id: passes.append(len(chunk)) or
                        scored(model, chunk, pad_id))
    results = {}
    for on in (True, False):
        passes.clear()
        cfg = load_config(REPO / "configs" / "grpo_tiny_cpu.yaml", [
            f"model.path={tiny_qwen2_path}", f"output_dir={tmp_path / str(on)}", "rollout.engine=hf", "eval.limit=5",
            "eval.max_tokens=6", f"eval.token_entropy={str(on).lower()}", "logging.progress=false"])
        out = tmp_path / f"{on}.jsonl"
        metrics = run_eval(cfg, None, str(out))
        results[on] = metrics, [json.loads(line) for line in out.read_text().splitlines()], list(passes)
    (with_metrics, with_rows, with_passes), (off_metrics, off_rows, off_passes) = results[True], results[False]
    assert with_passes == [5] and off_passes == []
    assert all(isinstance(r["entropy"], float) for r in with_rows) and all(r["entropy"] is None for r in off_rows)
    assert [r | {"entropy": None} for r in with_rows] == off_rows
    assert math.isfinite(with_metrics.pop("eval/token_entropy"))
    assert json.dumps(with_metrics, sort_keys=True) == json.dumps(off_metrics, sort_keys=True)  # NaN equal to NaN
