"""Reward functions (CS336 semantics) and the isolated `RewardScorer` pool (real worker processes)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, TESTS, repo_pythonpath
from reward_fns import misbehaving_reward

from rollout.reward import (
    REWARD_FNS,
    RewardResult,
    RewardScorer,
    get_reward_fn,
    question_only_reward,
    r1_zero_answer,
    r1_zero_reward,
)
from rollout.transfer import free_port
from trainer.data.tasks import load_gsm8k


def R(answer: str, reasoning: str = "Let me compute.") -> str:
    """A well-formatted R1-Zero response (what follows the prompt's trailing "<think>")."""
    return f"{reasoning} </think> <answer>{answer}</answer>"


# (response, gold, expected format_reward, expected answer_reward); reward == answer_reward throughout.
R1_ZERO_TABLE = [
    # GSM8K numeric forms that must be accepted
    (R(" 18 "), "18", 1, 1),
    (R("1,000"), "1000", 1, 1),
    (R("1000.0"), "1000", 1, 1),
    (R("$18"), "18", 1, 1),
    (R("18 dollars"), "18", 1, 1),
    (R("\\boxed{18}"), "18", 1, 1),
    (R("18."), "18", 1, 1),
    (R("\\$18.00"), "18", 1, 1),
    (R("$\\boxed{18}$"), "18", 1, 1),
    (R("1,000 dollars"), "1000", 1, 1),
    (R("1,000,000"), "1000000", 1, 1),
    (R("1000000"), "1,000,000", 1, 1),
    (R("18"), "18.0", 1, 1),
    (R("18 apples"), "18", 1, 1),
    (R("18\\text{ apples}"), "18", 1, 1),
    (R("+18"), "18", 1, 1),
    (R("-0"), "0", 1, 1),
    (R("72\\,000"), "72000", 1, 1),
    (R("The answer is 18."), "18", 1, 1),
    (R("x = 18"), "18", 1, 1),
    # ... and rejected
    (R("180"), "18", 1, 0),
    (R("1.8"), "18", 1, 0),
    (R(""), "18", 1, 0),
    (R("   "), "18", 1, 0),
    (R("18.5"), "18", 1, 0),
    (R("12,34"), "1234", 1, 0),
    (R("18 or 20"), "20", 1, 0),
    (R("18, 20"), "20", 1, 0),
    (R("nan"), "18", 1, 0),
    (R("inf"), "18", 1, 0),
    (R("18"), "", 1, 0),
    # negative numbers
    (R("-3"), "-3", 1, 1),
    (R("\u22123"), "-3", 1, 1),
    (R("3"), "-3", 1, 0),
    # fractions and percentages
    (R("\\frac{1}{2}"), "0.5", 1, 1),
    (R("0.5"), "\\frac{1}{2}", 1, 1),
    (R("1/2"), "0.5", 1, 1),
    (R("\\dfrac{3}{4}"), "0.75", 1, 1),
    (R("-\\frac{3}{2}"), "-1.5", 1, 1),
    (R("50\\%"), "50", 1, 1),
    (R("50%"), "0.5", 1, 1),
    (R("50 percent"), "50", 1, 1),
    (R("5%"), "50", 1, 0),
    # LaTeX and symbolic answers (MATH-style golds)
    (R("\\frac{\\sqrt{2}}{2}"), "\\frac{\\sqrt{2}}{2}", 1, 1),
    (R("\\sqrt{2}/2"), "\\frac{\\sqrt{2}}{2}", 1, 1),
    (R("2^{10}"), "1024", 1, 1),
    (R("(x+1)^2"), "x^2+2x+1", 1, 1),
    (R("\\pi"), "\\pi", 1, 1),
    (R("3.14"), "\\pi", 1, 0),
    (R("\\infty"), "\\infty", 1, 1),
    (R("\\left( 1, 2 \\right)"), "(1,2)", 1, 1),
    (R("A"), "A", 1, 1),
    (R("B"), "A", 1, 0),
    (R("9**9**9"), "18", 1, 0),
    # boxes inside the answer
    (R("The total is \\boxed{72} apples"), "72", 1, 1),
    (R("\\boxed{17} then \\boxed{18}"), "18", 1, 1),
    (R("\\fbox{18}"), "18", 1, 1),
    (R("\\boxed{}"), "18", 1, 0),
    (R("\\boxed{18"), "18", 1, 0),
    # structure
    ("</think> <answer>18</answer>", "18", 1, 1),  # empty reasoning is still formatted
    ("a </think> <answer>17</answer> <answer>18</answer>", "18", 1, 1),  # the last answer counts
    ("a </think> <answer>17</answer> <answer>18</answer>", "17", 1, 0),
    ("a </think> <answer>18</answer> and then 19", "18", 1, 1),  # text after </answer> is ignored
    # unformatted: everything 0, even when the number is right (CS336: no answer credit without format)
    ("a <answer>18</answer>", "18", 0, 0),  # no </think>
    ("a </think><answer>18</answer>", "18", 0, 0),  # CS336 requires "</think> <answer>" exactly
    ("a </think>\n<answer>18</answer>", "18", 0, 0),
    ("a </think> <answer>18", "18", 0, 0),  # unclosed
    ("a </think> <answer>18</answer> <answer>", "18", 0, 0),  # the last <answer> is unclosed
    ("a </think> 18", "18", 0, 0),
    ("18", "18", 0, 0),
    ("", "18", 0, 0),
]


def test_table_is_big_enough() -> None:
    assert len(R1_ZERO_TABLE) >= 60


@pytest.mark.parametrize(("response", "gold", "fmt", "ans"), R1_ZERO_TABLE)
def test_r1_zero_reward(response: str, gold: str, fmt: int, ans: int) -> None:
    assert r1_zero_reward(response, gold) == RewardResult(
        format_reward=float(fmt), answer_reward=float(ans), reward=float(ans)
    )


def test_r1_zero_answer() -> None:
    assert r1_zero_answer(R(" 5 ")) == " 5 "
    assert r1_zero_answer(R("so \\boxed{\\frac{1}{2}} it is")) == "\\frac{1}{2}"
    assert r1_zero_answer("x </think><answer>5</answer>") is None


@pytest.mark.parametrize(
    ("response", "gold", "fmt", "ans"),
    [
        ("The answer is \\boxed{18}.", "18", 1, 1),
        ("48 + 24 = 72", "72", 1, 1),
        ("In total 1,000 people.", "1000", 1, 1),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1, 1),
        ("\\boxed{17}, though the final value is 18", "18", 1, 0),  # a box wins over later numbers
        ("\\boxed{5", "5", 0, 0),  # the box was the answer and it is not closed: no answer
        ("It is 180.", "18", 1, 0),
        ("no number here", "72", 0, 0),
        ("", "72", 0, 0),
    ],
)
def test_question_only_reward(response: str, gold: str, fmt: int, ans: int) -> None:
    assert question_only_reward(response, gold) == RewardResult(
        format_reward=float(fmt), answer_reward=float(ans), reward=float(ans)
    )


