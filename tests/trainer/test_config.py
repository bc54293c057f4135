"""Config loading: every YAML under configs/ validates; bad configs report every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO

from trainer.cluster import validate_for_cluster
from trainer.config import ConfigError
from trainer.config_io import config_from_dict, load_config, save_config
from trainer.data import prompts


def test_every_config_under_configs_loads() -> None:
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 3, f"found only {files}"
    for f in files:
        cfg = load_config(f)
        assert cfg.model.path, f


def test_reward_timeouts_leave_the_grader_its_own_limit() -> None:
    """A slow symbolic comparison ends inside the worker at `TIME_LIMIT_S` (scored wrong, worker kept); the
    pool's per-sample kill must come later, or every such answer costs a worker restart (the default was
    1.0 s, below the 1.5 s limit). The default, the scorer's own default and every shipped config."""
    import inspect

    from rollout.reward.grading import TIME_LIMIT_S
    from rollout.reward.pool import RewardScorer
    from trainer.config import RewardConfig

    assert RewardConfig().timeout_s > TIME_LIMIT_S
    assert inspect.signature(RewardScorer).parameters["timeout_s"].default > TIME_LIMIT_S
    for f in sorted((REPO / "configs").rglob("*.yaml")):
        assert load_config(f).reward.timeout_s > TIME_LIMIT_S, f.name


def test_low_precision_engines_get_a_probe_threshold_above_their_noise() -> None:
    """vLLM in bf16 (fp16) and the HF learner differ by ~1e-2 log-prob per token (README "stale-weight
    probe"), so a fp32-level threshold (1e-3) raises StaleWeightsError at the step-0 sync. Every config whose
    engine runs in low precision must allow at least 0.1 (the GRPO configs set 1.0, EI 0.5; unset = the
    dtype default, `default_thresholds`: 1.0 for bf16)."""
    import torch

    from trainer.engines import engine_dtype
    from trainer.learner import DTYPES
    from trainer.sync import default_thresholds

    checked = []
    for f in sorted((REPO / "configs").rglob("*.yaml")):
        cfg = load_config(f)
        dtype = DTYPES[engine_dtype(cfg)]
        if dtype == torch.float32:
            continue
        threshold = cfg.rollout.probe_threshold or default_thresholds(dtype)[0]
        assert threshold >= 0.1, f"{f.name}: rollout.probe_threshold={threshold} for a {dtype} engine"
        checked.append(f.name)
    assert "sft_qwen2.5_math_1.5b.yaml" in checked, checked


def test_unknown_keys_wrong_types_and_batch_arithmetic_reported_together() -> None:
    raw = {
        "model": {"path": "m", "dtyp": "bfloat16"},
        "grpo": {"train_batch_size": 10, "gradient_accumulation_steps": 3, "group_size": "eight"},
        "bogus": 1,
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, "x.yaml")
    text = str(info.value)
    assert "model.dtyp: unknown key" in text
    assert "bogus: unknown key" in text
    assert "grpo.group_size='eight'" in text
    assert "not divisible by grpo.gradient_accumulation_steps=3" in text
    assert "choose gradient_accumulation_steps among [1, 2, 5, 10]" in text
    assert len(info.value.problems) == 5


@pytest.mark.parametrize(
    ("grpo", "fragment"),
    [
        ({"rollout_batch_size": 20, "group_size": 8, "train_batch_size": 20, "gradient_accumulation_steps": 1},
         "rollout_batch_size=20 is not divisible by grpo.group_size=8"),
        ({"rollout_batch_size": 16, "group_size": 8, "train_batch_size": 4, "gradient_accumulation_steps": 1},
         "train_batch_size=4 < grpo.group_size=8"),
    ],
)
def test_cs336_batch_checks(grpo: dict[str, int], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict({"model": {"path": "m"}, "grpo": grpo})


def test_overrides_are_parsed_as_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: m\n")
    cfg = load_config(path, ["optim.learning_rate=3e-4", "grpo.use_std_normalization=false", "rollout.stop=[x, y]"])
    assert cfg.optim.learning_rate == 3e-4
    assert cfg.grpo.use_std_normalization is False
    assert cfg.rollout.stop == ["x", "y"]
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(path, ["optim.learning_rate"])


def test_missing_file_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "grpo_qwen2.5_math_1.5b_gsm8k.yaml")
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_cluster_checks_reject_impossible_placement_and_sharding() -> None:
    cfg = config_from_dict({
        "model": {"path": "m"},
        "rollout": {"placement": "dedicated", "device": "cuda:0"},
        "grpo": {"rollout_batch_size": 24, "group_size": 8, "train_batch_size": 24, "gradient_accumulation_steps": 8},
    })
    with pytest.raises(ConfigError) as info:
        validate_for_cluster(cfg, world_size=2, devices=["cuda:0", "cuda:1"])
    text = str(info.value)
    assert "rollout.device=cuda:0 is also a learner device" in text
    assert "cannot be split whole-group across 2 ranks" in text
    assert "micro-batch size train_batch_size/gradient_accumulation_steps=3 is not divisible by world size 2" in text


def test_expert_iteration_questions_split_evenly_over_the_ranks() -> None:
    """Fewer questions than ranks left a rank with none, and its metrics divided by zero (ei/kept_fraction)."""
    cfg = config_from_dict({"model": {"path": "m"}, "mode": "ei", "ei": {"questions_per_step": 3}})
    validate_for_cluster(cfg, 3, ["cpu"] * 3)
    for world in (2, 4):
        with pytest.raises(ConfigError, match=f"ei.questions_per_step=3 cannot be split evenly across {world} ranks"):
            validate_for_cluster(cfg, world, ["cpu"] * world)
    validate_for_cluster(load_config(REPO / "configs" / "ei_qwen2.5_math_1.5b_gsm8k.yaml"), 8, ["cuda"] * 8)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["grpo_qwen2.5_math_1.5b_gsm8k.yaml", "grpo_qwen2.5_math_1.5b_gsm8k_offpolicy.yaml"])
