"""Typed run configuration: one YAML file per run, validated at load with every problem reported at once.

The sections and their cross-field rules (`extra="forbid"`); `trainer.config_io.load_config(path, overrides)`
reads the YAML, applies ``dotted.key=value`` overrides and validates: field errors, the CS336 batch arithmetic
and the placement rules that need no cluster (`placement_problems`) are collected into one `ConfigError` naming
field, value and fix. Checks that
need the launched cluster (world size, learner devices) are `trainer.cluster.validate_for_cluster`.

Rollout placement (``rollout.placement``; `trainer.engines` builds the engine): ``colocated``, an engine per
learner rank in its process and on its device (vLLM sleeps between rollouts on CUDA; the HF engine shares the
learner's live module and has no other placement); ``dedicated``, vLLM on its own GPU ``rollout.device``
(required; no learner's device), so world size 1; ``remote``, a rollout server at ``rollout.server_url``
(required) that takes the weights by ``rollout.weight_transfer``: ``filesystem`` through
``rollout.weight_transfer_dir`` (then required), or broadcast by ``gloo`` (CPU) or ``nccl`` (GPU) with no
shared storage (`rollout.transfer`; the server started with the same ``--weight-transfer``).
With several ranks on one server only rank 0 sends weights, and ``sleep_between_rollouts`` must be off.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rollout.reward.custom import RewardFnSpec
from trainer.data.prompts import PAIR_FIELDS, QUESTION_FIELDS, template_fields, template_problems


class ConfigError(ValueError):
    """All problems found in a config, one per line."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    """Every config section: unknown keys are errors, and so is a non-finite float (``.inf``, ``.nan``) in any
    float field, which would otherwise pass validation and fail far into a run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraConfig(_Section):
    """LoRA adapters (``peft``) on `target_modules`: only they train; engines get merged weights (trainer.lora)."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="scale alpha / r on the adapter's update B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input (0: exact probe)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names (suffixes) that get adapters, or 'all-linear'; default: Llama/Qwen projections")


class ModelConfig(_Section):
    path: str = Field(description="HF checkpoint directory or hub id (loaded with from_pretrained)")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of every weight; None = off")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    gradient_checkpointing: bool = False
    compile: bool = Field(
        False,
        description="torch.compile each transformer block of the learner, in place, with dynamic shapes "
        "(parameter names, checkpoints and weight sync unchanged); the first micro-batches pay the compilation. "
        "Not with DeepSpeed ZeRO-3",
    )
    attn_implementation: str | None = None
    packing: bool = Field(
        False,
        description="learner forward on packed micro-batches (one row, positions restart per sequence, no "
        "padding); exact with any attention, faster only with flash_attention_2/3 (variable-length kernels)",
    )


class DataConfig(_Section):
    task: Literal["gsm8k", "math", "custom", "arithmetic"] = Field(
        "gsm8k", description="gsm8k | math (column presets) | custom (columns named below) | arithmetic (generated)")
    train_source: str | None = Field(
        None, description="training questions: a hub dataset id, or a local .jsonl/.json/.parquet file or a folder "
        "holding train.<ext>; gsm8k: default openai/gsm8k")
    eval_source: str | None = Field(None, description="held-out questions (split test); as train_source")
    hub_config: str | None = Field(
        None, description="the hub dataset's configuration name; None = main for openai/gsm8k, else its default")
    question_column: str | None = Field(
        None, description="column of the question; None = the preset's (gsm8k, custom: question; math: problem)")
    answer_column: str | None = Field(
        None, description="column of the gold answer; None = the preset's (gsm8k, custom: answer; math: answer, "
        "else the last \\boxed{} of solution)")
    answer_parser: Literal["gsm8k", "boxed", "plain"] | None = Field(
        None, description="how the gold is read from answer_column: gsm8k (after ####), boxed (last \\boxed{}), "
        "plain (as is); None = the preset's")
    prompt_template: str = "r1_zero"
    templates: dict[str, str] = Field(default_factory=dict, description="extra user prompt templates")
    arithmetic_level: int = Field(2, ge=1, le=5)
    arithmetic_heldout: bool = Field(
        False, description="arithmetic: a fixed quarter of the problems is evaluation-only (never trained on)")
    train_limit: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(None, ge=1)
    sft_path: str | None = Field(None, description='JSONL of {"prompt","response"} (SFT mode)')
    preference_path: str | None = Field(None, description='JSONL of {"prompt","chosen","rejected"} (DPO)')
    max_skipped_fraction: float = Field(
        0.01, ge=0.0, le=1.0,
        description="items skipped as unusable (prompts longer than the engine's context, DPO pairs with chosen "
        "== rejected) are counted and logged; more than this fraction of a dataset is an error")


class SamplingSection(_Section):
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, ge=1)
    min_tokens: int = Field(4, ge=0)
    stop: list[str] = Field(default_factory=lambda: ["</answer>"])

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("an empty stop string would end every response at once: remove it")
        return stop


class RolloutConfig(SamplingSection):
    engine: Literal["vllm", "hf"] = "vllm"
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="engine dtype; None = model.dtype (e.g. fp32 master weights, bf16 vLLM)")
    placement: Literal["colocated", "dedicated", "remote"] = Field(
        "colocated", description="colocated | dedicated (own GPU, world size 1) | remote (rollout server); "
        "see the module docstring")
    device: str | None = Field(
        None, description="placement=dedicated (required there): the engine's own GPU, e.g. cuda:1, not a "
        "learner's")
    server_url: str | None = Field(None, description="rollout server URL; placement=remote (required there)")
    weight_transfer: Literal["filesystem", "gloo", "nccl"] = Field(
        "filesystem", description="placement=remote: filesystem (safetensors in weight_transfer_dir), or a "
        "broadcast to the server's workers: gloo (TCP, CPU) or nccl (GPU); the server's --weight-transfer")
    weight_transfer_dir: str | None = Field(
        None, description="directory learner and server both see, for filesystem weight sync; placement=remote "
        "with weight_transfer=filesystem (required there)")
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    max_model_len: int = Field(2048, ge=16)
    enforce_eager: bool = False
    sleep_between_rollouts: bool = Field(
        True, description="free the engine's accelerator memory between rollouts (colocated on CUDA; remote: a "
        "server started with --enable-sleep-mode, else an error at start); false with grpo.max_staleness >= 1")
    sync_bucket_mb: int = Field(256, ge=1)
    probe_threshold: float | None = Field(
        None, gt=0.0, description="max |Δ log-prob| learner vs engine; None = by dtype (fp32 1e-3, bf16 1.0)")
    probe_mean_threshold: float | None = Field(
        None, gt=0.0,
        description="mean |Δ log-prob| learner vs engine; None = by dtype (fp32 1e-3, bf16 0.05, fp16 0.02)")
    probe_action: Literal["raise", "warn"] = "raise"
    request_timeout_s: float = Field(
        600.0, gt=0.0, description="placement=remote: each HTTP request's timeout; a hung rollout server fails "
        "the run after this")


class RewardConfig(_Section):
    fn: RewardFnSpec = Field("r1_zero", description='r1_zero | question_only | "package.module:function" | a list '
                             "of {fn, weight}: reward summed with the weights, format/answer of the first entry")
    timeout_s: float = Field(2.0, gt=0.0, description="wall-clock limit per sample; past it the sample scores 0 "
                             "and its worker is killed and replaced. Keep it above the grader's own 1.5 s limit "
                             "(rollout.reward.grading.TIME_LIMIT_S), which ends a slow answer without a kill")
    num_workers: int = Field(2, ge=1)


class OptimConfig(_Section):
    learning_rate: float = Field(1e-5, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after warmup_steps of linear warm-up: constant, or linear/cosine decay to 0 at "
        "the run's end (transformers.get_scheduler; trainer.learner.LRSchedule); mode=ei: constant only")
    optimizer: Literal["adamw", "rmsprop"] = "adamw"


class GRPOConfig(_Section):
    n_grpo_steps: int = Field(200, ge=1)
    rollout_batch_size: int = Field(256, ge=1)
    group_size: int = Field(8, ge=2)
    epochs_per_rollout_batch: int = Field(1, ge=1)
    train_batch_size: int = Field(256, ge=1)
    gradient_accumulation_steps: int = Field(128, ge=1)
    loss_type: Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip", "gspo", "cispo"] = (
        Field("reinforce_with_baseline", description="gspo: GRPO-Clip on the length-normalised sequence ratio "
              "(Zheng et al. 2025; its paper clips at cliprange=3e-4, cliprange_high=4e-4); cispo: REINFORCE "
              "weighted by the clipped, detached token ratio (MiniMax-M1, 2025)"))
    use_std_normalization: bool = True
    std_normalization_scope: Literal["group", "batch"] = Field(
        "group", description="the std that use_std_normalization divides by: each group's own (GRPO), or that of "
        "every reward of the step's rollout batch, all ranks (group mean, batch std: REINFORCE++, ScaleRL)")
    advantage_eps: float = Field(1e-6, ge=0.0)
    length_normalization: Literal["sequence_mean", "constant", "token"] = "sequence_mean"
    cliprange: float = Field(0.2, gt=0.0)
    cliprange_high: float | None = Field(None, gt=0.0, description="DAPO clip-higher; None = cliprange")
    kl_coef: float = Field(0.0, ge=0.0, description="k3 KL penalty to the frozen initial policy")
    entropy_coef: float = Field(0.0, ge=0.0)
    dynamic_sampling: bool = Field(False, description="DAPO: drop zero-std groups and refill")
    max_refill_rounds: int = Field(3, ge=0, le=9, description="at most 9: each round's seed is 100 apart")
    tis_cap: float | None = Field(None, gt=0.0, description="truncated importance sampling cap; None = off")
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO overlong reward shaping: the last N tokens before rollout.max_tokens, over "
        "which a penalty falls linearly from 0 to -overlong_penalty, added to the reward (trainer/overlong.py); "
        "0 = off")
    overlong_penalty: float = Field(1.0, gt=0.0, description="the penalty at rollout.max_tokens (DAPO: 1)")
    mask_truncated: bool = Field(
        False, description="DAPO overlong filtering: responses cut off at rollout.max_tokens add no loss (their "
        "rewards still count in their group's advantages)")
    sort_by_length: bool = Field(
        True, description="group rows of similar length into micro-batches (less padding; same gradient)"
    )
    max_staleness: int = Field(
        0, ge=0, description="asynchronous GRPO: the rollouts of steps t+1..t+k are generated while step t "
        "trains, each sampled by the weights k steps older (rollout.placement remote, where rank 0 samples for "
        "every learner rank, or dedicated); 0 = synchronous")
    inflight_weight_updates: bool = Field(
        False, description="asynchronous GRPO on a remote vLLM >= 0.32 server: new weights are loaded between "
        "decode steps of the batch being generated, not after it (PipelineRL); each token keeps the version that "
        "drew it. Needs grpo.max_staleness >= 1 and rollout.placement=remote")


class SFTConfig(_Section):
    num_epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    packed: bool = Field(False, description="instruction tuning on packed Alpaca text")
    seq_length: int = Field(512, ge=8)
    max_examples: int | None = Field(None, ge=1)
    filter_correct: bool = False
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    eval_generation: bool = Field(
        False, description="also report held-out generation accuracy (math SFT; uses data.task/eval_source)"
    )


class DPOConfig(_Section):
    beta: float = Field(0.1, gt=0.0)
    template: str = "alpaca"
    num_epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    pairs_per_step: int = Field(64, ge=1)
    micro_batch_pairs: int = Field(1, ge=1)
    reference_device: str | None = Field(None, description="e.g. cuda:1; default: the policy's device")
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    loss: Literal["dpo", "ipo", "simpo"] = "dpo"
    simpo_gamma: float = Field(0.5, ge=0.0, description="SimPO target reward margin γ (loss: simpo only)")


class EIConfig(_Section):
    n_ei_steps: int = Field(5, ge=1)
    questions_per_step: int = Field(512, ge=1)
    group_size: int = Field(4, ge=1)
    ei_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)


class WarmStartConfig(_Section):
    """Optional short SFT on the synthetic task before RL (the CPU demo), so the policy is not random."""

    steps: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-3, gt=0.0)
    sloppy_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="fraction of demonstrations that drop the <answer> tags (a sloppy demonstrator, for demos)")


class EvalConfig(SamplingSection):
    every: int = Field(0, ge=0, description="evaluate every N steps; 0 = only before and after training")
    limit: int | None = Field(None, ge=1)
    samples_per_question: int = Field(
        1, ge=1, description="samples drawn per held-out question: accuracy is then their mean (avg@n), and "
        "eval/pass@k is logged for k = 1, 2, 4, ... up to n (the unbiased estimator of Chen et al. 2021)")
    log_samples: int = Field(16, ge=0)
    token_entropy: bool = Field(
        True, description="log eval/token_entropy, the mean entropy of the responses under the policy: one learner "
        "forward pass per 8 samples (on CPU as long as generating them); false skips it")


class LoggingConfig(_Section):
    wandb_mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "reasonrl"
    run_name: str | None = None
    every: int = Field(1, ge=1)
    progress: bool = True
    peak_tflops: float | None = Field(
        None, gt=0.0, description="accelerator peak TFLOP/s for train/mfu; None = by CUDA device name"
    )
    rollout_table_every: int = Field(
        10, ge=0, description="GRPO: every N steps, a table of training rollouts (prompt, completion, reward "
        "parts, advantage, policy version) in RUN_DIR/rollouts/step_N.jsonl and wandb's rollout/samples; 0 = off")
    rollout_table_rows: int = Field(8, ge=1, description="rollouts per table (the main process's first rows)")


class CheckpointConfig(_Section):
    save_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_last: int = Field(2, ge=1)
    push_to_hub: str | None = Field(
        None, pattern=r"^([\w.-]+/)?[\w.-]+$", max_length=96,
        description="a Hugging Face Hub repo id ('user/name'): after the final checkpoint is written, upload its "
        "hf/ folder (model, tokenizer, a model card) there. The hub and a token are checked at start, before "
        "anything loads (HF_HUB_OFFLINE, no token, an unreachable endpoint: one error); a failed upload at the end "
        "is one error naming the repo and the cause, with the checkpoint already saved. None = no upload")


class RunConfig(_Section):
    mode: Literal["grpo", "sft", "dpo", "ei"] = "grpo"
    seed: int = Field(0, ge=0, lt=2**32, description="seeds torch, sampling and data order (0 to 2**32 - 1)")
    output_dir: str = "runs/default"
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    ei: EIConfig = Field(default_factory=EIConfig)
    warmstart: WarmStartConfig = Field(default_factory=WarmStartConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> RunConfig:
        problems = batch_arithmetic_problems(self.grpo.model_dump()) + placement_problems(self.rollout.model_dump())
        if self.mode == "ei" and self.optim.lr_scheduler != "constant":
            problems.append(
                f"optim.lr_scheduler={self.optim.lr_scheduler} with mode=ei: the schedule needs the run's number "
                "of optimizer steps, and expert iteration's depends on how many samples pass its filter. Use "
                "optim.lr_scheduler=constant (with optim.warmup_steps)"
            )
        problems += source_problems(self) + sampling_problems(self) + prompt_problems(self)
        if self.grpo.overlong_buffer >= self.rollout.max_tokens:
            problems.append(
                f"grpo.overlong_buffer={self.grpo.overlong_buffer} >= rollout.max_tokens={self.rollout.max_tokens}: "
                "the buffer is the last part of the allowed length, where the penalty grows; choose a buffer "
                "below max_tokens (DAPO: 4096 of 20480), or 0 for no shaping"
            )
        if self.grpo.max_staleness and self.rollout.placement == "colocated":
            problems.append(
                f"grpo.max_staleness={self.grpo.max_staleness} with rollout.placement=colocated: asynchronous GRPO "
                "generates while the learner trains, and a colocated engine shares the learner's device and "
                "process (one device cannot generate and train at once). Use rollout.placement=remote (a "
                "`reasonrl rollout-server`) or dedicated (vLLM on its own GPU), or grpo.max_staleness=0"
            )
        if self.grpo.max_staleness and self.rollout.placement == "remote" and self.rollout.sleep_between_rollouts:
            problems.append(
                f"grpo.max_staleness={self.grpo.max_staleness} with rollout.sleep_between_rollouts=true: the rollout "
                "server generates the next batches while the learner trains, so it never idles: a sleep "
                "between rollouts would abort those requests. Set rollout.sleep_between_rollouts=false"
            )
        if self.grpo.inflight_weight_updates and (not self.grpo.max_staleness or self.rollout.placement != "remote"):
            problems.append(
                f"grpo.inflight_weight_updates=true with grpo.max_staleness={self.grpo.max_staleness} and "
                f"rollout.placement={self.rollout.placement}: in-flight updates swap the weights of a rollout "
                "server while it generates the next batches, which only an asynchronous run against a server "
                "does. Set grpo.max_staleness >= 1 and rollout.placement=remote, or inflight_weight_updates=false"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def batch_arithmetic_problems(grpo: dict[str, Any]) -> list[str]:
    """The CS336 batch checks on a (possibly partial, possibly invalid) ``grpo`` mapping."""
    defaults = GRPOConfig.model_fields
    values = {k: grpo.get(k, defaults[k].default) for k in defaults}
    tbs, gas = values["train_batch_size"], values["gradient_accumulation_steps"]
    rbs, group = values["rollout_batch_size"], values["group_size"]

    def ok(*xs: Any) -> bool:  # type errors are reported by field validation
        return all(isinstance(x, int) and x > 0 for x in xs)

    problems = []
    if ok(tbs, gas) and tbs % gas:
        problems.append(
            f"grpo.train_batch_size={tbs} is not divisible by grpo.gradient_accumulation_steps={gas}: "
            f"choose gradient_accumulation_steps among {_divisors(tbs)}"
        )
    if ok(rbs, group) and rbs % group:
        problems.append(
            f"grpo.rollout_batch_size={rbs} is not divisible by grpo.group_size={group}: "
            f"use a multiple of {group}, e.g. {max(group, rbs - rbs % group)}"
        )
    if ok(tbs, group) and tbs < group:
        problems.append(f"grpo.train_batch_size={tbs} < grpo.group_size={group}: raise train_batch_size")
    low, high = values["cliprange"], values["cliprange_high"]
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and high < low:
        problems.append(
            f"grpo.cliprange_high={high} < grpo.cliprange={low}: clip-higher (DAPO) widens the upper clip "
            "range; set cliprange_high >= cliprange, or leave it unset to clip symmetrically"
        )
    if ok(rbs, tbs) and rbs % tbs:
        problems.append(
            f"grpo.rollout_batch_size={rbs} is not divisible by grpo.train_batch_size={tbs}: "
            "each epoch must split into whole optimizer batches"
        )
    return problems


def source_problems(cfg: RunConfig) -> list[str]:
    """Question sources the mode reads but the config leaves unset (only gsm8k has a default, the hub's)."""
    d = cfg.data
    if d.task not in ("math", "custom"):
        return []
    reads = {"grpo": ["train_source", "eval_source"], "ei": ["train_source", "eval_source"],
             "sft": ["eval_source"] if cfg.sft.eval_generation else []}.get(cfg.mode, [])
    return [f"data.{key} is unset: data.task={d.task} needs it (a hub dataset id, or a local .jsonl, .json or "
            ".parquet file)" for key in reads if getattr(d, key) is None]


def sampling_problems(cfg: RunConfig) -> list[str]:
    """A minimum response length above the maximum, in either sampling section."""
    return [f"{key}.min_tokens={section.min_tokens} > {key}.max_tokens={section.max_tokens}: a response cannot "
            f"be longer than max_tokens. Lower {key}.min_tokens or raise {key}.max_tokens"
            for key, section in (("rollout", cfg.rollout), ("eval", cfg.eval))
            if section.min_tokens > section.max_tokens]


def prompt_problems(cfg: RunConfig) -> list[str]:
    """User templates that are not format strings, and template names that are unknown or take other fields
    than their use fills (`trainer.data.prompts.template_problems`)."""
    problems = []
    for name, text in cfg.data.templates.items():
        try:
            template_fields(text)
        except ValueError as err:
            problems.append(f"data.templates.{name} is not a usable format string: {err}")
    problems += template_problems("data.prompt_template", cfg.data.prompt_template, QUESTION_FIELDS,
                                  cfg.data.templates)
    return problems + template_problems("dpo.template", cfg.dpo.template, PAIR_FIELDS, cfg.data.templates)


CUDA_DEVICE = re.compile(r"cuda(:\d+)?")


def placement_problems(rollout: Mapping[str, Any]) -> list[str]:
    """Rollout-placement rules that need no cluster, on a (possibly partial, possibly invalid) ``rollout``
    mapping; see the module docstring. Messages contain no "; " (the validator joins problems with it)."""
    defaults = RolloutConfig.model_fields
    values = {k: rollout.get(k, defaults[k].default) for k in defaults}
    placement, engine, device = values["placement"], values["engine"], values["device"]
    problems = []
    if engine == "hf" and placement in ("dedicated", "remote"):
        problems.append(
            f"rollout.engine=hf with rollout.placement={placement}: the HF engine shares the learner's live "
            "module (its process and device), so it is always colocated. Set rollout.placement=colocated, or "
            f"rollout.engine=vllm for a {placement} engine"
        )
    if placement == "dedicated":
        if device is None:
            problems.append(
                "rollout.placement=dedicated needs rollout.device, the engine's own GPU (e.g. cuda:1, not a "
                "learner's): set it, or use rollout.placement=colocated to share the learner's GPU (sleep/wake)"
            )
        elif isinstance(device, str) and not CUDA_DEVICE.fullmatch(device):
            problems.append(
                f"rollout.device={device!r}: a dedicated engine is vLLM on its own GPU: use a CUDA device like "
                "cuda:1, or rollout.placement=colocated"
            )
    if placement == "remote":
        if not values["server_url"]:
            problems.append(
                "rollout.placement=remote needs rollout.server_url, e.g. http://HOST:8000 (start the server "
                "with `reasonrl rollout-server`)"
            )
        if values["weight_transfer"] == "filesystem" and not values["weight_transfer_dir"]:
            problems.append(
                "rollout.placement=remote needs rollout.weight_transfer_dir, a directory the learner writes and "
                "the rollout server reads (shared storage) and serves with --weights-dir: weights go to the server as "
                "safetensors there. Without shared storage set rollout.weight_transfer=gloo (CPU) or nccl (GPU) "
                "and start the server with the same --weight-transfer"
            )
    return problems


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0][:8]
