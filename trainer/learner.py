"""The learner shared by every mode: model, tokenizer, optimizer and scheduler under one Accelerator.

Gradient accumulation is explicit (losses are divided by the number of accumulation steps in
`trainer.losses.aggregate_loss`), so DDP gradient all-reduce is skipped (`no_sync`) on all but the last
micro-batch of an optimizer batch. Optimizer: AdamW (β = 0.9, 0.95, weight decay 0 by default) or
RMSprop (DPO paper), gradient-norm clipping (1.0); the learning rate follows `LRSchedule` (constant by
default, or linear / cosine decay, each after an optional linear warm-up). With ``model.lora`` the model is
wrapped with LoRA adapters (`trainer.lora`) and only they train.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
from transformers.modeling_layers import GradientCheckpointingLayer

from rollout.model_path import local_path_problem
from trainer.batch_stats import sum_over_processes
from trainer.config import ConfigError, ModelConfig, OptimConfig, RunConfig
from trainer.data.batching import TokenBatch, deal_micro_batches
from trainer.logprobs import forward_log_probs
from trainer.lora import apply_lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

logger = logging.getLogger("reasonrl")


def make_accelerator() -> Accelerator:
    """The run's Accelerator; several launched processes on a machine without CUDA form one CPU (gloo) world.

    accelerate builds that world only when told to use the CPU (``ACCELERATE_USE_CPU=true``), and
    ``accelerate launch`` does not pass a launch file's ``use_cpu`` on to the processes it starts for
    several ranks (launch/cpu_2proc.yaml): without this every process would train alone, as a world of 1.
    Under a DeepSpeed launch file (launch/zero2.yaml, zero3.yaml) ``cpu=True`` would turn DeepSpeed off, so
    the world is asked for by its backend instead: DeepSpeed's CPU accelerator then partitions over gloo.
    """
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1 or torch.cuda.is_available():
        return Accelerator()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if os.environ.get("RANK", "0") == "0":
        logger.info("%d processes launched and no CUDA device: one CPU (gloo) world%s", processes,
                    ", DeepSpeed on its CPU accelerator" if deepspeed else "")
    if deepspeed:
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    return Accelerator(cpu=True)


def load_model(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """A causal LM from a local checkpoint or hub id, in the configured dtype."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"model.path={cfg.path!r} could not be loaded: {err}") from err
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    module: torch.nn.Module = model
    return module.to(device) if device is not None else module


