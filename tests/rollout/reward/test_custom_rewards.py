"""Rewards named in the config (`rollout.reward.custom`): built-in names, ``"package.module:function"`` and
weighted lists, checked at config load, scored in the isolated pool and used by a real `reasonrl train` run.
The custom rewards live in a module written into `tmp_path`, outside the project, reached through PYTHONPATH."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import REPO, repo_pythonpath

from rollout.reward import CombinedReward, RewardResult, RewardScorer, RewardTerm, r1_zero_reward
from rollout.reward.custom import load_reward_fn, reward_fn_from_spec
from trainer.config import ConfigError
from trainer.config_io import load_config
from trainer.tracking import read_metrics

TINY = REPO / "configs" / "grpo_tiny_cpu.yaml"

EXTERNAL = '''
import os, time
from rollout.reward import RewardResult

def fixed(response, ground_truth):
    """format 1, answer 0, reward 0.375 whatever the response; 'hang' sleeps past any limit."""
    if response == "hang":
        time.sleep(120)
    return RewardResult(format_reward=1.0, answer_reward=0.0, reward=0.375)

def eighth(response, ground_truth):
    return RewardResult(format_reward=0.0, answer_reward=0.0, reward=0.125)

def plain_float(response, ground_truth):
    return 0.5

def one_argument(response):
    return RewardResult(format_reward=0.0, answer_reward=0.0, reward=0.0)

def pid(response, ground_truth):
    return RewardResult(format_reward=0.0, answer_reward=0.0, reward=float(os.getpid()))

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`ext_rewards_<n>` written into tmp_path and put on sys.path (which the pool's workers inherit)."""
    name = f"ext_rewards_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(EXTERNAL))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / name


def _tiny(*overrides: str) -> list[str]:
    return [f"output_dir={REPO / 'runs' / 'never'}", "model.path=nowhere", *overrides]


def test_existing_configs_keep_their_builtin_names() -> None:
    cfg = load_config(TINY, _tiny())
    assert cfg.reward.fn == "r1_zero"
    assert load_config(TINY, _tiny("reward.fn=question_only")).reward.fn == "question_only"
    assert reward_fn_from_spec("r1_zero") is r1_zero_reward


def test_custom_and_weighted_specs_load_and_round_trip(external: Path, tmp_path: Path) -> None:
    mod = external.name
    cfg = load_config(TINY, _tiny(f"reward.fn={mod}:fixed"))
    assert cfg.reward.fn == f"{mod}:fixed"
    listed = f'reward.fn=[{{fn: "{mod}:fixed", weight: 2.0}}, {{fn: r1_zero, weight: 0.5}}]'
    cfg = load_config(TINY, _tiny(listed))
    assert isinstance(cfg.reward.fn, list)
    assert [(t.fn, t.weight) for t in cfg.reward.fn] == [(f"{mod}:fixed", 2.0), ("r1_zero", 0.5)]
    saved = tmp_path / "saved.yaml"  # what a checkpointed run saves and `--resume` reads back
    from trainer.config_io import save_config

    save_config(cfg, saved)
    assert load_config(saved).reward == cfg.reward


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.fn=nope", "reward.fn.name='nope': Value error, 'nope' is neither a built-in reward"),
        ("reward.fn=no_such_pkg.rewards:fn", "cannot import module 'no_such_pkg.rewards' (ModuleNotFoundError"),
        ("reward.fn={mod}:missing", "module '{mod}' has no attribute 'missing'"),
        ("reward.fn={mod}:NOT_A_FUNCTION", "reward function '{mod}:NOT_A_FUNCTION' is not callable (it is int)"),
        ("reward.fn={mod}:one_argument", "must take (response: str, ground_truth: str)"),
        ("reward.fn=[{{fn: r1_zero, weight: .inf}}]", "reward.fn.terms.0.weight=inf: must be a finite number"),
        ("reward.fn=[{{fn: r1_zero, weight: .nan}}]", "reward.fn.terms.0.weight=nan: must be a finite number"),
        ("reward.fn=[{{fn: r1_zero}}, {{fn: '{mod}:missing'}}]", "reward.fn.terms.1.fn='{mod}:missing'"),
        ("reward.fn=[{{fn: r1_zero, wieght: 1}}]", "reward.fn.terms.0.wieght: unknown key"),
        ("reward.fn=[]", "reward.fn.terms=[]: List should have at least 1 item"),
    ],
)
def test_bad_reward_specs_are_one_config_error_naming_the_field(external: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, _tiny(override.format(mod=external.name)))
    assert info.value.problems == [p for p in info.value.problems if p.startswith("reward.fn")]
    assert len(info.value.problems) == 1
    assert message.format(mod=external.name) in info.value.problems[0]


