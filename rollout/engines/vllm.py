"""The vLLM rollout engine: the only module that imports vLLM (lazily, inside functions).

Placement:

- **colocated** (``device=None``): vLLM runs inside the learner's process on the learner's accelerator (an
  in-process engine core, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so weights pass by reference) and takes
  ``gpu_memory_utilization`` of it (on CPU: of host RAM). Between rollouts `sleep` releases its memory
  (vLLM sleep mode: level 1 offloads weights to host RAM and drops the KV cache; level 2 drops both, the
  next `update_weights` refills the weights). vLLM's CPU backend has no sleep mode: there `sleep` / `wake`
  are no-ops and `sleep_supported` is False.
  On CPU the in-process engine binds this process's OpenMP threads and turns ``torch.set_num_threads``
  into a no-op (vLLM's CPU worker does that), which the learner in the same process inherits.
- **dedicated** (``device="cuda:1"``): the same in-process engine pinned to its own GPU through vLLM's
  ``device_ids``; every call runs under ``torch.cuda.device(device)`` so the learner's current device is
  left alone, and weights cross devices in ``sync_bucket_mb`` buckets. No sleep needed (``enable_sleep_mode``
  defaults to off there).

Which GPU (`engine_gpu`): vLLM's in-process (uniproc) executor takes its worker's local rank from the device
config, which is always a bare ``cuda`` (vLLM 0.26 / 0.32 ``config/device.py`` keeps the type only), so the
worker lands on ``cuda:0`` in every process unless ``device_ids`` maps that local rank 0 to a GPU (vLLM's
``assigned_physical_gpu_ids``; indices into ``CUDA_VISIBLE_DEVICES`` as torch counts them). So a colocated
engine on CUDA passes ``device_ids=[learner's index]`` too: the learner's device (``learner_device``,
``cuda:LOCAL_RANK`` under accelerate), else this process's current CUDA device. Without it every rank of a
data-parallel run would put its engine on GPU 0. A bare ``cuda`` (dedicated ``device`` or ``learner_device``)
is the current CUDA device, as config validation assumes (`rollout.engines.protocol.normalize_device`).

Several learner ranks (a ``torch.distributed`` default group exists when the engine starts): vLLM's worker
adopts that group as its world (``init_distributed_environment`` skips its own ``init_process_group``) and
lays its groups out as external-DP x DP x PP x PCP x TP, so with tensor/pipeline/data parallel size 1 each rank
is its own TP/PP/DP group of one and the ranks' engines never communicate while generating, syncing,
sleeping or waking: rank 0 may generate alone (evaluation) while the others wait elsewhere. Starting the
engine, however, is a collective over the learner's group (vLLM creates its world group over all ranks,
counts nodes, and on Hopper+ with FlashInfer tunes kernels across the world): every rank must build its
engine at the same point, as `trainer.session.Session` does (the first sync runs on every rank). `close` then
releases vLLM's groups but leaves the learner's default group alone (vLLM's own cleanup would destroy it).

Weight sync (`update_weights`) streams (name, tensor) pairs through vLLM's in-place
``reload_weights(weights_iterator=..., is_checkpoint_format=True)`` in a single call (vLLM processes each
layer when all its tensors have arrived; splitting a reload into several calls would process layers half
loaded), then resets the prefix cache (a False from vLLM's reset is an error: cached KV of the old weights
would be reused) and bumps `policy_version` (also set as vLLM's weight version).
Naive twin: ``reload_weights(weights_iterator=iter(model.state_dict().items()))`` - tested bit-identical.
Send every state-dict name, tied aliases included (`rollout.engines.protocol.iter_state_dict` /
`rollout.weights.ModelWeights` do): a tied ``lm_head.weight`` that is not sent keeps its old values.

Sync validation: vLLM checks neither names nor shapes, and an exception inside its reload leaves the model's
layers on the meta device (every later call fails, a full resync included). So the engine knows the
checkpoint's state-dict names and shapes (`checkpoint_shapes`: the HF model built from vLLM's config on the
meta device, tied ``lm_head.weight`` included, the same on every vLLM version) and checks each pair before
vLLM sees it:

- a stream with ``metadata()`` (`ModelWeights`, what the trainer sends) is checked whole before anything is
  sent: a wrong shape or an unknown, repeated or missing name raises ValueError, and the engine keeps its
  weights and version;
- other iterables are checked as they stream (no buffering): at the first bad pair the stream ends there, so
  vLLM finishes the reload normally with the pairs before it, and ValueError names the tensor, its shape and
  the checkpoint's (the rest of the stream is still read and checked, not loaded: a ZeRO-3 gather keeps every
  rank in step). A stream that ends with names missing raises too. After either the engine holds a mix of
  old and new (and half-loaded) layers: `generate` / `prompt_logprobs` refuse until a full `update_weights`
  succeeds, which restores it (tested);
- if vLLM's reload raises anyway, the engine is marked broken: every later call raises "recreate it".

`policy_version` is bumped only by a complete sync. No caller in this project sends partial state dicts.

Sampling: one request per prompt with ``n`` = group size; request i gets seed ``sample_seed(seed, i, n, 0)``
and vLLM gives child k that seed ``+ k`` (= ``sample_seed(seed, i, n, k)``), so every sample has its own stream.
``Sample.logprobs`` are vLLM's sampled-token log-probs in ``processed_logprobs`` mode by default (the
distribution actually sampled from; see `rollout.engines.protocol.LogprobsMode`).

vLLM versions (`SUPPORTED_VLLM`): 0.32 is pinned and run by CPU CI; 0.26 is the newest release the lent GPU
machine's torch 2.11 runs, so it is supported too. Below 0.32 vLLM has no weight version (the engine keeps
`policy_version` alone) and no trainer-side NCCL engine (`NCCLSender026` stands in, untested).
Checksums use ``LLM.apply_model``, present in both.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import importlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rollout.engines.protocol import (
    FinishReason,
    LogprobsMode,
    Prompt,
    Sample,
    SamplingConfig,
    WeightCheck,
    iter_state_dict,
    normalize_device,
    rollout_metrics,
    sample_seed,
    sync_metrics,
)
from rollout.weights import MB, ByteCounter, ModelWeights, WeightStream, convert_bucketed

logger = logging.getLogger(__name__)

# vLLM release series this module works with, (oldest, newest), both included, patch releases too. 0.26: the
# lent GPU machine (torch 2.11); 0.32: pyproject's pins and CPU CI. `trainer.tools.doctor` checks against it.
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
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        device: str | None = None,
        learner_device: str | torch.device | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int = 2048,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool | None = None,
        sleep_level: int = 1,
        enforce_eager: bool = False,
        sync_bucket_mb: float = 256,
        logprobs_mode: LogprobsMode = "processed",
        **llm_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        on_gpu = torch.cuda.is_available()
        self.dedicated = device is not None
        # the engine's GPU (dedicated or colocated); None on vLLM's CPU backend
        self.device = engine_gpu(device, learner_device, torch.cuda.current_device() if on_gpu else None)
        if enable_sleep_mode is None:
            enable_sleep_mode = on_gpu and not self.dedicated
        if enable_sleep_mode and not on_gpu:
            raise ValueError(
                "VLLMEngine: enable_sleep_mode=True needs CUDA; vLLM's CPU backend has no sleep mode"
            )
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMEngine: sleep_level={sleep_level} must be 1 or 2")
        self._sleep_enabled = bool(enable_sleep_mode)
        self.sleep_level = sleep_level
        self.sync_bucket_bytes = int(sync_bucket_mb * MB)
        self.logprobs_mode = logprobs_mode
        self.policy_version = 0
        self.metrics: dict[str, float] = {}
        self._asleep: set[str] = set()  # tags currently released: {"weights", "kv_cache"}
        if self.device is not None:
            llm_kwargs.setdefault("device_ids", [self.device.index])
        if not on_gpu:
            llm_kwargs.setdefault("max_num_batched_tokens", CPU_MAX_BATCHED_TOKENS)
        # a default group that exists now is the learner's, which vLLM adopts (module docstring); keep it at close
        self._learner_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        previous_device = torch.cuda.current_device() if on_gpu else None
        start = time.perf_counter()
        with self._on_device():
            self._llm = vllm.LLM(
                model,
                tokenizer=tokenizer,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                max_model_len=max_model_len,
                seed=seed,
                enable_prefix_caching=enable_prefix_caching,
                enable_sleep_mode=self._sleep_enabled,
                enforce_eager=enforce_eager,
                logprobs_mode=f"{logprobs_mode}_logprobs",
                **llm_kwargs,
            )
        if previous_device is not None:  # vLLM's worker set its device; give the learner back its own
            torch.cuda.set_device(previous_device)
        self.startup_s = time.perf_counter() - start
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

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Sample]:
        """`params.n` samples per prompt, grouped: samples of prompt i are at [i*n, (i+1)*n)."""
        self._check_usable()
        self.wake()
        inputs = [_as_vllm_prompt(p) for p in prompts]
        per_prompt = [
            self._sampling_params(params, sample_seed(params.seed, i, params.n, 0))
            for i in range(len(prompts))
        ]
        start = time.perf_counter()
        with self._on_device():
            outputs = self._llm.generate(inputs, per_prompt, use_tqdm=False)
        seconds = time.perf_counter() - start
        samples = self.to_samples(outputs)
        self.metrics.update(rollout_metrics(samples, seconds))
        return samples

    def _sampling_params(self, params: SamplingConfig, seed: int | None) -> Any:
        return self._sampling_params_cls(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            stop=list(params.stop),
            include_stop_str_in_output=True,
            seed=seed,
            logprobs=0,
            skip_special_tokens=True,
        )

    def to_samples(self, outputs: Sequence[Any]) -> list[Sample]:
        """vLLM ``RequestOutput``s (one per prompt) to grouped `Sample`s."""
        samples = []
        for i, request in enumerate(outputs):
            prompt_ids = list(request.prompt_token_ids)
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                if out.logprobs is None or len(out.logprobs) != len(ids):
                    raise RuntimeError(f"vLLM returned no log-prob for some tokens of prompt {i}")
                logprobs = [float(out.logprobs[j][tok].logprob) for j, tok in enumerate(ids)]
                samples.append(
                    Sample(
                        i,
                        prompt_ids,
                        ids,
                        out.text,
                        logprobs,
                        _finish_reason(out.finish_reason),
                        self.policy_version,
                    )
                )
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
        """Stream (HF name, tensor) pairs into vLLM in one ``reload_weights`` call, reset the prefix cache and
        bump `policy_version`. Pass `ModelWeights(model)` for a ZeRO-3 learner (gathers bucket by bucket).

        Every state-dict name of the checkpoint, once, with its shape: otherwise ValueError (see the module
        docstring for what state the engine is left in). RuntimeError if vLLM's reload fails (the engine is
        broken) or its prefix cache cannot be reset.
        """
        self._check_usable(partial_ok=True)
        expected = self.weight_shapes
        metadata = getattr(weights, "metadata", None)
        if expected is not None and callable(metadata):
            problem = WeightCheck(expected).listing((m.name, tuple(m.shape)) for m in metadata())
            if problem is not None:
                raise ValueError(
                    f"VLLMEngine.update_weights: {problem}. Nothing was sent (found in the stream's metadata); "
                    f"the engine keeps policy version {self.policy_version}"
                )
        if "weights" in self._asleep:
            with self._on_device():
                self._llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        start = time.perf_counter()
        version = self.policy_version
        checked = WeightCheck(expected)
        counted = ByteCounter(
            convert_bucketed(checked.stream(weights), self._engine_device, None, self.sync_bucket_bytes)
        )
        try:
            with self._on_device():
                self._llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": iter(counted), "is_checkpoint_format": True}
                )
        except BaseException:
            self._broken = (
                f"VLLMEngine is broken after a failed weight update at policy version {version} (vLLM's in-place "
                "reload raised part-way and left layers on the meta device); recreate it"
            )
            with contextlib.suppress(Exception), self._on_device():
                self._llm.reset_prefix_cache()
            raise
        with self._on_device():
            reset = self._llm.reset_prefix_cache()
        checked.drain()
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
            loaded = (
                f"The stream was cut at the first problem; the {checked.num_passed} good tensors before it"
                if checked.errors
                else f"The {checked.num_passed} tensors sent"
            )
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
        if self.weight_shapes is None:
            self.weight_shapes = dict(checked.shapes)
        self._partial = None
        self.policy_version += 1
        set_weight_version(self._llm, self.policy_version)
        self.metrics.update(sync_metrics(time.perf_counter() - start, counted.num_bytes))

    def update_from_model(self, model: torch.nn.Module, bucket_mb: float | None = None) -> None:
        """`update_weights(ModelWeights(model, bucket_mb))`: the learner's module, ZeRO-3 aware."""
        self.update_weights(ModelWeights(model, bucket_mb or self.sync_bucket_bytes / MB))

    def weight_checksums(self) -> dict[str, str]:
        """sha256 of every engine parameter's bytes by vLLM parameter name, for exact weight comparisons.

        `parameter_digests` runs in each worker through ``LLM.apply_model`` (vLLM 0.26 and 0.32 alike; 0.26
        has no ``compute_weight_checksums`` RPC). With several workers (tensor / pipeline parallel) each name
        gets a ``worker{i}:`` prefix so that shards of one parameter stay apart. On vLLM's CPU backend linear
        layers keep their weights inside packed kernels and their ``weight`` parameters are empty, so there
        the digests cover embeddings, norms and biases only (as 0.32's own RPC does).
        """
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
        """Shut the engine down and release vLLM's process-global state, so another engine can start.

        vLLM's teardown (``EngineCore.shutdown`` in 0.26 and 0.32, then ``cleanup_dist_env_and_memory``) ends by
        destroying ``torch.distributed``'s default group; where that group is the learner's (adopted at start-up)
        it is kept (`keep_default_group`) and only vLLM's own groups go. The GPU assignment is released too
        (`release_gpu_assignment`)."""
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

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.device(self.device) if self.device is not None else contextlib.nullcontext()

    def _check_usable(self, *, partial_ok: bool = False) -> None:
        """Raise if a failed weight update broke the engine, or (unless `partial_ok`) left it half updated."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        if self._partial is not None and not partial_ok:
            raise RuntimeError(self._partial)


def engine_gpu(
    device: str | torch.device | None, learner_device: str | torch.device | None, current_cuda: int | None
) -> torch.device | None:
    """The GPU a `VLLMEngine` runs on, always with an index (it becomes vLLM's ``device_ids=[index]``).

    A bare ``cuda`` is the current CUDA device (`current_cuda`) here as everywhere (`normalize_device`, the
    rule config validation checks a dedicated engine's GPU with), for both arguments.

    Args:
        device: a dedicated engine's GPU (``cuda:N``, or a bare ``cuda``: `current_cuda`); None = colocated.
        learner_device: a colocated engine's: the learner's device (``cuda:LOCAL_RANK``); a bare ``cuda``, a
            non-CUDA device or None = `current_cuda`.
        current_cuda: this process's current CUDA device index (``torch.cuda.current_device()``, which
            accelerate sets to the local rank); None = no CUDA (vLLM's CPU backend: a colocated engine has no
            GPU, returns None; a dedicated bare ``cuda`` is then ``cuda:0``, as in `normalize_device`).
    """
    if device is not None:
        gpu = normalize_device(device, 0 if current_cuda is None else current_cuda)
        if gpu.type != "cuda":
            raise ValueError(
                f"VLLMEngine: device={device!r}: a dedicated engine needs a CUDA device like 'cuda:1'"
            )
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


def checkpoint_shapes(
    hf_config: Any, *, trust_remote_code: bool = False
) -> dict[str, tuple[int, ...]] | None:
    """State-dict name -> shape of the HF model `hf_config` describes: what a learner's `iter_state_dict` /
    `ModelWeights` yields (tied ``lm_head.weight`` included). Built on the meta device (no memory; ~0.1 s for
    a 1.5B model). None, with a warning, where transformers cannot build the model from the config."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                copy.deepcopy(hf_config), trust_remote_code=trust_remote_code
            )
    except Exception as exc:  # any failure only disables the up-front check of names
        logger.warning(
            "VLLMEngine: cannot build %s from its config (%s); weight syncs are checked against the first "
            "full sync's names and shapes instead",
            type(hf_config).__name__,
            exc,
        )
        return None
    return {name: tuple(t.shape) for name, t in iter_state_dict(model)}


