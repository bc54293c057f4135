"""Every data-parallel rank runs the same micro-batches per optimizer step (`trainer.data.batching.deal_micro_batches`).

DDP all-reduces on a rank's last micro-batch, and under DeepSpeed ZeRO-3 every forward all-gathers the
parameters: a rank with one forward/backward fewer leaves the others waiting in a collective. Before the
fix ranks could differ (5 rows, 4 accumulation steps, 2 ranks: 3 and 2 micro-batches), and a batch with
fewer rows than ranks (expert iteration keeps an arbitrary number of samples; the last batch of an SFT
epoch) was skipped on every rank, so 2 ranks trained on less data than 1 process. Checked here:

- the dealing, for every (rows, accumulation steps, world) up to (40, 8, 8): equal micro-batch counts on
  every rank (computed without communication), every real row exactly once, dummies marked, one row, never
  more than `grad_accum` micro-batches, and on one process exactly the old split (no dummy);
- SFT data (reasoning pairs and packed blocks) on 2 ranks: both ranks yield every optimizer step of the
  epoch (the short last batch included) with the same micro-batch count, and the real rows are the
  1-process ones;
- a zero-weight micro-batch contributes exactly nothing: `sft_update` with dummies interleaved gives
  bit-identical gradients, loss, token count and parameters (a naive twin: its loss is 0 and every gradient
  exactly 0);
- (slow) 2 gloo ranks run expert iteration's `sft_on_kept` with 1 and 5 kept samples: same forward passes
  on both ranks, same optimizer steps, parameters and gradients within 1e-6 relative of 1 process.
"""

from __future__ import annotations

import itertools
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, capture_grads_at_step, launch_worlds, rank_micro_batches

from trainer.config import ModelConfig, OptimConfig
from trainer.config_io import config_from_dict
from trainer.data.batching import TokenBatch, deal_micro_batches, micro_batches_per_rank, pack_micro_batches
from trainer.data.prompts import format_prompt
from trainer.data.tasks import make_arithmetic
from trainer.data.tokenization import pair_batch
from trainer.learner import Learner
from trainer.learners.sft import load_sft_data, sft_update
from trainer.losses import aggregate_loss

WORKER = REPO / "tests" / "ragged_worker.py"
RTOL = 1e-6
TIMEOUT_S = 240


# ---- the dealing ----------------------------------------------------------------------------------
GRID = list(itertools.product(range(1, 41), range(1, 9), range(1, 9)))


@pytest.mark.parametrize("world", range(1, 9))
def test_every_rank_runs_the_same_micro_batches(world: int) -> None:
    for n, gas, w in GRID:
        if w != world:
            continue
        rows = [100 + 7 * i for i in range(n)]  # not range(n): the dealing must use values, not positions
        dealt = [deal_micro_batches(rows, gas, r, world) for r in range(world)]
        k = micro_batches_per_rank(n, gas, world)
        assert 1 <= k <= gas, (n, gas, world, k)
        assert [len(d) for d in dealt] == [k] * world, (n, gas, world)
        real = [row for d in dealt for m in d if not m.dummy for row in m.rows]
        assert sorted(real) == sorted(rows), (n, gas, world)  # every row once, across the ranks
        for r, d in enumerate(dealt):
            assert all(m.rows for m in d)
            reals = [m for m in d if not m.dummy]
            assert [m.dummy for m in d] == [False] * len(reals) + [True] * (k - len(reals))  # dummies last
            assert [row for m in reals for row in m.rows] == rows[r::world]
            for m in d[len(reals) :]:
                assert len(m.rows) == 1 and m.rows[0] in rows
            if n >= world:  # the real rows are cut exactly as before
                assert [m.rows for m in reals] == rank_micro_batches(rows, gas, r, world)
        if world == 1:
            assert not any(m.dummy for m in dealt[0])


def test_dealing_examples_from_the_audit() -> None:
    """5 rows, 4 steps, 2 ranks: 3 and 2 real micro-batches before (the old counts), now 3 and 3;
    1 row on 2 ranks: rank 1 had nothing and skipped the step, now it runs a dummy."""
    assert [len(rank_micro_batches(range(5), 4, r, 2)) for r in range(2)] == [3, 2]
    assert [[(m.rows, m.dummy) for m in deal_micro_batches(range(5), 4, r, 2)] for r in range(2)] == [
        [([0], False), ([2], False), ([4], False)],
        [([1], False), ([3], False), ([1], True)],
    ]
    assert rank_micro_batches([7], 4, 1, 2) == []
    assert [[(m.rows, m.dummy) for m in deal_micro_batches([7], 4, r, 2)] for r in range(2)] == [
        [([7], False)],
        [([7], True)],
    ]
    # not monotone: 9 rows over 2 ranks, 4 steps: rank 0 (5 rows) cuts 3 chunks, rank 1 (4 rows) 4
    assert micro_batches_per_rank(9, 4, 2) == 4
    assert [len(deal_micro_batches(range(9), 4, r, 2)) for r in range(2)] == [4, 4]
    assert deal_micro_batches([], 4, 0, 2) == []
    with pytest.raises(ValueError, match="outside"):
        deal_micro_batches(range(3), 2, 2, 2)