def test_combined_reward_by_hand(external: Path) -> None:
    """fixed: (1, 0, 0.375), eighth: (0, 0, 0.125), r1_zero on a right formatted answer: (1, 1, 1).
    [fixed ×2, eighth ×−1] → reward 0.75 − 0.125 = 0.625, format 1, answer 0 (the first entry's);
    [r1_zero ×1, fixed ×0.1] → 1 + 0.0375 = 1.0375, format 1, answer 1; a single name with weight 1 is the
    function's own result."""
    mod = external.name
    right = "2 + 2 </think> <answer> 4 </answer>"
    both = CombinedReward([RewardTerm(f"{mod}:fixed", 2.0), RewardTerm(f"{mod}:eighth", -1.0)])
    assert both(right, "4") == RewardResult(format_reward=1.0, answer_reward=0.0, reward=0.625)
    graded = reward_fn_from_spec([{"fn": "r1_zero", "weight": 1.0}, {"fn": f"{mod}:fixed", "weight": 0.1}])
    assert graded(right, "4") == RewardResult(format_reward=1.0, answer_reward=1.0, reward=1.0375)
    assert reward_fn_from_spec(f"{mod}:fixed")(right, "4") == RewardResult(1.0, 0.0, 0.375)
    assert pickle.loads(pickle.dumps(both)).terms == both.terms  # sent to workers as names and weights
    assert load_reward_fn(f"{mod}:fixed") is sys.modules[mod].fixed
    with pytest.raises(ValueError, match="must be a finite number"):
        RewardTerm("r1_zero", float("inf"))
    with pytest.raises(TypeError, match="must return a RewardResult"):
        reward_fn_from_spec(f"{mod}:plain_float")("x", "y")


def test_external_reward_in_the_pool_with_its_timeout(external: Path) -> None:
    """The real pool imports the external module in its workers (other processes), kills a hanging call
    after the per-answer limit, and counts a plain float as an error (strict return type)."""
    mod = external.name
    spec = [{"fn": f"{mod}:fixed", "weight": 2.0}, {"fn": f"{mod}:eighth", "weight": -1.0}]
    with RewardScorer(spec, timeout_s=0.5, num_workers=1) as s:
        start = time.monotonic()
        out = s.score(["a", "hang", "b"], ["1", "2", "3"])
        elapsed = time.monotonic() - start
        m = s.metrics()
    assert [r.reward for r in out] == [0.625, 0.0, 0.625]
    assert [r.format_reward for r in out] == [1.0, 0.0, 1.0]
    assert m["reward/timeouts"] == 1 and m["reward/worker_restarts"] == 1 and m["reward/errors"] == 0
    assert elapsed < 15.0  # never the 120 s sleep
    with RewardScorer(f"{mod}:pid", num_workers=1) as s:
        assert s.score(["x"], ["y"])[0].reward not in (0.0, float(os.getpid()))
    with RewardScorer(f"{mod}:plain_float", num_workers=1) as s:
        assert s.score(["x"], ["y"])[0].reward == 0.0
        assert s.metrics()["reward/errors"] == 1


def test_a_bad_reward_fails_train_before_any_model_loads(tmp_path: Path) -> None:
    env = dict(os.environ, WANDB_MODE="disabled", CI="1", PYTHONPATH=repo_pythonpath())
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--config", str(TINY), f"output_dir={tmp_path / 'run'}",
         "model.path=nowhere", "reward.fn=[{fn: r1_zero}, {fn: 'no_such_pkg:length_penalty', weight: 0.1}]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "reward.fn.terms.1.fn='no_such_pkg:length_penalty'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_reasonrl_train_with_an_external_weighted_reward(tiny_qwen2_path: str, external: Path,
                                                         tmp_path: Path) -> None:
    """`reasonrl train` (HF engine, tiny model, one GRPO step and a final evaluation) with
    ``reward.fn = [fixed ×2, eighth ×−1]`` from a module only PYTHONPATH reaches: every rollout and every
    evaluated answer scores 0.625 with format 1 and answer 0, and those are the logged metrics."""
    mod = external.name
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled", CI="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(external.parent), repo_pythonpath()]))  # fmt: skip
    overrides = [
        f"model.path={tiny_qwen2_path}", f"output_dir={run}", "rollout.engine=hf", "warmstart.steps=0",
        "grpo.n_grpo_steps=1", "grpo.rollout_batch_size=8", "grpo.group_size=4", "grpo.train_batch_size=8",
        "grpo.gradient_accumulation_steps=2", "rollout.max_tokens=6", "eval.max_tokens=6", "eval.limit=4",
        "eval.every=0", "reward.num_workers=1", "logging.progress=false",
        f'reward.fn=[{{fn: "{mod}:fixed", weight: 2.0}}, {{fn: "{mod}:eighth", weight: -1.0}}]',
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(TINY), *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run)
    train = [r for r in records if "reward/reward_mean" in r]
    assert len(train) == 1
    assert train[0]["reward/reward_mean"] == pytest.approx(0.625, abs=1e-7)
    assert train[0]["reward/reward_min"] == train[0]["reward/reward_max"]
    assert train[0]["reward/format_reward_rate"] == 1.0 and train[0]["reward/answer_reward_rate"] == 0.0
    evals = [r for r in records if "eval/reward" in r]
    assert evals and evals[-1]["eval/reward"] == pytest.approx(0.625, abs=1e-7)
    assert evals[-1]["eval/format_rate"] == 1.0 and evals[-1]["eval/accuracy"] == 0.0
    saved = (run / "config.yaml").read_text()
    assert f"{mod}:fixed" in saved and "weight: -1.0" in saved