def parameter_digests(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of the raw bytes of each of `model`'s named parameters (run inside a vLLM worker).

    The digest of vLLM 0.32's ``compute_weight_checksums`` worker RPC for plain (unquantised) tensors, under
    the bare parameter name instead of 0.32's ``dp0:pp0:pcp0:tp0:``-prefixed one (tested equal on 0.32).
    """
    return {
        name: hashlib.sha256(
            p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data
        ).hexdigest()
        for name, p in model.named_parameters()
    }


def set_weight_version(llm: Any, version: int) -> bool:
    """Stamp `version` on vLLM's engine (``LLM.update_weight_version``); False where vLLM lacks it (0.26).

    The weight version is informational on the engine (`VLLMEngine.policy_version` is the record), so 0.26
    just skips it.
    """
    update = getattr(llm, "update_weight_version", None)
    if update is None:
        return False
    update(str(version))
    return True


def _as_vllm_prompt(prompt: Prompt) -> Any:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"prompt_token_ids": [int(t) for t in prompt]}


def _finish_reason(reason: str | None) -> FinishReason:
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop"
    raise RuntimeError(f"vLLM finished a sample with reason {reason!r} (aborted?)")


# ---- vLLM's NCCL weight transfer (rollout server on GPUs) -----------------------------------------------------
def nccl_trainer_engine(
    base_url: str,
    weights: WeightStream,
    *,
    master_address: str,
    master_port: int,
    inference_world_size: int = 1,
    packed_buffer_mb: float | None = None,
    timeout_s: float = 600,
) -> Any:
    """vLLM's trainer-side NCCL weight-transfer engine, connected to a rollout server at `base_url`.

    Rendezvous: this process is NCCL rank 0, the server's workers ranks 1.. (the server must run with
    ``--weight-transfer-config '{"backend": "nccl"}'``). ``engine.send_weights()`` then drives vLLM's own
    ``/start_weight_update`` → ``/update_weights`` (concurrent with the broadcast) → ``/finish_weight_update``.
    Under ZeRO-3 call it on every rank (`ModelWeights` gathers collectively; only rank 0 sends).
    On vLLM 0.26, which has no trainer-side engine, returns `NCCLSender026` (same two methods; untested).
    """
    vllm = import_vllm()  # noqa: F841  (ensures the env before vLLM's modules load)
    from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient, ParamMeta, WeightSource
    from vllm.distributed.weight_transfer.packed_tensor import DEFAULT_PACKED_BUFFER_SIZE_BYTES

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    packed_bytes = (
        DEFAULT_PACKED_BUFFER_SIZE_BYTES if packed_buffer_mb is None else int(packed_buffer_mb * MB)
    )
    client = HTTPVLLMWeightSyncClient(base_url, timeout=timeout_s)
    world_size = 1 + inference_world_size
    try:
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )
    except ImportError:  # vLLM < 0.32 has only the worker-side engine
        return NCCLSender026(client, weights, master_address, master_port, world_size, rank, packed_bytes)

    class _Source(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(m.name, m.dtype, m.shape) for m in weights.metadata()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            yield from weights

    info = NCCLTrainerInitInfo(
        master_address=master_address,
        master_port=master_port,
        world_size=world_size,
        rank=rank,
        packed_buffer_size_bytes=packed_bytes,
    )
    return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=_Source())


class NCCLSender026:
    """vLLM 0.26's trainer side of NCCL weight transfer, with 0.32's ``send_weights()`` / ``shutdown()``.

    0.26 has only the worker-side ``NCCLWeightTransferEngine``, whose static ``trainer_init(dict)`` and
    ``trainer_send_weights(iterator, dict)`` this class drives the way 0.32's ``NCCLTrainerWeightTransferEngine``
    does (rendezvous and ``update_weights`` run in a thread while this process joins the same NCCL calls;
    packed buckets of `packed_bytes`). Ranks other than 0 only iterate `weights` (a ZeRO-3 gather).
    UNTESTED: written from vLLM 0.26's source; it needs vLLM 0.26 and two GPUs. If it fails, use
    ``rollout.weight_transfer_dir`` (filesystem transfer) or vLLM 0.32.
    """

    def __init__(
        self, client: Any, weights: WeightStream, master_address: str, master_port: int, world_size: int,
        rank: int, packed_bytes: int,
    ) -> None:  # fmt: skip
        # untyped on purpose: mypy sees 0.32's NCCLWeightTransferEngine, which lacks these 0.26 statics
        self._engine = importlib.import_module(
            "vllm.distributed.weight_transfer.nccl_engine"
        ).NCCLWeightTransferEngine
        self.client, self.weights = client, weights
        self.packed_bytes = packed_bytes
        self.comm: Any = None
        if rank != 0:
            return
        address = {"master_address": master_address, "master_port": master_port, "world_size": world_size}
        with ThreadPoolExecutor(max_workers=1) as pool:  # the workers block in the rendezvous too
            future = pool.submit(client.init_weight_transfer_engine, {**address, "rank_offset": 1})
            self.comm = self._engine.trainer_init(address)
            future.result()

    def send_weights(self) -> None:
        """start → update_weights (server receives) concurrent with the broadcast → finish → sync."""
        meta = self.weights.metadata()
        if self.comm is None:
            for _ in self.weights:  # not the sender: only join the learner-side gather
                pass
            return
        packed = {"packed": True, "packed_buffer_size_bytes": self.packed_bytes}
        update = {"names": [m.name for m in meta], "dtype_names": [str(m.dtype).split(".")[-1] for m in meta],
                  "shapes": [list(m.shape) for m in meta], **packed}  # fmt: skip
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            future = pool.submit(self.client.update_weights, update)
            self._engine.trainer_send_weights(iter(self.weights), {"group": self.comm, **packed})
            future.result()
        finally:
            pool.shutdown(wait=False)  # after a failed broadcast the server never returns (as in 0.32)
        self.client.finish_weight_update()
        torch.cuda.current_stream().synchronize()

    def shutdown(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None