def test_every_gsm8k_test_gold_scores_one(gsm8k_dir: Path) -> None:
    """The gold of every GSM8K test example, written the way the dataset writes it (with commas), in the
    R1-Zero format, earns reward 1; the gold plus one earns 0."""
    examples = load_gsm8k(gsm8k_dir, split="test")
    assert len(examples) == 1319
    for ex in examples:
        raw = ex.solution.rsplit("####", 1)[1].strip()
        assert r1_zero_reward(R(raw), ex.answer).reward == 1.0, (raw, ex.answer)
        assert r1_zero_reward(R(str(int(ex.answer) + 1)), ex.answer).reward == 0.0


def test_get_reward_fn() -> None:
    assert get_reward_fn("r1_zero") is r1_zero_reward
    assert set(REWARD_FNS) == {"r1_zero", "question_only"}
    with pytest.raises(KeyError, match="unknown reward function 'nope'"):
        get_reward_fn("nope")


# --------------------------------------------------------------------------------------------------
# The pool. Custom reward functions live in `reward_fns` (a light module) so worker processes import them
# quickly.


@pytest.fixture(scope="module")
def scorer() -> Iterator[RewardScorer]:
    with RewardScorer("r1_zero", timeout_s=1.0, num_workers=2) as s:
        yield s


def test_pool_matches_in_process_on_the_table(scorer: RewardScorer) -> None:
    responses = [r for r, _, _, _ in R1_ZERO_TABLE]
    golds = [g for _, g, _, _ in R1_ZERO_TABLE]
    scorer.metrics()
    assert scorer.score(responses, golds) == [
        r1_zero_reward(r, g) for r, g in zip(responses, golds, strict=True)
    ]
    m = scorer.metrics()
    n = len(R1_ZERO_TABLE)
    assert m["reward/samples"] == n
    assert m["reward/format_rate"] == sum(f for _, _, f, _ in R1_ZERO_TABLE) / n
    assert m["reward/answer_rate"] == sum(a for _, _, _, a in R1_ZERO_TABLE) / n
    assert m["reward/mean"] == m["reward/answer_rate"]
    assert m["reward/timeouts"] == 0 and m["reward/errors"] == 0
    assert 0 < m["reward/latency_p50_ms"] <= m["reward/latency_p99_ms"] < 1000
    assert scorer.metrics()["reward/samples"] == 0  # metrics() resets