def test_pack_micro_batches_zeroes_only_the_dummies() -> None:
    ids = {3: [5, 6, 7], 4: [8, 9]}

    def pack(rows: list[int]) -> TokenBatch:
        from trainer.data.batching import pack_token_ids

        return pack_token_ids([[1] for _ in rows], [ids[r] for r in rows], pad_id=0)

    real, dummy = pack_micro_batches(deal_micro_batches([3, 4], 2, 1, 3), pack) + pack_micro_batches(
        deal_micro_batches([3, 4], 2, 2, 3), pack
    )
    assert real.response_mask.sum() == 2 and not dummy.response_mask.any()
    assert torch.equal(dummy.input_ids, pack([3]).input_ids)  # a real row: the forward is a real one
    assert torch.equal(dummy.attention_mask, pack([3]).attention_mask)


# ---- SFT data on 2 ranks --------------------------------------------------------------------------
def _fake_session(tmp_path: Path, tokenizer: Any, rank: int, world: int, packed: bool) -> Any:
    data = tmp_path / "sft.jsonl"
    if not data.exists():
        lines = [{"prompt": format_prompt("r1_zero", question=ex.question),
                  "response": f" {ex.solution} </think> <answer> {ex.answer} </answer>"}
                 for ex in make_arithmetic(11, seed=3, level=1)]  # fmt: skip
        data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = config_from_dict({
        "seed": 0, "mode": "sft", "model": {"path": "unused"}, "data": {"sft_path": str(data)},
        "sft": {"batch_size": 4, "gradient_accumulation_steps": 4, "validation_fraction": 0.0,
                "packed": packed, "seq_length": 16},
    })  # fmt: skip
    return types.SimpleNamespace(
        cfg=cfg,
        accelerator=types.SimpleNamespace(process_index=rank, num_processes=world),
        learner=types.SimpleNamespace(tokenizer=tokenizer),
    )


