"""Data parallelism on CPU: 2 gloo ranks give the same optimizer step as 1 process with the same global batch.

`tests/dp_worker.py` runs twice, at the same time: as a plain process (world 1) and under
``ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2`` (world 2, free rendezvous port). Both
use the tiny GPT-2 in float32 and the real `Session`, `Learner` and `update_policy` (see the worker's
docstring for the cases). Checked here:

- one GRPO optimizer step (grpo_clip with TIS and an entropy bonus, 16 rows = 4 groups of 4, 2
  micro-batches) for each length normalisation (sequence_mean, constant, token) and one SFT step give
  the same parameters and the same optimizer gradient within 1e-6 relative (‖x₂ − x₁‖ / ‖x₁‖), the
  same pre-clip gradient norm on every rank, and identical replicas;
- the two ranks hold very different response-token counts (151 vs 19), and the control — token mode
  normalised by each rank's *own* count — is off by ~80 % in the gradient, so the test can fail;
- rollouts are sharded by whole groups: rank r generates for questions [r·q, (r+1)·q) of the draw every
  rank makes, its advantages equal the 1-process ones, and the samplers stay in step;
- metrics that are means over rows (train/loss, reward means and rates) reduce to the 1-process value by
  a plain mean over ranks;
- only rank 0 writes the run directory (config, metrics, HF checkpoint); other ranks write only their
  own RNG state (accelerate's ``random_states_<rank>.pkl``);
- both launches finish within a bounded time and leave no process behind;
- a whole DPO run (`train_dpo`) whose steps split 2 + 1 (and 1 + 0) pairs over the ranks logs the same
  ``train/*`` and ``eval/*`` metrics as the 1-process run: means over the step's pairs, not over ranks;
- the held-out evaluation of whole DPO and SFT runs is sharded: of 3 held-out micro-batches each rank
  evaluates its own 2 or 1 (plus a stand-in forward, so both run 2 passes), not all 3, and the logged
  ``eval/*`` values still equal the 1-process ones.

Regression tests for two bugs this file found: `test_lr_schedule_matches_single_process` (accelerate's
prepared LR scheduler stepped once per rank) and `test_checkpoint_is_complete_when_a_rank_is_slow` (no
barrier before rank 0 renamed the checkpoint).

Why torchrun and not ``accelerate launch --config_file launch/cpu_2proc.yaml``: for ``MULTI_CPU`` on one
machine accelerate's launcher starts a single process unless mpirun is configured, and a CPU process that
torchrun starts is its own world of 1 unless ``ACCELERATE_USE_CPU=true`` (checked by the first test).

Note on the tolerance: the parameter *update* of the first AdamW step is ≈ lr·sign(g), so components
with |g| near 0 amplify fp32 summation-order noise; the update differs by ~1e-5 relative while the
parameters and gradients agree to ~1e-7.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from dp_worker import DPO_PAIRS_PER_STEP, dpo_run_config, sft_run_config
from helpers import REPO, launch_worlds

from trainer.data.batching import deal_micro_batches
from trainer.data.sampler import epoch_batches, split_heldout
from trainer.tracking import read_metrics

WORKER = REPO / "tests" / "dp_worker.py"
RTOL = 1e-6
TIMEOUT_S = 300
MODES = ["sequence_mean", "constant", "token"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * TIMEOUT_S)]


def _run_both(model: str, out: Path) -> dict[int, dict[str, Any]]:
    launch_worlds(WORKER, lambda world: [model, str(out / f"w{world}"), str(world)], out, TIMEOUT_S)
    return {w: torch.load(out / f"w{w}" / "results.pt", weights_only=False) for w in (1, 2)}


@pytest.fixture(scope="module")
def runs(tiny_gpt2_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    assert Path("/proc/self/stat").exists(), "the leaked-process check reads Linux /proc"
    return _run_both(tiny_gpt2_path, tmp_path_factory.mktemp("dp"))


def rel(got: torch.Tensor | float, want: torch.Tensor | float) -> float:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return float((got - want).norm() / want.norm())


def test_worlds_are_what_they_claim(runs: dict[int, dict[str, Any]]) -> None:
    """A CPU launch without ACCELERATE_USE_CPU silently runs 2 worlds of 1; that must not pass as DDP."""
    assert runs[1]["world"] == 1
    assert runs[2]["world"] == 2
    assert runs[2]["distributed_type"] == "DistributedType.MULTI_CPU"


def _assert_same_step(one: dict[str, Any], two: dict[str, Any]) -> None:
    assert torch.equal(one["params_before"], two["params_before"])
    moved = rel(one["params"], one["params_before"])
    assert moved > 1e-4, f"the step barely moved the parameters ({moved:.1e}); the comparison is vacuous"
    assert rel(two["params"], one["params"]) <= RTOL, (
        f"params differ by {rel(two['params'], one['params']):.2e}"
    )
    assert rel(two["grad"], one["grad"]) <= RTOL, (
        f"optimizer gradient differs by {rel(two['grad'], one['grad']):.2e}"
    )
    want_norm = one["rank_metrics"][0]["train/grad_norm"]
    for rank, m in enumerate(two["rank_metrics"]):
        assert rel(m["train/grad_norm"], want_norm) <= RTOL, (
            f"rank {rank} grad norm {m['train/grad_norm']} vs {want_norm}"
        )
    digests = two["rank_param_digest"]
    assert all(d == digests[0] for d in digests), f"replicas diverged: {digests}"


@pytest.mark.parametrize("mode", MODES)
def test_grpo_step_matches_single_process(runs: dict[int, dict[str, Any]], mode: str) -> None:
    one, two = runs[1][f"grpo/{mode}"], runs[2][f"grpo/{mode}"]
    _assert_same_step(one, two)
    tokens = two["rank_response_tokens"]
    assert sum(tokens) == one["rank_response_tokens"][0]
    assert max(tokens) > 3 * min(tokens), f"ranks should hold unequal token counts, got {tokens}"


@pytest.mark.parametrize("case", [*(f"grpo/{m}" for m in MODES), "sft"])
def test_lr_schedule_matches_single_process(runs: dict[int, dict[str, Any]], case: str) -> None:
    """After one optimizer step the warm-up has advanced one step (lr · 2/warmup), whatever the world size."""
    lr, warmup = runs[1]["lr"], runs[1]["warmup"]
    assert runs[1][case]["rank_metrics"][0]["train/lr"] == pytest.approx(lr * 2 / warmup)
    for m in runs[2][case]["rank_metrics"]:
        assert m["train/lr"] == pytest.approx(lr * 2 / warmup)


def test_token_mode_control_with_rank_local_count_fails(runs: dict[int, dict[str, Any]]) -> None:
    """Normalising each rank by its own token count (the bug `global_token_count` prevents) is caught."""
    one, bug = runs[1]["grpo/token"], runs[2]["grpo/token_local_count"]
    assert rel(bug["grad"], one["grad"]) > 1e-2
    assert rel(bug["params"], one["params"]) > 1e3 * RTOL


def test_sft_step_matches_single_process(runs: dict[int, dict[str, Any]]) -> None:
    _assert_same_step(runs[1]["sft"], runs[2]["sft"])


@pytest.mark.parametrize("case", [*(f"grpo/{m}" for m in MODES), "sft"])
def test_loss_mean_over_ranks_is_global_loss(runs: dict[int, dict[str, Any]], case: str) -> None:
    """Tolerance relative to the largest per-rank term: the rank losses can have opposite signs (e.g.
    -0.054 and 0.119 → 0.032), and fp32 sums are exact only relative to their terms."""
    want = runs[1][case]["rank_metrics"][0]["train/loss"]
    per_rank = [m["train/loss"] for m in runs[2][case]["rank_metrics"]]
    scale = max(abs(x) for x in [*per_rank, want])
    assert abs(sum(per_rank) / len(per_rank) - want) <= RTOL * scale, f"{per_rank} vs {want}"


def test_reward_metrics_mean_over_ranks_is_global(runs: dict[int, dict[str, Any]]) -> None:
    want = runs[1]["slicing"]["rank_metrics"][0]
    per_rank = runs[2]["slicing"]["rank_metrics"]
    for key in (
        "reward/reward_mean",
        "reward/format_reward_rate",
        "reward/answer_reward_rate",
        "reward/frac_zero_std_groups",
    ):
        assert sum(m[key] for m in per_rank) / len(per_rank) == pytest.approx(want[key], rel=RTOL), key
    penalties = [m["reward/overlong_penalty_mean"] for m in per_rank]  # DAPO shaping: reduced over the ranks
    assert want["reward/overlong_penalty_mean"] < 0
    assert penalties == pytest.approx([want["reward/overlong_penalty_mean"]] * 2, rel=RTOL)


def test_groups_are_not_split_across_ranks(runs: dict[int, dict[str, Any]]) -> None:
    group, questions = runs[1]["group_size"], runs[1]["questions"]
    one, two = runs[1]["slicing"], runs[2]["slicing"]
    global_prompts = one["rank_prompts"][0]
    assert len(global_prompts) == group * questions
    rank_prompts = two["rank_prompts"]
    assert [p for ps in rank_prompts for p in ps] == global_prompts  # rank r: questions [r·q, (r+1)·q)
    for ps in rank_prompts:
        groups = [ps[i : i + group] for i in range(0, len(ps), group)]
        assert all(len(set(g)) == 1 for g in groups), "a rank's rows are not whole, contiguous groups"
    assert not set(rank_prompts[0]) & set(rank_prompts[1]), "a question was generated on both ranks"
    assert [a for ads in two["rank_advantages"] for a in ads] == one["rank_advantages"][0]
    assert all(s == one["sampler_state"][0] for s in two["sampler_state"]), "samplers out of step"


def test_batch_std_advantages_use_every_ranks_rewards(runs: dict[int, dict[str, Any]]) -> None:
    """``grpo.std_normalization_scope: batch``: each rank divides its group-centred rewards by the std of the
    whole batch's rewards (every rank's), as one process does; by hand from the gathered rewards."""
    one, two = runs[1]["slicing_batch_std"], runs[2]["slicing_batch_std"]
    rewards = torch.tensor(one["rank_rewards"][0], dtype=torch.float64)
    group = runs[1]["group_size"]
    centred = (rewards.view(-1, group) - rewards.view(-1, group).mean(-1, keepdim=True)).flatten()
    want = centred / (rewards.std() + 1e-6)
    assert float(rewards.std()) > 0 and float(centred.abs().max()) > 0
    torch.testing.assert_close(torch.tensor(one["rank_advantages"][0], dtype=torch.float64), want, rtol=1e-6, atol=1e-7)
    got = torch.tensor([a for ads in two["rank_advantages"] for a in ads], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_only_rank_zero_writes_files(runs: dict[int, dict[str, Any]]) -> None:
    files_one, files_two = runs[1]["files"], runs[2]["files"]
    rank0, *others = files_two["rank_writes"]
    assert ("open", "metrics.jsonl") in rank0 and ("open", "config.yaml") in rank0
    for rank, writes in enumerate(others, start=1):
        opened = [path for event, path in writes if event != "os.mkdir"]
        assert not opened, f"rank {rank} wrote {opened}"
        made = {path for event, path in writes if event == "os.mkdir"}
        assert made <= {"checkpoints/step_000001.tmp/state"}, made  # accelerate's makedirs(exist_ok=True)
    # what reaches disk: the 1-process run's files plus rank 1's own RNG state, nothing written twice
    extra = set(files_two["listing"]) - set(files_one["listing"])
    assert extra == {"checkpoints/step_000001/state/random_states_1.pkl"}
    assert set(files_one["listing"]) <= set(files_two["listing"])


def test_checkpoint_is_complete_when_a_rank_is_slow(runs: dict[int, dict[str, Any]]) -> None:
    case = runs[2]["slow_rank_checkpoint"]
    assert case["rank_errors"] == [None, None], case["rank_errors"]
    files = case["listing"]
    assert "checkpoints/step_000001/state/random_states_1.pkl" in files, files
    assert not [f for f in files if ".tmp" in f], files


# ---- DPO: the metrics a whole run logs ----------------------------------------------------------
DPO_PAIRS = 13  # 3 held out, 10 trained on: optimizer steps of 3, 3, 3 and 1 pairs
DPO_TOL = 1e-4  # see test_dpo_logged_metrics_match_single_process


Records = dict[int, dict[int, dict[str, float]]]  # world -> step -> that step's logged metrics, merged
Forwards = dict[int, dict[int, list[Any]]]  # world -> rank -> its held-out forward passes' batches
HELD_OUT = 3  # held-out items of both whole runs, 1 per micro-batch: 2 + 1 over 2 ranks
EVALS = 3  # evaluations of both whole runs: before step 1, after steps 2 and 4


def whole_runs(tiny_qwen2_path: str, out: Path, mode: str, lines: list[dict[str, str]]) -> tuple[Records, Forwards]:
    """`tests/dp_worker.py MODE` in world 1 and world 2: each world's logged records, merged by step, and
    each rank's held-out forward passes (`dp_worker.record_heldout_forwards`)."""
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    launch_worlds(WORKER, lambda world: [tiny_qwen2_path, str(out / f"w{world}"), str(world), mode, str(data)],
                  out, TIMEOUT_S)
    runs: Records = {}
    forwards: Forwards = {}
    for world in (1, 2):
        for record in read_metrics(out / f"w{world}" / "run"):
            runs.setdefault(world, {}).setdefault(record["step"], {}).update(record)
        forwards[world] = {rank: json.loads((out / f"w{world}" / f"heldout_forwards_{rank}.json").read_text())
                           for rank in range(world)}  # fmt: skip
    return runs, forwards