def test_pool_from_a_worker_thread_and_concurrent_calls(scorer: RewardScorer) -> None:
    """No signals in the parent: score() works off the main thread, and concurrent calls are serialised."""
    golds = [str(i) for i in range(200)]
    outputs: dict[int, list[RewardResult]] = {}

    def run(k: int) -> None:
        outputs[k] = scorer.score([R(str(i + k)) for i in range(200)], golds)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [sum(r.reward for r in outputs[k]) for k in range(3)] == [200.0, 0.0, 0.0]


def test_timeouts_errors_and_crashes_score_zero_and_are_counted() -> None:
    batch = ["ok", "hang", "ok", "raise", "die", "garbage", "nan", "print", "ok", "hang", "ok"]
    with RewardScorer(misbehaving_reward, timeout_s=0.5, num_workers=2) as s:
        start = time.monotonic()
        out = s.score(batch, ["ok"] * len(batch))
        elapsed = time.monotonic() - start
        m = s.metrics()
        # The pool still works after its workers were killed and replaced.
        assert [r.answer_reward for r in s.score(["ok", "no"] * 20, ["ok"] * 40)] == [1.0, 0.0] * 20
    assert [r.reward for r in out] == [1.0, 0, 1.0, 0, 0, 0, 0, 1.0, 1.0, 0, 1.0]
    assert m["reward/timeouts"] == 2
    assert m["reward/errors"] == 4  # raise, die, garbage, nan
    assert m["reward/worker_restarts"] == 3  # two hangs killed, one process died
    assert m["reward/latency_p99_ms"] >= 500
    assert elapsed < 15.0  # two 0.5 s timeouts and three restarts (~1 s each under load); never 120 s


def test_in_process_mode_counts_errors_without_isolation() -> None:
    with RewardScorer(misbehaving_reward, num_workers=0) as s:
        out = s.score(["ok", "raise", "garbage"], ["ok"] * 3)
        m = s.metrics()
    assert [r.reward for r in out] == [1.0, 0.0, 0.0]
    assert m["reward/errors"] == 2 and m["reward/timeouts"] == 0


def test_untallied_scores_stay_out_of_the_training_metrics() -> None:
    """Held-out evaluation grades with ``tally=False``: its samples, timeouts, errors and restarts are not
    counted in `metrics`, which describe the training samples scored around it (an evaluation between two
    expert-iteration steps used to add its answers to the next step's reward/* values)."""
    with RewardScorer(misbehaving_reward, timeout_s=0.5, num_workers=1) as s:
        s.score(["ok", "no"], ["ok"] * 2)
        held_out = s.score(["ok", "hang", "raise", "ok"], ["ok"] * 4, tally=False)
        s.score(["ok"], ["ok"])
        m = s.metrics()
    assert [r.answer_reward for r in held_out] == [1.0, 0.0, 0.0, 1.0]  # still graded, failures still zero
    assert (m["reward/samples"], m["reward/answer_rate"]) == (3.0, 2 / 3)
    assert (m["reward/timeouts"], m["reward/errors"], m["reward/worker_restarts"]) == (0.0, 0.0, 0.0)
    assert m["reward/latency_p99_ms"] < 500  # the held-out hang's 0.5 s is not among the latencies


def test_bad_reward_functions_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="cannot be sent to worker processes"):
        RewardScorer(lambda r, g: {"reward": 0.0}, num_workers=1)

    def main_fn(r: str, g: str) -> RewardResult:
        return RewardResult.graded(False, False)

    main_fn.__module__ = "__main__"
    with pytest.raises(ValueError, match="defined in __main__"):
        RewardScorer(main_fn, num_workers=1)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        RewardScorer("r1_zero", timeout_s=0)
    with pytest.raises(KeyError, match="unknown reward function"):
        RewardScorer("nope")