def enable_checkpointing(model: Any) -> int:
    """Gradient checkpointing of every transformer block of HF `model`, while the model stays in eval mode;
    the number of blocks. transformers checkpoints a block only while that block's ``training`` flag is set
    (``GradientCheckpointingLayer``), and the learner never leaves eval mode (dropout off: the log-probs that
    scored a sample and those of its update are one function). So before each forward the blocks alone, not
    their dropout or attention, take the flag from grad mode: recomputed in the backward where one follows,
    plain under ``no_grad``/``inference_mode``. Naive twin: the same model without it (equal log-probs and
    gradients; tests/trainer/test_compile.py)."""
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not blocks:
        raise ValueError(f"model.gradient_checkpointing: {type(model).__name__} has no checkpointable blocks")

    def follow_grad_mode(module: torch.nn.Module, args: Any) -> None:
        for block in blocks:
            block.training = torch.is_grad_enabled()

    # on the decoder stack (``model.model``, ``model.transformer``), which the LM head's forward calls as a
    # module: a peft wrapper calls the LM's ``forward`` directly, past the LM's own hooks
    decoder = getattr(model, "base_model", None)
    (decoder if isinstance(decoder, torch.nn.Module) else model).register_forward_pre_hook(follow_grad_mode)
    return len(blocks)


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` every transformer block of `model` in place (``Module.compile``, dynamic shapes: micro-
    batches change length); the number compiled. Blocks are the classes the HF model lists in
    ``_no_split_modules`` (found under LoRA wrappers too). Parameter names and the state dict stay those of
    the eager model, so checkpoints, weight sync and the reference model are unaffected. Naive twin: the
    eager model (tests/trainer/test_compile.py: log-probs and gradients equal)."""
    get_base = getattr(model, "get_base_model", None)  # a peft model: the HF model under the adapters
    base = get_base() if callable(get_base) else model
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise ValueError(
            f"model.compile: found no transformer blocks in {type(base).__name__} (it lists none in "
            "_no_split_modules); set model.compile: false"
        )
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def load_tokenizer(path: str) -> Any:
    problem = local_path_problem(path, "model.path")
    if problem is not None:
        raise FileNotFoundError(problem)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(f"tokenizer of model.path={path!r} could not be loaded: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.learning_rate if lr is None else lr
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


class LRSchedule:
    """The learning rate of update k = 1..T: ``optim.learning_rate`` times the factor that
    ``transformers.get_scheduler`` gives step k of ``optim.lr_scheduler`` (constant, linear or cosine) after
    ``optim.warmup_steps`` = W steps of linear warm-up, given T + 1 steps in all.

    Read one step ahead of transformers (its schedule is stepped once when built), so no update is taken at
    rate 0: warm-up gives min(1, k/W), full from update W on; linear gives (T + 1 - k)/(T + 1 - W) and
    cosine ½(1 + cos(π (k - W)/(T + 1 - W))) after it, both reaching 0 one step after the last update.
    Stepped once per optimizer step by `Learner.step` (accelerate's prepared scheduler would step once per
    rank: warm-up `world_size` times too fast) and saved with every checkpoint.

    Linear and cosine need T, which a mode knows only once its data is loaded (`plan`, from the run loop),
    while a resumed run restores the schedule's state earlier: its position waits here until `plan`.
    """

    def __init__(self, optimizer: Any, cfg: OptimConfig) -> None:
        self.optimizer, self.name, self.warmup_steps = optimizer, cfg.lr_scheduler, cfg.warmup_steps
        self.total_steps: int | None = None
        self._scheduler: Any = None
        self._pending: dict[str, Any] | None = None
        if self.name == "constant":  # needs no total: ready before (and without) `plan`
            self._build(None)

    def plan(self, total_steps: int | None) -> None:
        """Fix T, the run's number of optimizer steps (None: unknown in advance, as in expert iteration)."""
        if self._scheduler is not None and (self.name == "constant" or total_steps == self.total_steps):
            return
        if self._scheduler is not None:
            raise RuntimeError(f"LRSchedule planned for {self.total_steps} steps, then for {total_steps}")
        if total_steps is None:
            raise ConfigError([f"optim.lr_scheduler={self.name} needs the run's number of optimizer steps, "
                               "which this mode does not know in advance: use optim.lr_scheduler=constant"])
        self._build(total_steps)

    def _build(self, total_steps: int | None) -> None:
        name = "constant_with_warmup" if self.name == "constant" and self.warmup_steps else self.name
        self.total_steps = total_steps
        self._scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=self.warmup_steps,
                                        num_training_steps=None if total_steps is None else total_steps + 1)
        # One step ahead; a resumed run steps on to the checkpoint's position, and so gets this run's rates
        # even where it plans another total than the run that saved it.
        target = 1 if self._pending is None else int(self._pending["last_epoch"])
        self._pending = None
        with warnings.catch_warnings():  # these steps come before any optimizer step, on purpose
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            while self._scheduler.last_epoch < target:
                self._scheduler.step()

    def _ready(self) -> Any:
        if self._scheduler is None:
            raise RuntimeError(f"optim.lr_scheduler={self.name} is used before `plan` gave its number of steps")
        return self._scheduler

    def step(self) -> None:
        self._ready().step()

    def get_last_lr(self) -> list[float]:
        lrs: list[float] = self._ready().get_last_lr()
        return lrs

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self._ready().state_dict() if self._pending is None else self._pending
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._scheduler is None:
            self._pending = state
        else:
            self._scheduler.load_state_dict(state)


def optimizer_steps(cfg: RunConfig, loop_steps: int) -> int | None:
    """The optimizer steps of `loop_steps` steps of `cfg.mode`; None where the data decides (expert
    iteration trains on however many samples pass its filter)."""
    if cfg.mode == "grpo":
        g = cfg.grpo
        return loop_steps * g.epochs_per_rollout_batch * (g.rollout_batch_size // g.train_batch_size)
    return None if cfg.mode == "ei" else loop_steps  # SFT, DPO: one optimizer step per step


class Learner:
    """Prepared model + optimizer; `accumulate` and `step` implement one optimizer batch."""

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, accelerator: Accelerator | None = None):
        self.accelerator = accelerator or make_accelerator()
        self.tokenizer = load_tokenizer(model_cfg.path)
        model = load_model(model_cfg)
        if model_cfg.lora is not None:  # only the adapters train: the optimizer takes what requires grad
            model = apply_lora(model, model_cfg.lora, model_cfg.gradient_checkpointing)
        self.max_grad_norm = optim_cfg.max_grad_norm
        self.packing = model_cfg.packing
        _configure_deepspeed(self.accelerator, optim_cfg.max_grad_norm)
        if model_cfg.compile:
            if self.sharded:
                raise ValueError(
                    "model.compile with DeepSpeed ZeRO-3: its parameter gathering runs in module hooks that "
                    "compiled blocks would trace; use ZeRO-2 (or no DeepSpeed), or set model.compile: false"
                )
            compile_blocks(model)
        self.model, self.optimizer = self.accelerator.prepare(model, build_optimizer(model, optim_cfg))
        self.scheduler = LRSchedule(self.optimizer, optim_cfg)  # not prepared: see its docstring
        self.accelerator.register_for_checkpointing(self.scheduler)

    @property
    def device(self) -> torch.device:
        device: torch.device = self.accelerator.device
        return device

    @property
    def unwrapped(self) -> torch.nn.Module:
        module: torch.nn.Module = self.accelerator.unwrap_model(self.model)
        return module

    @property
    def sharded(self) -> bool:
        """Parameters partitioned over ranks (DeepSpeed ZeRO-3): a forward pass needs every rank."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return plugin is not None and plugin.zero_stage == 3

    @contextlib.contextmanager
    def accumulate(self, is_last_micro_batch: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on every micro-batch but the last of an optimizer batch.

        ``sync_gradients`` also tells DeepSpeed's `backward` whether to step its engine (once per batch).
        """
        ctx = contextlib.nullcontext() if is_last_micro_batch else self.accelerator.no_sync(self.model)
        self.accelerator.gradient_state._set_sync_gradients(is_last_micro_batch)
        try:
            with ctx:
                yield
        finally:
            self.accelerator.gradient_state._set_sync_gradients(True)

    def log_probs(self, tokens: TokenBatch, return_token_entropy: bool = False,
                  temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-token log-probs (and entropies) of a micro-batch's response tokens on the learner's device,
        trimmed or packed (`model.packing`), under softmax(logits / temperature); (batch, seq), 0 outside the
        response (the LM head does not run on the prompt)."""
        return forward_log_probs(self.model, tokens.to(self.device), return_token_entropy=return_token_entropy,
                                 packed=self.packing, temperature=temperature, response_only=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self) -> float:
        """Clip, step, zero grads; returns the pre-clip gradient norm."""
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def release_wrapper(self) -> None:
        """Keep only the plain module: drop the DDP/DeepSpeed wrapper and accelerate's references to it.

        Call before the process group is destroyed. A DDP reducer that outlives the group's registration is
        its last owner, and freeing it runs ``~ProcessGroupGloo`` with the GIL held; that joins gloo's worker
        threads, and one that needs the GIL to free its last work never finishes (a hang at exit, seen in
        2-process CPU runs). Freed here, the reducer is not the last owner; the group dies later through its
        Python handle, which lets go of the GIL first.
        """
        self.model = self.unwrapped
        self.accelerator.free_memory()
        gc.collect()

    def end_distributed(self) -> None:
        """Free the wrapper (`release_wrapper`), then destroy the process group; call once, at the end of a run.

        A process that exits with its gloo group alive can abort in interpreter teardown ("terminate called
        without an active exception", SIGABRT: gloo's threads still hold work whose Python objects are being
        torn down): 1 of 20 two-rank CPU ZeRO-3 launches without this call, 0 of 60 with it. NCCL warns of the
        same omission.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.release_wrapper()
            torch.distributed.destroy_process_group()


def _configure_deepspeed(accelerator: Accelerator, max_grad_norm: float) -> None:
    """reasonrl feeds DeepSpeed tensors, not a DataLoader, so "auto" micro-batch sizes cannot be inferred;
    accumulation is explicit (the loss is divided by the accumulation steps), so DeepSpeed sees 1 and 1.
    DeepSpeed clips gradients itself (accelerate's `clip_grad_norm_` defers to it): `optim.max_grad_norm`
    goes into its config, so the launch file's value cannot silently override the run's."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["gradient_clipping"] = max_grad_norm
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)


def global_token_count(learner: Learner, mask: torch.Tensor) -> float:
    """Response tokens of the optimizer batch summed over ranks (token-level normalisation needs it)."""
    return float(sum_over_ranks(learner, mask.sum().to(torch.float32)))


def sum_over_ranks(learner: Learner, values: torch.Tensor) -> torch.Tensor:
    """`values` summed elementwise over all ranks (every rank must call it), on the CPU; itself on one process."""
    return sum_over_processes(learner.accelerator, values)


def heldout_share(learner: Learner, n_batches: int) -> list[tuple[int, bool]]:
    """This rank's share of `n_batches` held-out micro-batches (the same on every rank), as (index, stand-in).

    The rank evaluates batches ``rank::world``, then repeats one as a stand-in (its forward runs, its result
    is dropped) up to ``ceil(n_batches / world)``, so every rank runs the same number of forward passes, also
    a rank with no batch of its own (`deal_micro_batches`, one batch per micro-batch). They must: under
    ZeRO-3 every forward gathers the parameters from all ranks, and under DDP the first forward after a
    training one broadcasts the buffers. On one process: every batch, in order, and no stand-in."""
    acc = learner.accelerator
    micro = deal_micro_batches(range(n_batches), max(1, n_batches), acc.process_index, acc.num_processes)
    return [(m.rows[0], m.dummy) for m in micro]


def reference_autocast(accelerator: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The policy's mixed-precision autocast, for the reference's forward pass on `device`.

    ``accelerate launch --mixed_precision bf16`` (or fp16) wraps only the *prepared* policy's ``forward``
    in autocast; the reference is a plain module, and run as it is it would compute in its load dtype
    (float32), so that at step 0 policy and reference (the same weights) disagree by ~1e-2 per sequence
    and the held-out accuracy is not 0.5. Same device type: `accelerator.autocast()` itself; another one
    (``dpo.reference_device: cpu`` beside a GPU policy): autocast of the same dtype on that device type.
    """
    if device.type == accelerator.device.type or not accelerator.native_amp:
        ctx: contextlib.AbstractContextManager[Any] = accelerator.autocast()
        return ctx
    dtype = torch.float16 if accelerator.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)

def load_frozen_reference(model_cfg: ModelConfig, device: torch.device | str,
                          accelerator: Accelerator) -> torch.nn.Module:
    """A frozen copy of a model (eval mode, no gradients) whose forward runs under the policy's autocast:
    the reference of GRPO's KL penalty and of DPO. Whole on every rank, also under ZeRO-3 (`whole_loading`)."""
    with whole_loading(accelerator):
        ref = load_model(model_cfg, device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return autocast_like_policy(ref, accelerator)


@contextlib.contextmanager
def whole_loading(accelerator: Accelerator) -> Iterator[None]:
    """Load models whole inside this context, also under DeepSpeed ZeRO-3.

    accelerate registers the run's DeepSpeed config with transformers, and under ZeRO-3 `from_pretrained` then
    partitions every model it loads over the ranks (``deepspeed.zero.Init``), whatever the launch file's
    ``zero3_init_flag``. That suits the learner, which DeepSpeed trains; a frozen reference or an HF engine's
    copy is a plain module that each rank runs alone, so its parameters would be empty (shape 0) there."""
    from transformers.integrations import deepspeed as hf_deepspeed

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # registers the run's config again


def autocast_like_policy(module: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Make a frozen module's forward run under the policy's autocast (`reference_autocast`), as
    `accelerator.prepare` does for the policy; returns the module."""
    forward = module.forward
    device = next(module.parameters()).device

    def forward_like_policy(*args: Any, **kwargs: Any) -> Any:
        with reference_autocast(accelerator, device):
            return forward(*args, **kwargs)

    module.forward = forward_like_policy
    return module