@pytest.mark.parametrize("packed", [False, True], ids=["pairs", "packed"])
def test_sft_epoch_same_steps_and_micro_batches_on_every_rank(
    tmp_path: Path, tiny_qwen2_path: str, packed: bool
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_path)
    one = load_sft_data(_fake_session(tmp_path, tok, 0, 1, packed))
    ranks = [load_sft_data(_fake_session(tmp_path, tok, r, 2, packed)) for r in range(2)]
    steps_one = list(one.epoch(0))
    steps = [list(d.epoch(0)) for d in ranks]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == len(steps_one)
    assert len(steps_one) == -(-one.n_train // 4)  # the short last batch trains too
    if not packed:  # 11 rows: the last batch holds 3, dealt 2 + 1 over the ranks (rank 1 pads with a dummy)
        assert one.n_train == 11 and sum(len(mb) for mb in steps_one[-1]) == 3
        assert [len(mb) for mb in steps[1][-1]] == [1, 1] and not steps[1][-1][1].response_mask.any()
    for step, (want, a, b) in enumerate(zip(steps_one, *steps, strict=True)):
        assert len(a) == len(b) >= 1, f"step {step}: {len(a)} vs {len(b)} micro-batches"
        tokens = [int(mb.response_mask.sum()) for mb in want]
        assert sum(int(mb.response_mask.sum()) for mb in a + b) == sum(tokens), step
        real_rows = sum(len(mb) for mb in a + b if mb.response_mask.any())
        assert real_rows == sum(len(mb) for mb in want), step


def test_sft_short_last_batch_with_fewer_rows_than_ranks(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """9 examples, batches of 4: the last batch holds 1 row; on 2 ranks rank 1 runs one dummy there."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_path)
    lines = (tmp_path / "sft.jsonl")
    _fake_session(tmp_path, tok, 0, 1, False)  # writes 11 lines
    lines.write_text("".join(lines.read_text().splitlines(keepends=True)[:9]))
    steps = [list(load_sft_data(_fake_session(tmp_path, tok, r, 2, False)).epoch(0)) for r in range(2)]
    assert [len(s) for s in steps] == [3, 3]
    (last0,), (last1,) = steps[0][-1], steps[1][-1]
    assert last0.response_mask.any() and not last1.response_mask.any()
    assert torch.equal(last0.input_ids, last1.input_ids)  # rank 1's stand-in is the batch's one row


# ---- a zero-weight micro-batch contributes exactly nothing -----------------------------------------
def _rows() -> list[tuple[str, str]]:
    return [(format_prompt("r1_zero", question=ex.question), f" {ex.solution} </think> <answer> {ex.answer} </answer>")
            for ex in make_arithmetic(5, seed=2, level=2)]  # fmt: skip


def test_dummy_micro_batches_leave_the_update_bit_identical(tiny_qwen2_path: str) -> None:
    rows = _rows()

    def pack(idx: list[int]) -> TokenBatch:
        return pair_batch(learners[0].tokenizer, [rows[i][0] for i in idx], [rows[i][1] for i in idx])

    learners = [Learner(ModelConfig(path=tiny_qwen2_path, dtype="float32"), OptimConfig(learning_rate=1e-2))
                for _ in range(2)]  # fmt: skip
    captured = [capture_grads_at_step(learner) for learner in learners]
    plain = pack_micro_batches(deal_micro_batches(range(5), 2), pack)
    assert [len(m) for m in plain] == [3, 2]
    dummy = pack([4]).zero_weight()
    padded = [dummy, plain[0], pack([1, 3]).zero_weight(), plain[1], dummy]  # the last one: DDP's sync pass
    metrics = [sft_update(learners[0], plain), sft_update(learners[1], padded)]
    assert metrics[0] == metrics[1]  # loss, grad norm, lr, response tokens (dummies add none)
    assert metrics[0]["train/response_tokens"] == sum(float(m.response_mask.sum()) for m in plain)
    assert set(captured[0]) == set(captured[1]) and captured[0]
    for name, grad in captured[0].items():
        assert torch.equal(captured[1][name], grad), name
    for p, q in zip(learners[0].model.parameters(), learners[1].model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_zero_weight_micro_batch_naive_twin(tiny_qwen2_path: str) -> None:
    """The stand-in's forward and backward run (every parameter gets a gradient) and the gradient is 0."""
    learner = Learner(ModelConfig(path=tiny_qwen2_path, dtype="float32"), OptimConfig())
    rows = _rows()
    dummy = pair_batch(learner.tokenizer, [rows[0][0]], [rows[0][1]]).zero_weight()
    lp = learner.log_probs(dummy)["log_probs"]
    loss = aggregate_loss(-lp, dummy.response_mask, "token", global_token_count=17.0, world_size=2)
    learner.backward(loss)
    assert float(loss.detach()) == 0.0
    grads = [p.grad for p in learner.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


# ---- 2 gloo ranks: expert iteration's SFT on a ragged kept set ----------------------------------------
@pytest.fixture(scope="module")
def ragged_runs(tiny_gpt2_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    out = tmp_path_factory.mktemp("ragged")
    launch_worlds(WORKER, lambda world: [tiny_gpt2_path, str(out / f"w{world}"), str(world)], out, TIMEOUT_S)
    return {w: torch.load(out / f"w{w}" / "results.pt", weights_only=False) for w in (1, 2)}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
@pytest.mark.parametrize("case", ["kept1", "kept5", "kept5_short"])
def test_ei_sft_on_ragged_kept_matches_single_process(ragged_runs: dict[int, dict[str, Any]], case: str) -> None:
    assert ragged_runs[1]["world"] == 1 and ragged_runs[2]["world"] == 2
    assert ragged_runs[2]["distributed_type"] == "DistributedType.MULTI_CPU"
    one, two = ragged_runs[1][case], ragged_runs[2][case]
    forwards = two["rank_forwards"]
    assert forwards[0] == forwards[1], f"ranks ran {forwards} forward passes"
    steps = [m["train/optimizer_steps"] for m in two["rank_metrics"]]
    assert steps == [one["rank_metrics"][0]["train/optimizer_steps"]] * 2 == [float(len(one["grads"]))] * 2
    assert len(two["grads"]) == len(one["grads"]) >= 1
    assert torch.equal(two["params_before"], one["params_before"])
    moved = _rel(one["params"], one["params_before"])
    assert moved > 1e-4, f"the update barely moved the parameters ({moved:.1e}); the comparison is vacuous"
    assert _rel(two["params"], one["params"]) <= RTOL, f"params differ by {_rel(two['params'], one['params']):.2e}"
    for i, (g2, g1) in enumerate(zip(two["grads"], one["grads"], strict=True)):
        assert _rel(g2, g1) <= RTOL, f"optimizer step {i}: gradient differs by {_rel(g2, g1):.2e}"
    sums = two["rank_param_sum"]
    assert sums[0] == sums[1], f"replicas diverged: {sums}"
    losses = [m["train/loss"] for m in two["rank_metrics"]]  # Session.reduce_metrics: mean over ranks
    assert sum(losses) / 2 == pytest.approx(one["rank_metrics"][0]["train/loss"], rel=RTOL)