def test_worker_startup_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A function the parent can pickle but a worker cannot import fails loudly, not with zeros."""
    module = types.ModuleType("only_in_parent")

    def fn(r: str, g: str) -> RewardResult:
        return RewardResult.graded(True, True)

    fn.__module__ = module.__name__
    fn.__qualname__ = "fn"
    module.fn = fn  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert pickle.loads(pickle.dumps(fn)) is fn
    with (
        RewardScorer(fn, num_workers=1) as s,
        pytest.raises(RuntimeError, match="No module named 'only_in_parent'"),
    ):
        s.score(["x"], ["y"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_close_is_idempotent_and_stops_workers() -> None:
    s = RewardScorer("r1_zero", num_workers=2)
    assert s.score([R("1")], ["1"])[0].reward == 1.0
    for _ in range(600):  # until both are up (workers report in during score)
        if all(w.pid for w in s._procs.workers):
            break
        s.score([R("1")] * 8, ["1"] * 8)
        time.sleep(0.05)
    template = s._procs.template
    pids = [w.pid for w in s._procs.workers]
    assert template is not None and len(pids) == 2 and all(pids)
    s.close()
    s.close()
    assert template.proc.poll() is not None
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="after close"):
        s.score([R("1")], ["1"])
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        RewardScorer("r1_zero", num_workers=0).score(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="gold 1 is int, not str"):
        RewardScorer("r1_zero", num_workers=0).score(["a", "b"], ["1", 2])  # type: ignore[list-item]


@pytest.mark.slow
def test_inside_accelerate_launch(tmp_path: Path) -> None:
    """Two `accelerate launch` processes (torch loaded, a gloo process group up) each run a scorer from a
    worker thread, in a script with no ``__main__`` guard (which a multiprocessing spawn pool would re-import
    in every worker). ``--multi_gpu`` is accelerate's torchrun mode; with ``cpu=True`` it runs on CPUs."""
    repo = REPO
    script = tmp_path / "score_script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, sys, threading
            import torch
            sys.path.insert(0, {str(repo)!r})
            from accelerate import Accelerator
            from rollout.reward.pool import RewardScorer
            accelerator = Accelerator(cpu=True)
            scorer = RewardScorer("r1_zero", timeout_s=1.0, num_workers=2)
            out = []
            t = threading.Thread(target=lambda: out.extend(scorer.score(
                ["a </think> <answer> 4 </answer>", "a </think> <answer> 9**9**9 </answer>"], ["4", "4"])))
            t.start(); t.join()
            scorer.close()
            accelerator.wait_for_everyone()
            with open(os.path.join({str(tmp_path)!r}, f"rank{{accelerator.process_index}}.json"), "w") as f:
                json.dump([r.reward for r in out], f)
            torch.distributed.destroy_process_group()  # an exit with the group alive can abort
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=repo_pythonpath())
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(script)],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [1.0, 0.0]


def test_docstring_examples() -> None:
    """The doctest-sized examples in the reward modules' docstrings are true."""
    import doctest

    import rollout.reward.custom
    import rollout.reward.deadline
    import rollout.reward.functions
    import rollout.reward.grading
    import rollout.reward.guard
    import rollout.reward.parsers
    import rollout.reward.pool
    import trainer.data.tasks

    modules = (rollout.reward.parsers, rollout.reward.grading, rollout.reward.guard, rollout.reward.deadline,
               rollout.reward.functions, rollout.reward.custom, rollout.reward.pool)  # fmt: skip
    for module in (*modules, trainer.data.tasks):
        result = doctest.testmod(module)
        assert (module.__name__, result.failed) == (module.__name__, 0)
        assert result.attempted > 0


def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """A parent SIGKILLed mid-score (no close, no finalizers) leaves no template or worker behind, even one
    stuck in a hanging sample: the template sees its socket close, its workers get PR_SET_PDEATHSIG."""
    tests_dir = TESTS
    script = textwrap.dedent(
        f"""
        import os, sys, threading, time
        sys.path[:0] = [{str(tests_dir.parent)!r}, {str(tests_dir)!r}]
        from rollout.reward.pool import RewardScorer
        from reward_fns import misbehaving_reward
        s = RewardScorer(misbehaving_reward, timeout_s=100, num_workers=2)
        for _ in range(600):  # until both workers are up (they report in during score)
            if all(w.pid for w in s._procs.workers):
                break
            s.score(["ok"] * 8, ["ok"] * 8)
            time.sleep(0.05)
        print(s._procs.template.proc.pid, *[w.pid for w in s._procs.workers], flush=True)
        threading.Thread(target=s.score, args=(["hang"], ["ok"]), daemon=True).start()
        time.sleep(0.5)
        os.kill(os.getpid(), 9)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 3
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in pids if _alive(pid)] == []
