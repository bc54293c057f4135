"""The vLLM rollout engine: the only module that imports vLLM (lazily, inside functions).

Placement: colocated (``device=None``), an in-process engine core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so
weights pass by reference) on the learner's accelerator, whose memory `sleep` frees between rollouts (vLLM
sleep mode, CUDA only; level 1 offloads the weights, level 2 drops them); dedicated (``device="cuda:1"``),
the same engine on its own GPU, every call under ``torch.cuda.device``. With several learner ranks vLLM
adopts the learner's process group: start-up is collective (every rank builds its engine at the same point),
after it the ranks' engines (TP = PP = DP = 1) never communicate; `close` keeps the learner's group.

Weight sync: pairs are checked against the checkpoint's names and shapes (`checkpoint_shapes`; vLLM checks
neither, and a reload that raises leaves layers on the meta device), streamed through one in-place
``reload_weights`` (vLLM loads a layer once all its tensors arrived), then the prefix cache is reset. Naive
twin: ``reload_weights(weights_iterator=iter(model.state_dict().items()))``, tested bit-identical.

vLLM quirks (`SUPPORTED_VLLM`): the uniproc worker lands on ``cuda:0`` unless ``device_ids`` names the GPU
(`engine_gpu`); the CPU backend has no sleep mode and pins this process's OpenMP threads; 0.26 has no weight
version (`set_weight_version`) nor checksum RPC (`weight_checksums`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from rollout.engines.protocol import (
    FinishReason,
    LogprobsMode,
    Prompt,
    Sample,
    SamplingConfig,
    check_prompts,
    normalize_device,
    rollout_metrics,
)
from rollout.engines.vllm_logs import quiet_vllm
from rollout.weights import (
    MB,
    ByteCounter,
    WeightCheck,
    WeightStream,
    checkpoint_shapes,
    convert_bucketed,
    next_version,
    parameter_digests,
    sync_metrics,
)

logger = logging.getLogger(__name__)

# vLLM release series this module works with, (oldest, newest), both included, patch releases too. 0.26: built
# against torch 2.11 (benchmarks/gpu); 0.32: pyproject's pins and CPU CI. `trainer.tools.doctor` checks against it.
SUPPORTED_VLLM = ("0.26", "0.32")

# vLLM's CPU sampler cannot rewind a seeded generator after a partial (chunked) prefill ("CPU Generator does
# not use offset"); this token budget keeps every prefill of a rollout batch whole on CPU.
CPU_MAX_BATCHED_TOKENS = 65536


def import_vllm() -> Any:
    """Import vllm for in-process use (engine core in this process, so weight iterators pass by reference)."""
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if previous not in (None, "0"):
        logger.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0 (in-process engine)", previous)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm

    return vllm


class VLLMEngine:
    """`RolloutEngine` on an in-process ``vllm.LLM``. See the module docstring for placement and sync.

    Args:
        model: checkpoint path (config + tokenizer + weights; the weights are replaced by the first sync).
        tokenizer: tokenizer path if not the model's.
        device: None = colocated; ``"cuda:N"`` = dedicated GPU N.
        learner_device: colocated on CUDA: the learner's device (``cuda:LOCAL_RANK``), where the engine runs;
            None = this process's current CUDA device. Ignored without CUDA and for a dedicated engine.
        dtype: vLLM dtype (``"auto"``, ``"bfloat16"``, ``"float32"``).
        gpu_memory_utilization: fraction of the device's memory (of host RAM on CPU) vLLM may take.
        kv_cache_memory_bytes: fixed KV-cache size instead (skips vLLM's memory profiling; fast start-up).
        max_model_len: prompt + response token limit.
        seed: engine seed (requests with ``SamplingConfig.seed=None`` draw from it).
        enable_prefix_caching: share prompt KV across a group's samples and across steps.
        enable_sleep_mode: None = on where vLLM supports it (CUDA/ROCm) and colocated.
        sleep_level: 1 (offload weights, drop KV) or 2 (drop both; the next sync must refill the weights).
        enforce_eager: skip torch.compile / CUDA graphs (start-up in seconds instead of tens of seconds).
        sync_bucket_mb: bucket size for device/dtype conversion during sync.
        logprobs_mode: see `rollout.engines.protocol.LogprobsMode`.
        llm_kwargs: passed to ``vllm.LLM`` unchanged.
    """

    def __init__(
        self, model: str, *, tokenizer: str | None = None, device: str | None = None,
        learner_device: str | torch.device | None = None, dtype: str = "auto",
        gpu_memory_utilization: float = 0.3, kv_cache_memory_bytes: int | None = None, max_model_len: int = 2048,
        seed: int = 0, enable_prefix_caching: bool = True, enable_sleep_mode: bool | None = None,
        sleep_level: int = 1, enforce_eager: bool = False, sync_bucket_mb: float = 256,
        logprobs_mode: LogprobsMode = "processed", **llm_kwargs: Any,
    ) -> None:  # fmt: skip
        vllm = import_vllm()
        on_gpu = torch.cuda.is_available()
        self.dedicated = device is not None
        # the engine's GPU (dedicated or colocated); None on vLLM's CPU backend
        self.device = engine_gpu(device, learner_device, torch.cuda.current_device() if on_gpu else None)
        if enable_sleep_mode is None:
            enable_sleep_mode = on_gpu and not self.dedicated
        if enable_sleep_mode and not on_gpu:
            raise ValueError("VLLMEngine: enable_sleep_mode=True needs CUDA; vLLM's CPU backend has no sleep mode")
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMEngine: sleep_level={sleep_level} must be 1 or 2")
        self._sleep_enabled = bool(enable_sleep_mode)
        self.sleep_level = sleep_level
        self.sync_bucket_bytes = int(sync_bucket_mb * MB)
        self.logprobs_mode = logprobs_mode
        self._policy_version = 0
        self.metrics: dict[str, float] = {}
        self._asleep: set[str] = set()  # tags currently released: {"weights", "kv_cache"}
        if self.device is not None:
            llm_kwargs.setdefault("device_ids", [self.device.index])
        if not on_gpu:
            llm_kwargs.setdefault("max_num_batched_tokens", CPU_MAX_BATCHED_TOKENS)
        # a default group that exists now is the learner's, which vLLM adopts (module docstring); keep it at close
        self._learner_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._llm = self._start(
            vllm, model, tokenizer=tokenizer, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes, max_model_len=max_model_len, seed=seed,
            enable_prefix_caching=enable_prefix_caching, enable_sleep_mode=self._sleep_enabled,
            enforce_eager=enforce_eager, logprobs_mode=f"{logprobs_mode}_logprobs", **llm_kwargs,
        )  # fmt: skip
        self.tokenizer = self._llm.get_tokenizer()
        self.vllm_version: str = vllm.__version__
        self._sampling_params_cls = vllm.SamplingParams
        model_config = self._llm.llm_engine.model_config
        self.dtype: torch.dtype = model_config.dtype
        self.max_model_len: int = int(model_config.max_model_len)
        # prefix caching stores KV in whole blocks of this many tokens (CPU: 128; CUDA: usually 16)
        self.cache_block_size: int = int(self._llm.llm_engine.vllm_config.cache_config.block_size)
        # HF state-dict name -> shape every sync is checked against (None: learnt from the first full sync)
        self.weight_shapes = checkpoint_shapes(
            model_config.hf_config, trust_remote_code=bool(getattr(model_config, "trust_remote_code", False))
        )
        self._partial: str | None = None  # why generation is refused until a full sync succeeds
        self._broken: str | None = None  # why every call is refused (recreate the engine)
        self._engine_device = self.device if self.device is not None else torch.device("cpu")

    def _start(self, vllm: Any, model: str, **llm_kwargs: Any) -> Any:
        """``vllm.LLM(model, **llm_kwargs)`` on the engine's device; the learner keeps its current device."""
        previous_device = torch.cuda.current_device() if torch.cuda.is_available() else None
        start = time.perf_counter()
        with self._on_device(quiet=False):  # start-up logs as vLLM configures them
            llm = vllm.LLM(model, **llm_kwargs)
        if previous_device is not None:  # vLLM's worker set its device; give the learner back its own
            torch.cuda.set_device(previous_device)
        self.startup_s = time.perf_counter() - start
        return llm

    @property
    def policy_version(self) -> int:
        """The version of the weights samples come from; advanced by `update_weights` only."""
        return self._policy_version

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Sample]:
        """`params.n` samples per prompt, grouped: samples of prompt i are at [i*n, (i+1)*n)."""
        check_prompts(prompts)
        self._check_usable()
        self.wake()
        inputs = [_as_vllm_prompt(p) for p in prompts]
        seeds = [params.seed_of(i) for i in range(len(prompts))]
        per_prompt = [self._sampling_params(params, seed) for seed in seeds]
        start = time.perf_counter()
        with self._on_device():
            outputs = self._llm.generate(inputs, per_prompt, use_tqdm=False)
        seconds = time.perf_counter() - start
        samples = self.to_samples(outputs, copies=params.n if params.greedy else 1)
        self.metrics.update(rollout_metrics(samples, seconds))
        return samples

    def _sampling_params(self, params: SamplingConfig, seed: int | None) -> Any:
        """vLLM's ``SamplingParams``; greedy asks for one sample (vLLM refuses ``n > 1`` with greedy sampling)
        and `to_samples` copies it ``n`` times."""
        return self._sampling_params_cls(
            n=1 if params.greedy else params.n, temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_tokens, min_tokens=params.min_tokens, stop=list(params.stop),
            include_stop_str_in_output=True, seed=seed, logprobs=0, skip_special_tokens=True,
        )  # fmt: skip

    def to_samples(self, outputs: Sequence[Any], copies: int = 1) -> list[Sample]:
        """vLLM ``RequestOutput``s (one per prompt) to grouped `Sample`s, each `copies` times (greedy ``n``)."""
        samples: list[Sample] = []
        for i, request in enumerate(outputs):
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                if out.logprobs is None or len(out.logprobs) != len(ids):
                    raise RuntimeError(f"vLLM returned no log-prob for some tokens of prompt {i}")
                logprobs = [float(out.logprobs[j][tok].logprob) for j, tok in enumerate(ids)]
                reason = _finish_reason(out.finish_reason)
                samples.extend(
                    Sample(i, list(request.prompt_token_ids), list(ids), out.text, list(logprobs), reason,
                           self._policy_version)
                    for _ in range(copies)
                )  # fmt: skip
        return samples

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence (vLLM ``prompt_logprobs=0``).

        vLLM never reads the prefix cache for a request with prompt log-probs (``skip_reading_prefix_cache``),
        so these are always computed from the current weights, even where `generate` would reuse stale KV.
        """
        self._check_usable()
        self.wake()
        params = self._sampling_params_cls(max_tokens=1, prompt_logprobs=0, detokenize=False)
        seqs = [[int(t) for t in s] for s in token_ids]
        with self._on_device():
            outputs = self._llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        result = []
        for seq, out in zip(seqs, outputs, strict=True):
            lps = out.prompt_logprobs
            result.append([float(lps[t][seq[t]].logprob) for t in range(1, len(seq))])
        return result

    # ---- weights ------------------------------------------------------------------------------------------
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Check and stream (HF name, tensor) pairs into vLLM in one ``reload_weights`` call, reset the prefix
        cache and advance `policy_version` (`rollout.weights.next_version`). Pass a `WeightStream` for a
        learner (ZeRO-3: gathers bucket by bucket; its `metadata` is checked before anything is sent).

        Every state-dict name of the checkpoint, once, with its shape; otherwise ValueError. A bad listing
        leaves the engine as it was. A plain stream is cut at its first bad pair (the rest is read, not
        loaded: a ZeRO-3 gather keeps every rank in step); vLLM then holds a mix of old and new layers, and
        `generate` / `prompt_logprobs` refuse until a full update succeeds. RuntimeError if vLLM's reload
        raises (the engine is broken: recreate it) or its prefix cache cannot be reset.
        """
        self._check_usable(partial_ok=True)
        if isinstance(weights, WeightStream) and self.weight_shapes is not None:
            problem = WeightCheck(self.weight_shapes).listing((m.name, m.shape) for m in weights.metadata())
            if problem is not None:
                raise ValueError(
                    f"VLLMEngine.update_weights: {problem}. Nothing was sent (found in the stream's metadata); "
                    f"the engine keeps policy version {self._policy_version}"
                )
        if "weights" in self._asleep:
            with self._on_device():
                self._llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        start = time.perf_counter()
        checked = WeightCheck(self.weight_shapes)
        counted = ByteCounter(
            convert_bucketed(checked.stream(weights), self._engine_device, None, self.sync_bucket_bytes)
        )
        reset = self._reload(counted)
        checked.drain()
        self._check_loaded(checked, reset)
        if self.weight_shapes is None:
            self.weight_shapes = dict(checked.shapes)
        self._partial = None
        self._policy_version = next_version(weights, self._policy_version)
        set_weight_version(self._llm, self._policy_version)
        self.metrics.update(sync_metrics(time.perf_counter() - start, counted.num_bytes))

    def _reload(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> bool:
        """vLLM's in-place reload of `pairs`, then its prefix-cache reset (whose result is returned)."""
        try:
            with self._on_device():
                self._llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": iter(pairs), "is_checkpoint_format": True}
                )
        except BaseException:
            self._broken = (
                f"VLLMEngine is broken after a failed weight update at policy version {self._policy_version} "
                "(vLLM's in-place reload raised part-way and left layers on the meta device); recreate it"
            )
            with contextlib.suppress(Exception), self._on_device():
                self._llm.reset_prefix_cache()
            raise
        with self._on_device():
            return bool(self._llm.reset_prefix_cache())

    def _check_loaded(self, checked: WeightCheck, reset: bool) -> None:
        """Raise (and refuse generation where vLLM loaded part of it) if the stream was wrong or incomplete,
        or if the prefix cache kept KV of the old weights."""
        version = self._policy_version
        if not checked.shapes:
            raise ValueError("VLLMEngine.update_weights: the weights iterator was empty")
        problem = checked.problem()
        if problem is not None:
            if checked.num_passed == 0:  # vLLM got nothing: every layer kept its weights
                raise ValueError(f"VLLMEngine.update_weights: {problem}. Nothing was loaded")
            self._partial = (
                f"VLLMEngine holds a partial weight update (the update after policy version {version} failed: "
                f"{problem}); call update_weights with a full state dict before generating"
            )
            cut = "The stream was cut at the first problem; the {} good tensors before it" if checked.errors else ""
            loaded = (cut or "The {} tensors sent").format(checked.num_passed)
            raise ValueError(
                f"VLLMEngine.update_weights: {problem}. {loaded} were loaded, so the engine refuses to "
                "generate until a full update_weights succeeds"
            )
        if not reset:
            self._partial = (
                f"VLLMEngine: the prefix cache could not be reset after the update from policy version {version}"
                " (requests still running?): cached KV of the old weights would be reused; call update_weights"
                " again before generating"
            )
            raise RuntimeError(
                f"VLLMEngine.update_weights: vLLM's reset_prefix_cache() returned False. {self._partial}"
            )

    def weight_checksums(self) -> dict[str, str]:
        """sha256 of every engine parameter's bytes by vLLM parameter name (`parameter_digests` in each worker),
        ``worker{i}:``-prefixed with several workers. On vLLM's CPU backend linear weights live in packed
        kernels (empty ``weight`` parameters): there the digests cover embeddings, norms and biases only."""
        self._check_usable(partial_ok=True)
        with self._on_device():
            parts = self._llm.apply_model(parameter_digests)
        if len(parts) == 1:
            return dict(parts[0])
        return {f"worker{i}:{name}": d for i, part in enumerate(parts) for name, d in part.items()}

    # ---- memory -------------------------------------------------------------------------------------------
    @property
    def sleep_supported(self) -> bool:
        """True where `sleep` really frees memory (vLLM sleep mode on CUDA); False makes sleep/wake no-ops."""
        return self._sleep_enabled

    def sleep(self) -> None:
        """Release the engine's accelerator memory until the next `wake` / `generate` (no-op if unsupported)."""
        if not self._sleep_enabled or self._asleep == {"weights", "kv_cache"}:
            return
        if self._asleep:  # partly asleep (a sync woke only the weights): vLLM sleeps from fully awake
            self.wake()
        with self._on_device():
            self._llm.sleep(level=self.sleep_level)
        self._asleep = {"weights", "kv_cache"}

    def wake(self) -> None:
        """Restore what `sleep` released (no-op when awake). After level-2 sleep, sync weights before use."""
        if not self._asleep:
            return
        with self._on_device():
            self._llm.wake_up(tags=sorted(self._asleep))
        self._asleep.clear()

    def close(self) -> None:
        """Shut the engine down and release vLLM's process-global state (its groups, `release_gpu_assignment`),
        so another engine can start; the learner's default group is kept (`keep_default_group`)."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        from vllm.distributed import parallel_state

        with keep_default_group(parallel_state) if self._learner_group else contextlib.nullcontext():
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            parallel_state.cleanup_dist_env_and_memory()
        release_gpu_assignment()

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM`` (benchmarks compare against its raw ``generate``)."""
        return self._llm

    @contextlib.contextmanager
    def _on_device(self, quiet: bool = True) -> Iterator[None]:
        """Around every vLLM call: the engine's GPU current; vLLM's per-call logging quiet (`quiet_vllm`)."""
        gpu = torch.cuda.device(self.device) if self.device is not None else contextlib.nullcontext()
        with gpu, quiet_vllm() if quiet else contextlib.nullcontext():
            yield

    def _check_usable(self, *, partial_ok: bool = False) -> None:
        """Raise if a failed weight update broke the engine, or (unless `partial_ok`) left it half updated."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        if self._partial is not None and not partial_ok:
            raise RuntimeError(self._partial)


def engine_gpu(
    device: str | torch.device | None, learner_device: str | torch.device | None, current_cuda: int | None
) -> torch.device | None:
    """The GPU a `VLLMEngine` runs on, with an index (vLLM's ``device_ids=[index]``); a bare ``cuda`` is
    `current_cuda`, as in `normalize_device` (config validation's rule). `device`: a dedicated engine's GPU (None = colocated); `learner_device`: a colocated engine's, the
    learner's device (``cuda:LOCAL_RANK``; non-CUDA or None = `current_cuda`); `current_cuda`: the current
    CUDA device (None = no CUDA: a colocated engine has no GPU, a dedicated bare ``cuda`` is ``cuda:0``).
    """
    if device is not None:
        gpu = normalize_device(device, 0 if current_cuda is None else current_cuda)
        if gpu.type != "cuda":
            raise ValueError(f"VLLMEngine: device={device!r}: a dedicated engine needs a CUDA device like 'cuda:1'")
        return gpu
    if current_cuda is None:
        return None
    learner = normalize_device(learner_device if learner_device is not None else "cuda", current_cuda)
    return learner if learner.type == "cuda" else torch.device("cuda", current_cuda)


def release_gpu_assignment() -> None:
    """Forget the GPU vLLM's worker assigned this process from ``device_ids`` (a process-global that vLLM 0.26 /
    0.32 ``platforms/interface.py`` sets once and refuses to change), so that a later engine in this process
    can run on another GPU (e.g. a colocated engine on ``cuda:0``, closed, then a dedicated one on ``cuda:1``)."""
    interface: Any = importlib.import_module("vllm.platforms.interface")
    if hasattr(interface, "_assigned_physical_gpu_ids"):
        interface._assigned_physical_gpu_ids = None


@contextlib.contextmanager
def keep_default_group(parallel_state: Any) -> Iterator[None]:
    """While active, vLLM's ``destroy_distributed_environment`` (which ``cleanup_dist_env_and_memory`` calls)
    destroys vLLM's world group only, not ``torch.distributed``'s default group: the learner's, which vLLM
    adopted (vLLM 0.26 and 0.32 both end with ``torch.distributed.destroy_process_group()``)."""
    original = parallel_state.destroy_distributed_environment

    def destroy_vllm_world() -> None:
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    parallel_state.destroy_distributed_environment = destroy_vllm_world
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = original


def set_weight_version(llm: Any, version: int) -> bool:
    """Stamp `version` on vLLM's engine, for information (``LLM.update_weight_version``); False on 0.26."""
    update = getattr(llm, "update_weight_version", None)
    if update is None:
        return False
    update(str(version))
    return True


def _as_vllm_prompt(prompt: Prompt) -> Any:
    return {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": [int(t) for t in prompt]}


def _finish_reason(reason: str | None) -> FinishReason:
    if reason in ("stop", "length"):
        return "stop" if reason == "stop" else "length"
    raise RuntimeError(f"vLLM finished a sample with reason {reason!r} (aborted?)")
