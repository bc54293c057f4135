"""`RemoteEngine`: the `RolloutEngine` client of a rollout server (`rollout.server`), over HTTP.

The protocol (endpoints) is in `rollout.server`'s docstring. Weights go through the filesystem (safetensors
shards in a directory both sides see, then the server's in-place ``reload_weights`` from that path) or, with
``weight_transfer="gloo"`` / ``"nccl"``, are broadcast to the server's workers (`rollout.transfer`).

In-flight weight updates (``inflight=True``; PipelineRL, Piché et al. 2025): `update_weights_live` swaps the
weights between two decode steps without draining the requests in flight (vLLM's ``/pause?mode=keep``), so
one sample may be drawn by several policy versions. Generation then goes through vLLM's token-in/token-out
route ``/inference/v1/generate``, whose answer records, for every sample, which output tokens each weight
version drew (vLLM ≥ 0.32, served with ``--enable-scale-out``, as `rollout.server` does); the spans become
`Sample.version_spans`. Running sequences keep the KV cache their earlier tokens computed under the old
weights (as in PipelineRL): the engine's log-probs are still those of the distribution each token was drawn
from, which is what the learner's importance weights divide by.
HTTP goes through one pooled ``httpx.Client`` per engine (shared by the generation threads: httpx clients
may be), with the same guarantees as before: a timeout on every connect/read/write, errors that name the
request, the bearer secret on every request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from rollout.auth import TOKEN_ENV, TOKEN_FILE_ENV, bearer, load_token
from rollout.engines.protocol import (
    FinishReason,
    Prompt,
    Sample,
    SamplingConfig,
    check_prompts,
    rollout_metrics,
)
from rollout.transfer import CollectiveSender
from rollout.weights import MB, next_version, sync_metrics, write_safetensors_shards

logger = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"v\d{6,}")  # filesystem-sync directories: f"v{version:06d}"

def health(url: str, timeout_s: float = 5, token: str | None = None) -> bool:
    """True when the server at `url` answers ``GET /health`` with 200 (sending `token`, by default the secret
    from the environment, see `rollout.auth`)."""
    http = _Http(url, timeout_s, token)
    try:
        http.get("/health")
    except (ServerError, ConnectionError, TimeoutError):
        return False
    finally:
        http.close()
    return True


class ServerError(RuntimeError):
    """A rollout server answered with an HTTP error `status`."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Http:
    """JSON over HTTP on a pooled ``httpx.Client``; every failure is a `ServerError` (an HTTP error status),
    a `TimeoutError` (no answer within `timeout_s`: connect, read or write) or a `ConnectionError` (refused,
    reset, dead server), each naming the request.

    Every request carries ``Authorization: Bearer <token>``; `token` defaults to the secret in
    ``REASONRL_ROLLOUT_TOKEN`` / ``REASONRL_ROLLOUT_TOKEN_FILE`` (`rollout.auth.load_token`), none if unset.
    Redirects are not followed (the secret goes to the configured server only).
    """

    def __init__(self, base_url: str, timeout_s: float, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json", **bearer(token or load_token())}
        # No cap on connections (`RemoteEngine.max_concurrency` bounds them; a pool wait would be a timeout),
        # and none kept alive: each request opens its own. With idle connections kept, the sync pool of
        # several threads can close an expired idle connection it has just handed to another thread's request
        # (encode/httpcore#1110): a rollout failed with 'ReadError: [Errno 9] Bad file descriptor' after
        # the learner's step had left its connections idle. A connection costs well under a millisecond
        # beside a generation, and a closed one can never be reused as the server's keep-alive closes it.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        self._client = httpx.Client(headers=self.headers, follow_redirects=False, limits=limits)

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        try:
            response = self._client.request(method, url, content=data, timeout=self.timeout_s)
        except httpx.TimeoutException as err:
            raise TimeoutError(f"{_failed(method, url, err)} (timeout_s={self.timeout_s})") from err
        except (httpx.TransportError, OSError) as err:  # no answer: refused, reset, dead server
            raise ConnectionError(_failed(method, url, err)) from err
        if not response.is_success:
            message = f"rollout server {method} {url} failed: HTTP {response.status_code}: {response.text[:2000]}"
            if response.status_code == 401:
                message += f" (set {TOKEN_ENV} or {TOKEN_FILE_ENV} to the server's secret)"
            raise ServerError(message, response.status_code)
        return json.loads(response.content) if response.content else None

    def close(self) -> None:
        self._client.close()

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


class RemoteEngine:
    """`RolloutEngine` over HTTP to a rollout server (see the module docstring for the protocol).

    Args:
        base_url: e.g. ``http://10.0.0.5:8000``.
        weights_dir: directory shared by learner and server for weight syncs.
        bucket_mb: shard size of weight syncs (MiB).
        timeout_s: per-request timeout (a generation request included).
        max_concurrency: prompts in flight at once (one request per prompt, so each gets its own seed).
        sleep_between_rollouts: call the server's ``/sleep`` / ``/wake_up`` (GPU servers in sleep mode). Checked
            here by a ``/wake_up``, which a server started without ``--enable-sleep-mode`` refuses (409).
        sends_weights: False for a client of a server that another learner rank syncs: its `update_weights`
            only reads the stream (a ZeRO-3 `WeightStream` gathers collectively) and takes its version.
        token: the server's secret; default: from the environment, as the server reads it (`rollout.auth`).
        inflight: generate through ``/inference/v1/generate`` and record per-token weight versions, so that
            `update_weights_live` may run while `generate` is in flight (module docstring; vLLM ≥ 0.32).
        weight_transfer: ``filesystem`` (shards in `weights_dir`), or ``gloo`` / ``nccl``: broadcast to the
            server's workers (`rollout.transfer`; the server started with the same ``--weight-transfer``).

    The policy version is stored on the server (``/weight_info``, ``/update_weight_version``), so a new client
    continues from it. A vLLM 0.26 server has neither route (HTTP 404): then `server_versions` turns False,
    the version starts at 0 and lives in this client only (logged once; see `_version_route`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        weights_dir: str | Path | None = None,
        bucket_mb: float = 256,
        timeout_s: float = 600,
        max_concurrency: int = 64,
        sleep_between_rollouts: bool = False,
        sends_weights: bool = True,
        token: str | None = None,
        inflight: bool = False,
        weight_transfer: str = "filesystem",
    ) -> None:
        if weight_transfer == "filesystem" and weights_dir is None:
            raise ValueError("RemoteEngine: pass weights_dir (a directory the server can read)")
        self.http = _Http(base_url, timeout_s, token)
        self.base_url = self.http.base_url
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.sender = None if weight_transfer == "filesystem" else (
            CollectiveSender(self.http, self.base_url, weight_transfer, timeout_s=timeout_s)
        )  # fmt: skip
        self.sends_weights = sends_weights
        self.bucket_bytes = int(bucket_mb * MB)
        self.max_concurrency = max_concurrency
        self._sleep = sleep_between_rollouts
        self._asleep = False
        self.metrics: dict[str, float] = {}
        self.http.check_health(timeout_s=min(timeout_s, 10))
        card = self.http.get("/v1/models")["data"][0]
        self.model_name = card["id"]
        self._max_model_len = int(card["max_model_len"]) if card.get("max_model_len") else None
        if sleep_between_rollouts:
            self.http.post("/wake_up")  # a server without sleep mode refuses (rollout.guard), before any rollout
        self.server_versions = True
        info = self._version_route("GET", "/weight_info") or {}
        version = str(info.get("weight_version") or "0")
        self._policy_version = int(version) if version.isdigit() else 0
        self.inflight = inflight
        if inflight and not self.server_versions:
            raise ValueError(
                f"RemoteEngine(inflight=True): the rollout server at {self.base_url} keeps no weight version "
                "(vLLM < 0.32), so it cannot say which weights drew which tokens; in-flight weight updates need "
                "a vLLM >= 0.32 rollout server"
            )

    @property
    def policy_version(self) -> int:
        """The version of the server's weights as this client knows it; advanced by `update_weights` only."""
        return self._policy_version

    @property
    def max_model_len(self) -> int | None:
        """The server's prompt + response token limit, from its model card (``GET /v1/models``); None where the
        card has none (the server then rejects over-long requests itself)."""
        return self._max_model_len

    @property
    def cache_block_size(self) -> int | None:
        """Not known to the client."""
        return None

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Sample]:
        """`params.n` samples per prompt, grouped; one request per prompt, seeded ``params.seed_of(i)``."""
        check_prompts(prompts)
        self.wake()
        start = time.perf_counter()
        one = self._generate_tokens if self.inflight else self._complete
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompts)))) as pool:
            responses = list(pool.map(lambda ip: one(ip[0], ip[1], params), enumerate(prompts)))
        samples = [s for group in responses for s in group]
        self.metrics.update(rollout_metrics(samples, time.perf_counter() - start))
        return samples

    def _complete(self, index: int, prompt: Prompt, params: SamplingConfig) -> list[Sample]:
        body = {
            "model": self.model_name,
            "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
            **_sampling(index, params),
            "return_token_ids": True,
        }
        version = self._policy_version
        out = self.http.post("/v1/completions", body)
        samples: list[Sample] = []
        for choice in sorted(out["choices"], key=lambda c: c["index"]):
            ids = list(choice["token_ids"])
            logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
            if len(logprobs) != len(ids):
                raise RuntimeError(f"rollout server returned {len(logprobs)} log-probs for {len(ids)} tokens")
            samples.extend(
                Sample(
                    index,
                    list(choice["prompt_token_ids"]),
                    list(ids),
                    choice["text"],
                    list(logprobs),
                    _finish_reason(choice["finish_reason"]),
                    version,
                )
                for _ in range(_copies(params))
            )
        return samples

    def _generate_tokens(self, index: int, prompt: Prompt, params: SamplingConfig) -> list[Sample]:
        """`_complete` through ``/inference/v1/generate``: the same sampling, plus each sample's weight-version
        spans (a text prompt is first tokenized by the server's ``/tokenize``, as ``/v1/completions`` does)."""
        if isinstance(prompt, str):
            ids = self.http.post("/tokenize", {"model": self.model_name, "prompt": prompt})["tokens"]
        else:
            ids = [int(t) for t in prompt]
        version = self._policy_version
        body = {"model": self.model_name, "token_ids": ids, "sampling_params": _sampling(index, params),
                "output_mode": "text"}
        out = self.http.post("/inference/v1/generate", body)
        samples: list[Sample] = []
        for choice in sorted(out["choices"], key=lambda c: c["index"]):
            tokens = list(choice["token_ids"])
            logprobs = [float(e["logprob"]) for e in (choice.get("logprobs") or {}).get("content") or []]
            if len(logprobs) != len(tokens):
                raise RuntimeError(f"rollout server returned {len(logprobs)} log-probs for {len(tokens)} tokens")
            spans = version_spans(choice.get("weight_versions"), len(tokens), version)
            samples.extend(Sample(index, list(ids), list(tokens), choice["text"], list(logprobs),
                                  _finish_reason(choice["finish_reason"]), spans[0][0],
                                  version_spans=[list(span) for span in spans])
                           for _ in range(_copies(params)))  # fmt: skip
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
        """Write the weights for the server, have it reload them and reset its prefix cache, and advance the
        policy version (`rollout.weights.next_version`; the server's too, where it keeps one). Without
        `sends_weights` only read the stream and advance the version."""
        version = next_version(weights, self._policy_version)
        if not self.sends_weights:
            for _ in weights:  # under ZeRO-3 the gathers are collective: iterate in step with the sender
                pass
            self._policy_version = version
            return
        self._swap(weights, version, keep_running=False)

    def update_weights_live(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """`update_weights` without draining: the requests in flight are frozen between two decode steps
        (``/pause?mode=keep``), the weights reloaded and the server's version advanced, and the requests go
        on under the new weights; their later tokens carry the new version in `Sample.version_spans`.

        The prefix cache is not reset (blocks of running requests cannot be): call `reset_prefix_cache` once
        no request is in flight, before anything relies on fresh cache blocks (the stale-weight probe).
        Needs ``inflight=True``."""
        if not self.inflight:
            raise RuntimeError("RemoteEngine.update_weights_live needs RemoteEngine(inflight=True)")
        self._swap(weights, next_version(weights, self._policy_version), keep_running=True)

    def _swap(self, weights: Iterable[tuple[str, torch.Tensor]], version: int, *, keep_running: bool) -> None:
        """Pause the server (draining it, or with `keep_running` freezing its requests), write and reload the
        weights, reset the prefix cache (drained only), advance the version, resume; the sync metrics."""
        start = time.perf_counter()
        self.wake()  # a no-op unless asleep (never while requests run)
        self.http.post("/pause", **({"mode": "keep"} if keep_running else {"mode": "wait", "clear_cache": "true"}))
        try:
            nbytes = self.sender.send(weights) if self.sender else self._sync_filesystem(weights, version)
            if not keep_running:
                self.http.post("/reset_prefix_cache")
            self._version_route("POST", "/update_weight_version", {"new_version": str(version)})
        except BaseException:
            with contextlib.suppress(Exception):  # a dead server: the sync's own error says so, not /resume's
                self.http.post("/resume")
            raise
        self.http.post("/resume")
        self._policy_version = version
        self.metrics.update(sync_metrics(time.perf_counter() - start, nbytes))

    def reset_prefix_cache(self) -> None:
        """Drop the server's cached prefix blocks (after `update_weights_live`, once nothing is in flight)."""
        self.http.post("/reset_prefix_cache")

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
        if self.weights_dir is None:  # __init__ requires it without a sender; not assert: -O
            raise ValueError("RemoteEngine: filesystem weight transfer needs weights_dir")
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
        """Close the client's connections; the server belongs to whoever started it."""
        if self.sender is not None:
            self.sender.close()
        self.http.close()


def _failed(method: str, url: str, err: Exception) -> str:
    return f"rollout server {method} {url} failed: {type(err).__name__}: {err}"


def _copies(params: SamplingConfig) -> int:
    """How many `Sample`s each returned choice becomes: ``n`` when greedy (vLLM refuses ``n > 1`` with greedy
    sampling, so `_sampling` asks for one), else 1."""
    return params.n if params.greedy else 1


def _sampling(index: int, params: SamplingConfig) -> dict[str, Any]:
    """vLLM sampling fields of prompt `index`'s request (both generation routes take the same ones); greedy:
    one sample (`_copies`)."""
    return {
        "n": params.n // _copies(params),
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "min_tokens": params.min_tokens,
        "stop": list(params.stop),
        "include_stop_str_in_output": True,
        "seed": params.seed_of(index),
        "logprobs": 0,
        "skip_special_tokens": True,
    }


def version_spans(raw: Sequence[dict[str, Any]] | None, n_tokens: int, start_version: int) -> list[list[int]]:
    """``[version, start, end]`` spans of a sample's `n_tokens` output tokens from vLLM's ``weight_versions``
    (``{"version": str, "start": int, "end": int}`` each). A version that is not a number (vLLM's
    ``"default"``, before any ``/update_weight_version``) is `start_version`, the one the client knew at the
    request; no spans at all mean every token is `start_version`'s. The spans must tile [0, n_tokens).

    >>> version_spans([{"version": "default", "start": 0, "end": 3}, {"version": "4", "start": 3, "end": 5}], 5, 3)
    [[3, 0, 3], [4, 3, 5]]
    >>> version_spans(None, 2, 7)
    [[7, 0, 2]]
    """
    if not raw:
        return [[start_version, 0, n_tokens]]
    spans = [[int(v) if (v := str(r["version"])).isdigit() else start_version, int(r["start"]), int(r["end"])]
             for r in raw]
    bounds = [0, *(s[2] for s in spans)]
    if [s[1] for s in spans] != bounds[:-1] or bounds[-1] != n_tokens or any(s[1] >= s[2] for s in spans):
        raise RuntimeError(f"rollout server returned weight-version spans {raw} that do not tile {n_tokens} tokens")
    return spans


def _finish_reason(reason: str | None) -> FinishReason:
    if reason in ("stop", "length"):
        return reason  # type: ignore[return-value]
    raise RuntimeError(f"rollout server finished a sample with reason {reason!r} (aborted?)")

