"""The learner shared by every mode: model, tokenizer, optimizer and scheduler under one Accelerator.

Gradient accumulation is explicit (losses are divided by the number of accumulation steps in
`trainer.losses.aggregate_loss`), so DDP gradient all-reduce is skipped (`no_sync`) on all but the last
micro-batch of an optimizer batch. Optimizer: AdamW (β = 0.9, 0.95, weight decay 0 by default) or
RMSprop (DPO paper), gradient-norm clipping (1.0), constant learning rate after an optional linear warm-up.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.config import ModelConfig, OptimConfig
from trainer.data.batching import TokenBatch
from trainer.logprobs import forward_log_probs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    module: torch.nn.Module = model
    return module.to(device) if device is not None else module


def load_tokenizer(path: str) -> Any:
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


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    )


class Learner:
    """Prepared model + optimizer; `accumulate` and `step` implement one optimizer batch."""

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, accelerator: Accelerator | None = None):
        self.accelerator = accelerator or Accelerator()
        self.tokenizer = load_tokenizer(model_cfg.path)
        model = load_model(model_cfg)
        self.max_grad_norm = optim_cfg.max_grad_norm
        self.packing = model_cfg.packing
        _configure_deepspeed(self.accelerator, optim_cfg.max_grad_norm)
        self.model, self.optimizer = self.accelerator.prepare(model, build_optimizer(model, optim_cfg))
        # A plain scheduler, stepped once per optimizer step: accelerate's prepared scheduler steps once per
        # rank, which makes warm-up run `world_size` times too fast.
        self.scheduler = build_scheduler(self.optimizer, optim_cfg.warmup_steps)
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
        """Per-token log-probs (and entropies) of a micro-batch on the learner's device, trimmed or packed
        (`model.packing`), under softmax(logits / temperature); (batch, seq), 0 on padding."""
        return forward_log_probs(self.model, tokens.to(self.device), return_token_entropy=return_token_entropy,
                                 packed=self.packing, temperature=temperature)

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
    acc = learner.accelerator
    count = mask.sum().to(acc.device, torch.float32)
    return float(acc.reduce(count, "sum")) if acc.num_processes > 1 else float(count)


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
    the reference of GRPO's KL penalty and of DPO."""
    ref = load_model(model_cfg, device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return autocast_like_policy(ref, accelerator)


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
