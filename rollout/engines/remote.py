"""`RemoteEngine`: the `RolloutEngine` client of a rollout server (`rollout.server`), over HTTP.

The protocol (endpoints, weight-transfer modes) is in `rollout.server`'s docstring.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch

from rollout.auth import TOKEN_ENV, TOKEN_FILE_ENV, bearer, load_token
from rollout.engines.protocol import (
    FinishReason,
    Prompt,
    Sample,
    SamplingConfig,
    rollout_metrics,
    sample_seed,
    sync_metrics,
)
from rollout.weights import MB, ModelWeights, TensorMeta, write_safetensors_shards

logger = logging.getLogger(__name__)

TransferMode = Literal["filesystem", "nccl"]
_VERSION_DIR = re.compile(r"v\d{6,}")  # filesystem-sync directories: f"v{version:06d}"

def health(url: str, timeout_s: float = 5, token: str | None = None) -> bool:
    """True when the server at `url` answers ``GET /health`` with 200 (sending `token`, by default the secret
    from the environment, see `rollout.auth`)."""
    try:
        _Http(url, timeout_s, token).get("/health")
    except (ServerError, ConnectionError, TimeoutError):
        return False
    return True


class ServerError(RuntimeError):
    """A rollout server answered with an HTTP error `status`."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Http:
    """Tiny JSON-over-HTTP helper on the standard library (the learner needs no HTTP package).

    Every request carries ``Authorization: Bearer <token>``; `token` defaults to the secret in
    ``REASONRL_ROLLOUT_TOKEN`` / ``REASONRL_ROLLOUT_TOKEN_FILE`` (`rollout.auth.load_token`), none if unset.
    """

    def __init__(self, base_url: str, timeout_s: float, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json", **bearer(token or load_token())}

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            message = f"rollout server {method} {url} failed: HTTP {err.code}: {detail}"
            if err.code == 401:
                message += f" (set {TOKEN_ENV} or {TOKEN_FILE_ENV} to the server's secret)"
            raise ServerError(message, err.code) from err
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            # no answer: refused, reset, dead server, timeout; say which request it was
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            message = f"rollout server {method} {url} failed: {type(reason).__name__}: {reason}"
            if isinstance(reason, TimeoutError):
                raise TimeoutError(f"{message} (timeout_s={self.timeout_s})") from err
            raise ConnectionError(message) from err
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def check_health(self, timeout_s: float) -> None:
        """Raise unless ``GET /health`` answers 200: ConnectionError (no answer, or unhealthy: 5xx with the
        server's reason), ServerError (any other refusal, e.g. 401 for a missing or wrong secret)."""
        saved, self.timeout_s = self.timeout_s, timeout_s
        try:
            self.get("/health")
        except (ServerError, ConnectionError, TimeoutError) as err:
            if isinstance(err, ServerError) and err.status < 500:
                raise
            raise ConnectionError(f"RemoteEngine: no healthy rollout server at {self.base_url}: {err}") from err
        finally:
            self.timeout_s = saved

    def post(self, path: str, body: Any = None, **query: Any) -> Any:
        return self.request("POST", path, body, query or None)


class _CurrentWeights:
    """The weights of the sync in progress, as vLLM's NCCL engine wants them: ``metadata()`` + iteration."""

    def __init__(self) -> None:
        self.weights: Iterable[tuple[str, torch.Tensor]] = ()

    def metadata(self) -> list[TensorMeta]:
        if isinstance(self.weights, ModelWeights):
            return self.weights.metadata()
        self.weights = list(self.weights)  # references to the learner's tensors, not copies
        return [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in self.weights]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.weights


class RemoteEngine:
    """`RolloutEngine` over HTTP to a rollout server (see the module docstring for the protocol).

    Args:
        base_url: e.g. ``http://10.0.0.5:8000``.
        transfer: ``"filesystem"`` (needs `weights_dir`) or ``"nccl"`` (call `init_nccl` once first).
        weights_dir: directory shared by learner and server for filesystem syncs.
        bucket_mb: shard size of filesystem syncs (MiB).
        timeout_s: per-request timeout (a generation request included).
        max_concurrency: prompts in flight at once (one request per prompt, so each gets its own seed).
        sleep_between_rollouts: call the server's ``/sleep`` / ``/wake_up`` (GPU servers in sleep mode).
        token: the server's secret; default: from the environment, as the server reads it (`rollout.auth`).

    The policy version is stored on the server (``/weight_info``, ``/update_weight_version``), so a new client
    continues from it. A vLLM 0.26 server has neither route (HTTP 404): then `server_versions` turns False,
    the version starts at 0 and lives in this client only (logged once; see `_version_route`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        transfer: TransferMode = "filesystem",
        weights_dir: str | Path | None = None,
        bucket_mb: float = 256,
        timeout_s: float = 600,
        max_concurrency: int = 64,
        sleep_between_rollouts: bool = False,
        token: str | None = None,
    ) -> None:
        if transfer == "filesystem" and weights_dir is None:
            raise ValueError(
                "RemoteEngine: transfer='filesystem' needs weights_dir (a directory the server can read)"
            )
        if transfer not in ("filesystem", "nccl"):
            raise ValueError(f"RemoteEngine: transfer={transfer!r} must be 'filesystem' or 'nccl'")
        self.http = _Http(base_url, timeout_s, token)
        self.base_url = self.http.base_url
        self.transfer = transfer
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.bucket_bytes = int(bucket_mb * MB)
        self.max_concurrency = max_concurrency
        self._sleep = sleep_between_rollouts
        self._asleep = False
        self.metrics: dict[str, float] = {}
        self.http.check_health(timeout_s=min(timeout_s, 10))
        self.model_name = self.http.get("/v1/models")["data"][0]["id"]
        self.server_versions = True
        info = self._version_route("GET", "/weight_info") or {}
        version = str(info.get("weight_version") or "0")
        self.policy_version = int(version) if version.isdigit() else 0
        self._nccl: Any = None
        self._nccl_weights = _CurrentWeights()

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Sample]:
        """`params.n` samples per prompt, grouped; one request per prompt with seed ``sample_seed(seed, i, n, 0)``."""
        self.wake()
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompts)))) as pool:
            responses = list(pool.map(lambda ip: self._complete(ip[0], ip[1], params), enumerate(prompts)))
        samples = [s for group in responses for s in group]
        self.metrics.update(rollout_metrics(samples, time.perf_counter() - start))
        return samples

    def _complete(self, index: int, prompt: Prompt, params: SamplingConfig) -> list[Sample]:
        body = {
            "model": self.model_name,
            "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "min_tokens": params.min_tokens,
            "stop": list(params.stop),
            "include_stop_str_in_output": True,
            "seed": sample_seed(params.seed, index, params.n, 0),
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        version = self.policy_version
        out = self.http.post("/v1/completions", body)
        samples = []
        for choice in sorted(out["choices"], key=lambda c: c["index"]):
            ids = list(choice["token_ids"])
            logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
            if len(logprobs) != len(ids):
                raise RuntimeError(f"rollout server returned {len(logprobs)} log-probs for {len(ids)} tokens")
            samples.append(
                Sample(
                    index,
                    list(choice["prompt_token_ids"]),
                    ids,
                    choice["text"],
                    logprobs,
                    _finish_reason(choice["finish_reason"]),
                    version,
                )
            )
        return samples

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence (``prompt_logprobs=0``)."""
        self.wake()
        result = []
        for seq in token_ids:
            ids = [int(t) for t in seq]
            body = {"model": self.model_name, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}
            entries = self.http.post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
            result.append([float(entries[t][str(ids[t])]["logprob"]) for t in range(1, len(ids))])
        return result

    # ---- weights ------------------------------------------------------------------------------------------
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send new weights (filesystem or NCCL), reset the prefix cache, bump the server's weight version."""
        start = time.perf_counter()
        version = self.policy_version + 1
        self.wake()
        self.http.post("/pause", mode="wait", clear_cache="true")
        try:
            if self.transfer == "filesystem":
                nbytes = self._sync_filesystem(weights, version)
            else:
                nbytes = self._sync_nccl(weights)
            self.http.post("/reset_prefix_cache")
            self._version_route("POST", "/update_weight_version", {"new_version": str(version)})
        finally:
            self.http.post("/resume")
        self.policy_version = version
        self.metrics.update(sync_metrics(time.perf_counter() - start, nbytes))

    def _version_route(self, method: str, path: str, body: Any = None) -> Any:
        """Call a weight-version route; None once the server has shown it lacks them (HTTP 404, vLLM 0.26).

        The first 404 sets `server_versions` False (one log line) and later calls skip the request; other
        errors propagate.
        """
        if not self.server_versions:
            return None
        try:
            return self.http.request(method, path, body)
        except ServerError as err:
            if err.status != 404:
                raise
        self.server_versions = False
        logger.warning(
            "rollout server %s has no %s %s (vLLM < 0.32): the policy version is kept by this client only",
            self.base_url, method, path,
        )  # fmt: skip
        return None

    def _sync_filesystem(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        assert self.weights_dir is not None
        target = self.weights_dir / f"v{version:06d}"
        nbytes = write_safetensors_shards(weights, target, self.bucket_bytes)
        self.http.post(
            "/collective_rpc",
            {
                "method": "reload_weights",
                "kwargs": {"weights_path": str(target.resolve()), "is_checkpoint_format": True},
            },
        )
        for old in self.weights_dir.iterdir():  # only version directories this class writes (``v000123``)
            if old.is_dir() and _VERSION_DIR.fullmatch(old.name) and old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)
        return nbytes

    def init_nccl(self, master_address: str, master_port: int, inference_world_size: int = 1) -> None:
        """Join an NCCL group with the server's workers (server started with ``--weight-transfer nccl``)."""
        from rollout.engines.vllm import nccl_trainer_engine

        self._nccl = nccl_trainer_engine(
            self.base_url,
            self._nccl_weights,
            master_address=master_address,
            master_port=master_port,
            inference_world_size=inference_world_size,
            packed_buffer_mb=self.bucket_bytes / MB,
            timeout_s=self.http.timeout_s,
        )

    def _sync_nccl(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        if self._nccl is None:
            raise RuntimeError(
                "RemoteEngine(transfer='nccl'): call init_nccl(master_address, master_port) first"
            )
        self._nccl_weights.weights = weights
        try:
            meta = self._nccl_weights.metadata()
            self._nccl.send_weights()
        finally:
            self._nccl_weights.weights = ()
        return sum(
            int(torch.Size(m.shape).numel()) * torch.empty((), dtype=m.dtype).element_size() for m in meta
        )

    # ---- memory -------------------------------------------------------------------------------------------
    @property
    def sleep_supported(self) -> bool:
        return self._sleep

    def sleep(self) -> None:
        if self._sleep and not self._asleep:
            self.http.post("/sleep", level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.http.post("/wake_up")
            self._asleep = False

    def close(self) -> None:
        """Release the NCCL group; the server itself belongs to whoever started it."""
        if self._nccl is not None:
            self._nccl.shutdown()
            self._nccl = None


def _finish_reason(reason: str | None) -> FinishReason:
    if reason in ("stop", "length"):
        return reason  # type: ignore[return-value]
    raise RuntimeError(f"rollout server finished a sample with reason {reason!r} (aborted?)")

