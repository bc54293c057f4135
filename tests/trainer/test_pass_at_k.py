"""Several samples per held-out question (``eval.samples_per_question``, `trainer.evaluate`): the pass@k
estimator against hand-computed values and against counting every k-subset, its mean over questions, and a
`reasonrl eval` through real vLLM that draws n samples per question, seeded so that sample 0 of each question
is the sample a one-sample evaluation draws."""

from __future__ import annotations

import json
import random
from itertools import combinations
from math import isclose
from pathlib import Path

import pytest
from helpers import REPO

from trainer.config_io import load_config
from trainer.evaluate import pass_at_k, pass_at_ks, summarize
from trainer.tools.eval_cli import run_eval


def naive_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The fraction of k-subsets of the samples that hold a correct one."""
    subsets = list(combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_by_hand() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(8, 1, 4) == pytest.approx(0.5)  # 1 - C(7,4)/C(8,4) = 1 - 35/70
    assert pass_at_k(6, 0, 6) == 0.0 and pass_at_k(6, 1, 6) == 1.0 and pass_at_k(6, 6, 1) == 1.0


def test_pass_at_k_counts_what_every_k_subset_gives() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 10)
        outcomes = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            assert isclose(pass_at_k(n, sum(outcomes), k), naive_pass_at_k(outcomes, k), abs_tol=1e-12), (outcomes, k)


def records(correct_per_question: list[list[bool]]) -> list[dict[str, float]]:
    return [{"question": q, "sample": k, "answer_reward": float(c), "reward": float(c), "format_reward": 1.0,
             "length": 3, "entropy": 0.5}
            for q, outcomes in enumerate(correct_per_question) for k, c in enumerate(outcomes)]  # fmt: skip


def test_pass_at_ks_are_means_over_questions() -> None:
    """Three questions with 0, 1 and 4 of 4 samples correct."""
    rows = records([[False] * 4, [False, True, False, False], [True] * 4])
    assert pass_at_ks(rows) == pytest.approx({"eval/pass@1": (0 + 1 / 4 + 1) / 3, "eval/pass@2": (0 + 1 / 2 + 1) / 3,
                                              "eval/pass@4": (0 + 1 + 1) / 3})
    metrics = summarize(rows)
    assert metrics["eval/accuracy"] == metrics["eval/pass@1"] == pytest.approx(5 / 12)
    assert metrics["eval/n"] == 3  # questions, not samples
    assert sorted(pass_at_ks(records([[True, False, True]]))) == ["eval/pass@1", "eval/pass@2", "eval/pass@3"]


def test_one_sample_per_question_logs_no_pass_at_k() -> None:
    assert pass_at_ks(records([[True], [False]])) == {} and "eval/pass@1" not in summarize(records([[True]]))


def test_unequal_sample_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="the same number of samples per question: 2 and \\[1, 2\\]"):
        pass_at_ks(records([[True, False], [True]]))


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.usefixtures("one_torch_thread")
def test_eval_draws_n_samples_per_question_through_vllm(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """`reasonrl eval` with eval.samples_per_question=4 on the vLLM engine: 4 records per question in order,
    not all alike, pass@k recomputed from the records by counting subsets, pass@1 = accuracy. Sample k of a
    question is seeded ``mix(seed, question) + k``, so sample 0 is what the same evaluation with one sample
    per question draws."""
    common = [f"model.path={tiny_qwen2_path}", "rollout.engine=vllm", "rollout.enforce_eager=true", "eval.limit=6",
              "eval.max_tokens=8", "eval.temperature=1.0", "logging.progress=false"]
    results = {}
    for n in (1, 4):
        cfg = load_config(REPO / "configs" / "grpo_tiny_cpu.yaml",
                          [*common, f"output_dir={tmp_path / f'n{n}'}", f"eval.samples_per_question={n}"])
        out = tmp_path / f"n{n}.jsonl"
        results[n] = run_eval(cfg, None, str(out)), [json.loads(line) for line in out.read_text().splitlines()]
    metrics, rows = results[4]
    assert [(r["question"], r["sample"]) for r in rows] == [(q, k) for q in range(6) for k in range(4)]
    assert any(len({r["response"] for r in rows[q * 4:(q + 1) * 4]}) > 1 for q in range(6)), "samples differ"
    outcomes = [[r["answer_reward"] > 0 for r in rows[q * 4:(q + 1) * 4]] for q in range(6)]
    for k in (1, 2, 4):
        expected = sum(naive_pass_at_k(o, k) for o in outcomes) / 6
        assert metrics[f"eval/pass@{k}"] == pytest.approx(expected, abs=1e-12), k
    assert metrics["eval/pass@1"] == pytest.approx(metrics["eval/accuracy"], abs=1e-12)
    assert metrics["eval/n"] == 6 and "eval/pass@1" not in results[1][0]
    assert [r["response"] for r in results[1][1]] == [r["response"] for r in rows if r["sample"] == 0]