@pytest.fixture(scope="module")
def dpo_whole(tiny_qwen2_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Records, Forwards]:
    """`train_dpo` in world 1 and world 2 (`dp_worker.run_main`)."""
    lines = [{"prompt": f"What is {a} + 3?", "chosen": f"{a} + 3 = {a + 3}", "rejected": f"{a} + 3 = {a + 13}"}
             for a in range(DPO_PAIRS)]  # fmt: skip
    return whole_runs(tiny_qwen2_path, tmp_path_factory.mktemp("dpo"), "dpo", lines)


@pytest.fixture(scope="module")
def dpo_runs(dpo_whole: tuple[Records, Forwards]) -> Records:
    return dpo_whole[0]


def test_dpo_steps_split_unevenly_over_two_ranks(tmp_path: Path) -> None:
    """The run below is not vacuous: its ranks hold 2 and 1 real pairs in steps 1-3, 1 and 0 in step 4."""
    d = dpo_run_config("unused", "unused", tmp_path).dpo
    train, held = split_heldout(DPO_PAIRS, d.validation_fraction, 0)
    assert (len(train), len(held)) == (10, 3)
    steps = epoch_batches(len(train), DPO_PAIRS_PER_STEP, 0)  # seed 0 · 100_003 + epoch 0
    grad_accum = -(-DPO_PAIRS_PER_STEP // 2 // d.micro_batch_pairs)
    split = [[sum(len(m.rows) for m in deal_micro_batches(rows, grad_accum, r, 2) if not m.dummy) for r in (0, 1)]
             for rows in steps]  # fmt: skip
    assert split == [[2, 1], [2, 1], [2, 1], [1, 0]]


def test_dpo_logged_metrics_match_single_process(dpo_runs: dict[int, dict[int, dict[str, float]]]) -> None:
    """Every logged ``train/*`` and ``eval/*`` value of the 2-rank run equals the 1-process one.

    Tolerance 1e-4 absolute (relative where the value is above 1). Both worlds compute each pair's log-probs
    with the same shapes (1 pair per micro-batch); they differ by the float32 summation order of the
    gradient (rank 0's two pairs, then the all-reduce, against three pairs in a row), which RMSprop's
    nearly sign-like first updates amplify on near-zero gradient components: the held-out rewards (~1-2)
    differ by 1e-6 after one step and 5e-6 after four, the step-4 training rewards by 1.5e-5. Before the
    fix (rank 0 logged the mean of the two ranks' means) step 2 logged accuracy 0.25 for 1/3, loss 0.71449
    for 0.71159 and reward_rejected -0.2651 for -0.2503; step 3 accuracy 0.75 for 2/3 and reward_margin
    0.127 for 0.069: off by 2.8e-3 or more, at least 28x the tolerance."""
    one, two = dpo_runs[1], dpo_runs[2]
    assert sorted(one) == sorted(two) == [0, 1, 2, 3, 4]
    assert [s for s in one if "train/loss" in one[s]] == [1, 2, 3, 4]
    assert [s for s in one if "eval/loss" in one[s]] == [0, 2, 4]
    assert any(abs(one[s]["train/reward_margin"]) > 1e-3 for s in (2, 3, 4)), "the policy never moved"
    wrong = []
    for step, want in one.items():
        keys = sorted(k for k in want if k.startswith(("train/", "eval/")))
        assert keys == sorted(k for k in two[step] if k.startswith(("train/", "eval/"))), step
        wrong += [f"step {step} {k}: world 2 {two[step][k]!r}, world 1 {want[k]!r}"
                  for k in keys if abs(two[step][k] - want[k]) > DPO_TOL * max(1.0, abs(want[k]))]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def assert_heldout_sharded(forwards: Forwards) -> None:
    """Each rank of world 2 ran its held-out forward passes on its own share only (2 and 1 of the 3
    micro-batches, disjoint, together all of them), and as many passes as the other rank (rank 1 repeats
    its batch as a stand-in): 2 per evaluation where world 1 runs 3. Before the sharding every rank ran all
    3 batches per evaluation (9 passes per rank over the run)."""
    key = json.dumps
    (whole,) = forwards[1].values()
    assert len(whole) == EVALS * HELD_OUT and len({key(b) for b in whole}) == HELD_OUT
    shares = [{key(b) for b in forwards[2][rank]} for rank in (0, 1)]
    assert [len(f) for f in forwards[2].values()] == [EVALS * 2, EVALS * 2], forwards[2]
    assert [len(share) for share in shares] == [2, 1], shares
    assert shares[0] | shares[1] == {key(b) for b in whole}


def test_dpo_validation_is_sharded_over_ranks(dpo_whole: tuple[Records, Forwards]) -> None:
    """`Validator`: each rank evaluates only its share of the held-out pairs (`heldout_share`); the exact
    global means it logs are checked by `test_dpo_logged_metrics_match_single_process`."""
    assert_heldout_sharded(dpo_whole[1])


# ---- SFT: the held-out loss of a whole run ------------------------------------------------------
SFT_EXAMPLES = 13  # 3 held out, 10 trained on


@pytest.fixture(scope="module")
def sft_whole(tiny_qwen2_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Records, Forwards]:
    """`train_sft` in world 1 and world 2 (`dp_worker.run_main`)."""
    lines = [{"prompt": f"What is {a} + 3? ", "response": f"{a} + 3 = {a + 3}"} for a in range(SFT_EXAMPLES)]
    return whole_runs(tiny_qwen2_path, tmp_path_factory.mktemp("sft"), "sft", lines)


def test_sft_heldout_loss_is_sharded_and_matches_single_process(sft_whole: tuple[Records, Forwards]) -> None:
    """`global_heldout_loss`: each rank evaluates its share of the 3 held-out examples, and the logged
    ``eval/loss`` (token sums added over the ranks, then divided) equals the 1-process one, as does
    ``train/loss``; tolerance as `test_dpo_logged_metrics_match_single_process` (the same float32
    summation-order drift under RMSprop). An average of the two ranks' means would be off (rank 0 holds 2
    of the held-out examples, rank 1 one)."""
    one, two = sft_whole[0][1], sft_whole[0][2]
    train, held = split_heldout(SFT_EXAMPLES, sft_run_config("unused", "unused", Path()).sft.validation_fraction, 0)
    assert (len(train), len(held)) == (10, 3)
    assert [s for s in one if "eval/loss" in one[s]] == [s for s in two if "eval/loss" in two[s]] == [0, 2, 4]
    assert one[4]["eval/loss"] < one[0]["eval/loss"] - 1e-3, "the policy never moved"
    wrong = [f"step {step} {k}: world 2 {two[step][k]!r}, world 1 {want[k]!r}"
             for step, want in one.items() for k in ("eval/loss", "train/loss")
             if k in want and abs(two[step][k] - want[k]) > DPO_TOL * max(1.0, abs(want[k]))]  # fmt: skip
    assert not wrong, "\n".join(wrong)
    assert_heldout_sharded(sft_whole[1])