def test_gpu_grpo_configs_shard_over_up_to_8_gpus(name: str, world: int) -> None:
    """The README launches these configs on 1 and 8 GPUs: whole groups and micro-batches must split evenly."""
    cfg = load_config(REPO / "configs" / name)
    validate_for_cluster(cfg, world, [f"cuda:{i}" for i in range(world)])


def test_clip_seed_and_stop_rules_reported_together() -> None:
    """clip-higher below the clip range, more refill rounds than the seed spacing allows, and an empty
    stop string: each named with its value and fix, in one error."""
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "grpo_tiny_cpu.yaml",
                    ["grpo.cliprange_high=0.1", "grpo.max_refill_rounds=12", 'rollout.stop=["</answer>", ""]'])
    text = str(err.value)
    assert "3 problem(s)" in text
    assert "grpo.cliprange_high=0.1 < grpo.cliprange=0.2" in text and "leave it unset" in text
    assert "grpo.max_refill_rounds=12" in text
    assert "empty stop string" in text
    ok = load_config(REPO / "configs" / "grpo_tiny_cpu.yaml", ["grpo.cliprange_high=0.28", "grpo.dynamic_sampling=true"])
    validate_for_cluster(ok, 4, ["cpu"] * 4)
    with pytest.raises(ConfigError, match="ranks beyond 100 would reuse another round's seeds"):
        validate_for_cluster(ok.model_copy(update={"grpo": ok.grpo.model_copy(update={
            "rollout_batch_size": 1024, "train_batch_size": 1024, "group_size": 4,
            "gradient_accumulation_steps": 2})}), 128, ["cpu"] * 128)  # fmt: skip


def test_seed_sampling_lengths_and_templates_checked_when_the_config_loads() -> None:
    """A seed torch cannot take, min_tokens above max_tokens, and prompt templates that are unknown, not
    format strings, or filled with other fields than their use provides: each one line naming the key, in
    one error, before any model loads (they used to be tracebacks after it)."""
    with pytest.raises(ConfigError) as err:
        config_from_dict({
            "model": {"path": "x"}, "seed": -1, "eval": {"max_tokens": 1},
            "data": {"prompt_template": "t", "templates": {"t": "Solve {problem}", "broken": "oops {", "pos": "Q: {}"}},
            "dpo": {"template": "r1zero"},
        })
    problems = err.value.problems
    assert len(problems) == 1  # field errors stop pydantic before the cross-field rules: the seed alone
    assert problems[0].startswith("seed=-1")
    with pytest.raises(ConfigError) as err:
        config_from_dict({
            "model": {"path": "x"}, "eval": {"max_tokens": 1},
            "data": {"prompt_template": "t", "templates": {"t": "Solve {problem}", "broken": "oops {", "pos": "Q: {}"}},
            "dpo": {"template": "r1zero"},
        })
    assert err.value.problems == [
        "eval.min_tokens=4 > eval.max_tokens=1: a response cannot be longer than max_tokens. Lower "
        "eval.min_tokens or raise eval.max_tokens",
        "data.templates.broken is not a usable format string: Single '{' encountered in format string: write a "
        "literal brace as {{ or }}",
        "data.templates.pos is not a usable format string: a positional field ({} or {0}) is never filled: name "
        "it, e.g. {question}",
        "data.prompt_template='t' has the fields ['problem'], but it is filled with ['question']: choose a "
        "template with exactly those",
        "dpo.template='r1zero': no prompt template 'r1zero' (built in: alpaca, question_only, r1_zero, chat, "
        "chat:<template>, or a name under data.templates)",
    ]


def test_templates_registered_by_an_earlier_run_in_the_process_are_not_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run registers its data.templates in the process-wide table (as a test suite or notebook running two
    configs does). The next config is checked against the built-ins and its own templates only: a name only
    the earlier run defined is unknown, and the message lists the same built-ins (CI once saw them grow)."""
    monkeypatch.setattr(prompts, "TEMPLATES", dict(prompts.TEMPLATES))
    prompts.register_template("arith", "User: {question}")
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"path": "x"}, "data": {"prompt_template": "arith"}})
    assert err.value.problems == [
        "data.prompt_template='arith': no prompt template 'arith' (built in: alpaca, question_only, r1_zero, "
        "chat, chat:<template>, or a name under data.templates)",
    ]


@pytest.mark.parametrize(("key", "name", "ok"), [
    ("data.prompt_template", "chat", True), ("data.prompt_template", "chat:r1_zero", True),
    ("data.prompt_template", "chat:mine", True), ("data.prompt_template", "mine", True),
    ("data.prompt_template", "chat:pair", False), ("data.prompt_template", "alpaca", False),
    ("data.prompt_template", "chat:nothere", False), ("dpo.template", "chat:pair", True),
    ("dpo.template", "alpaca", True), ("dpo.template", "r1_zero", False),
])  # fmt: skip
def test_template_names_and_their_fields(key: str, name: str, ok: bool) -> None:
    section, field = key.split(".")
    raw = {"model": {"path": "x"}, "data": {"templates": {"mine": "Solve: {question}"}}}
    raw.setdefault(section, {})[field] = name
    if ok:
        assert getattr(getattr(config_from_dict(raw), section), field) == name
    else:
        with pytest.raises(ConfigError, match=f"{key}='{name}'"):
            config_from_dict(raw)
