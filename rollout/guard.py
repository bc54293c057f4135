"""`RolloutGuard`: the ASGI middleware in front of every route of the rollout server's vLLM app.

`rollout.server` adds it with vLLM's ``--middleware`` option (an ASGI class added to the FastAPI app, in vLLM
since 2024) and hands it its settings in ``REASONRL_ROLLOUT_GUARD`` (JSON: served model, weights directory).
Added last, it is the outermost middleware, so it sees every request before vLLM does:

- every HTTP and websocket request, ``/health`` included, needs ``Authorization: Bearer <secret>``
  (`rollout.auth`; 401 otherwise). Without a secret the server is bound to loopback and answers only
  loopback clients;
- only the routes in `ALLOWED_ROUTES` are served: the learner's (`rollout.engines.remote`,
  `rollout.transfer`), OpenAI-style generation, health and metrics; vLLM's other development and admin routes
  (``/weight_checker``, ``/start_profile``, ``/release_kv_cache_memory``, LoRA loading...) get 404, as a
  route vLLM lacks would (which the client reads as an older server's missing route);
- ``POST /collective_rpc`` runs only ``reload_weights(weights_path=..., is_checkpoint_format=true)`` (403 for
  any other method), and only after `rollout.reload_check` has accepted the directory (4xx otherwise; the
  old weights keep serving). vLLM receives the resolved path;
- a collective weight update (`rollout.transfer`: ``/start_weight_update``, ``/update_weights``,
  ``/finish_weight_update``) goes on only if ``/update_weights`` announces the served model's tensors with
  their shapes (`rollout.reload_check.check_update_info`; 422 otherwise, before any tensor moves);
- ``/sleep`` and ``/wake_up`` get 409 on a server started without ``--enable-sleep-mode`` (its memory is then
  not in vLLM's sleep allocator, so a sleep would free nothing);
- a reload or update that vLLM itself fails after those checks leaves the served weights incomplete: from
  then on ``/health`` answers 503 with the reason and generation routes are refused (503) instead of
  crashing the engine, until a reload (or a whole update) succeeds; vLLM raising instead of answering (a
  worker failed midway; its outer error handler answers 500) counts as such a failure. An engine that died
  is reported 503 by vLLM's own ``/health``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from rollout.auth import is_loopback, load_token, token_matches
from rollout.reload_check import (
    ModelLayout,
    ReloadRefused,
    check_reload_dir,
    check_update_info,
    resolve_reload_dir,
    served_model_layout,
)

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUARD_ENV = "REASONRL_ROLLOUT_GUARD"
# collective_rpc methods the learner calls, with the keyword arguments each may take
RPC_METHODS = {"reload_weights": frozenset({"weights_path", "is_checkpoint_format"})}
RPC_KEYS = frozenset({"method", "args", "kwargs", "timeout"})
MAX_RPC_BODY = 1 << 20
# routes still served while the weights are incomplete (what a reload needs); /health then answers 503
WHILE_BROKEN = frozenset({
    "/collective_rpc", "/pause", "/resume", "/is_paused", "/reset_prefix_cache", "/weight_info",
    "/update_weight_version", "/v1/models", "/sleep", "/wake_up", "/is_sleeping",
    "/init_weight_transfer_engine", "/shutdown_weight_transfer_engine", "/get_world_size",
})  # fmt: skip
# the routes of a collective weight update (`rollout.transfer`), checked and tracked by the guard
UPDATE_ROUTES = frozenset({"/start_weight_update", "/update_weights", "/finish_weight_update"})
# every route the server answers: what the learner calls (`rollout.engines.remote`, `rollout.transfer`), OpenAI-style
# generation, health and metrics. Any other (vLLM's development and admin routes: weight reset, profiling, LoRA
# loading, scaling...) is refused
ALLOWED_ROUTES = WHILE_BROKEN | UPDATE_ROUTES | {
    "/health", "/metrics", "/version", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
    "/inference/v1/generate", "/inference/v1/abort_requests", "/v1/completions/render",
    "/v1/chat/completions/render",
}  # fmt: skip


SLEEP_ROUTES = frozenset({"/sleep", "/wake_up"})


def guard_settings(model: str, weights_dir: str | None, trust_remote_code: bool = False,
                   sleep_mode: bool = False) -> str:
    """The ``REASONRL_ROLLOUT_GUARD`` value for a server of `model` reloading from `weights_dir`, started with
    ``--enable-sleep-mode`` or not (`sleep_mode`)."""
    return json.dumps({"model": model, "weights_dir": weights_dir, "trust_remote_code": trust_remote_code,
                       "sleep_mode": sleep_mode})


def no_sleep_mode() -> str:
    """The refusal of ``/sleep`` and ``/wake_up`` by a server started without ``--enable-sleep-mode``."""
    return (
        "this rollout server was started without --enable-sleep-mode, so sleeping would free no memory: restart "
        "it with --enable-sleep-mode (GPU), or set rollout.sleep_between_rollouts=false"
    )


class RolloutGuard:
    """ASGI middleware: authentication, the collective_rpc allow-list, reload checks (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        raw = os.environ.get(GUARD_ENV)
        if raw is None:
            raise RuntimeError(f"{GUARD_ENV} is not set: start the server with `reasonrl rollout-server`")
        settings = json.loads(raw)
        self.app = app
        self.model: str = settings["model"]
        self.weights_dir: str | None = settings.get("weights_dir")
        self.trust_remote_code = bool(settings.get("trust_remote_code", False))
        self.sleep_mode = bool(settings.get("sleep_mode", False))
        self.token = load_token()
        self.broken: str | None = None  # why the served weights cannot generate, while they cannot
        self._layout: ModelLayout | None = None
        self._reload_lock = asyncio.Lock()
        self._updated = False  # the collective update under way has received every tensor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not self.authorized(scope):
            client = (scope.get("client") or ("?",))[0]
            logger.warning("rollout server: refused %s %s from %s (no valid secret)", scope["type"],
                           scope.get("path"), client)  # fmt: skip
            reason = "missing or wrong rollout server secret (Authorization: Bearer)" if self.token else (
                "this rollout server has no secret and serves loopback clients only"
            )  # fmt: skip
            await _refuse(scope, send, 401, reason)
            return
        path = route_path(scope)
        if path not in ALLOWED_ROUTES:
            logger.warning("rollout server: refused %s %s (not an allowed route)", scope["type"], path)
            await _refuse(scope, send, 404, not_served(path))
        elif path in SLEEP_ROUTES and not self.sleep_mode:
            await _refuse(scope, send, 409, no_sleep_mode())
        elif path == "/collective_rpc" and scope["type"] == "http":
            await self._rpc(scope, receive, send)
        elif path in UPDATE_ROUTES and scope["type"] == "http":
            await self._update(path, scope, receive, send)
        elif self.broken is not None and path not in WHILE_BROKEN:
            await _refuse(scope, send, 503, self.broken)
        else:
            await self.app(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        """A request carries the secret; without one (loopback server) it comes from a loopback client."""
        if self.token is None:
            client = scope.get("client")
            return client is not None and is_loopback(str(client[0]))
        values = [v for k, v in scope.get("headers") or () if k.lower() == b"authorization"]
        return len(values) == 1 and token_matches(values[0], self.token)

    async def _rpc(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive, MAX_RPC_BODY)
        async with self._reload_lock:
            try:
                request, kwargs = parse_rpc(body)
                path, weights_dir = kwargs["weights_path"], self.weights_dir
                target, root = await asyncio.to_thread(resolve_reload_dir, path, weights_dir)
                layout = await self._served_layout()
                await asyncio.to_thread(check_reload_dir, target, root, layout)
            except ReloadRefused as err:
                logger.warning("rollout server: refused collective_rpc: %s", err)
                await _refuse(scope, send, err.status, str(err))
                return
            request["kwargs"] = {**kwargs, "weights_path": str(target)}
            status = 500
            try:
                status = await self._forward(scope, json.dumps(request).encode(), receive, send)
            finally:
                self.broken = None if status < 400 else (
                    f"the weight reload from {target} failed (HTTP {status}) after it had started, so the "
                    "served weights are incomplete: reload a valid directory or restart the server"
                )  # fmt: skip

    async def _update(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A collective weight update (`rollout.transfer`): ``/update_weights`` goes on only if it announces a
        complete copy of the served model; the served weights are whole again once an update and the
        ``/finish_weight_update`` after it both succeed, and `broken` if either fails."""
        body = await _read_body(receive, MAX_RPC_BODY)
        if body is None:
            err = too_large(path.lstrip("/"))
            await _refuse(scope, send, err.status, str(err))
            return
        if path == "/update_weights":
            try:
                await asyncio.to_thread(_check_update_body, body, await self._served_layout())
            except ReloadRefused as err:
                logger.warning("rollout server: refused update_weights: %s", err)
                await _refuse(scope, send, err.status, str(err))
                return
        status = 500  # vLLM raising (a worker failed midway): answered 500 outside the guard
        try:
            status = await self._forward(scope, body, receive, send)
        finally:
            self._track_update(path, status)

    def _track_update(self, path: str, status: int) -> None:
        """Bookkeeping after the update request to `path` was answered `status` (`_update`)."""
        if path == "/start_weight_update":
            self._updated = False
        elif status >= 400:
            self._updated = False
            self.broken = (
                f"a collective weight update failed at {path} (HTTP {status}) after it had started, so the "
                "served weights may be incomplete: send a full update again or restart the server"
            )  # fmt: skip
        elif path == "/update_weights":
            self._updated = True
        elif self._updated:  # /finish_weight_update after a whole update
            self.broken = None

    async def _served_layout(self) -> ModelLayout:
        if self._layout is None:
            try:
                self._layout = await asyncio.to_thread(
                    served_model_layout, self.model, self.trust_remote_code
                )
            except Exception as err:
                raise ReloadRefused(
                    f"cannot build the served model's parameter list from {self.model} to check the reload: "
                    f"{type(err).__name__}: {err}",
                    500,
                ) from err
        return self._layout

    async def _forward(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> int:
        """Pass the request on with `body`; returns the status vLLM answered with."""
        status = 500
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the disconnect, whenever it comes

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        headers = [(k, v) for k, v in scope.get("headers") or () if k.lower() != b"content-length"]
        scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
        await self.app(scope, replay, watch)
        return status


def not_served(path: str) -> str:
    """The refusal of a route outside `ALLOWED_ROUTES`."""
    return (
        f"route {path} is not served by this rollout server: it answers generation, health, metrics and the "
        "learner's weight-sync routes only (rollout.guard.ALLOWED_ROUTES)"
    )


def too_large(what: str) -> ReloadRefused:
    """The refusal (413) of a `what` request whose body `_read_body` cut at the size limit."""
    return ReloadRefused(f"{what} body larger than {MAX_RPC_BODY} bytes", 413)


def json_body(body: bytes | None, what: str) -> Any:
    """The decoded JSON of a request body read with `_read_body`; `ReloadRefused` naming `what` (the request)
    if it was cut at the size limit (`too_large`) or is not JSON (400)."""
    if body is None:
        raise too_large(what)
    try:
        return json.loads(body)
    except ValueError as err:
        raise ReloadRefused(f"{what} body is not JSON: {err}", 400) from None


def _check_update_body(body: bytes, layout: ModelLayout) -> None:
    """`check_update_info` on a ``/update_weights`` body (``{"update_info": {...}}``)."""
    request = json_body(body, "update_weights")
    check_update_info(request.get("update_info") if isinstance(request, dict) else None, layout)


def route_path(scope: Scope) -> str:
    """The path the app routes on: without the ``root_path`` prefix (vLLM's ``--root-path``), if any."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", "")).rstrip("/")
    return path[len(root) :] if root and path.startswith(root + "/") else path


def parse_rpc(body: bytes | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request, its kwargs) of a collective_rpc body the guard lets through; `ReloadRefused` otherwise."""
    request = json_body(body, "collective_rpc")
    if not isinstance(request, dict) or set(request) - RPC_KEYS:
        raise ReloadRefused(f"collective_rpc body must be an object with keys among {sorted(RPC_KEYS)}", 400)
    method = request.get("method")
    if method not in RPC_METHODS:
        raise ReloadRefused(
            f"collective_rpc method {method!r} is not allowed: this server runs only {sorted(RPC_METHODS)}",
            403,
        )
    kwargs = request.get("kwargs") or {}
    if request.get("args") or not isinstance(kwargs, dict) or set(kwargs) - RPC_METHODS[method]:
        raise ReloadRefused(
            f"collective_rpc {method} takes keyword arguments among {sorted(RPC_METHODS[method])} only", 400
        )
    if not isinstance(kwargs.get("weights_path"), str) or not kwargs["weights_path"]:
        raise ReloadRefused("collective_rpc reload_weights needs weights_path, a directory of shards", 400)
    if kwargs.get("is_checkpoint_format", True) is not True:
        raise ReloadRefused("collective_rpc reload_weights takes checkpoint-format weights only", 400)
    return request, kwargs


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client went away
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    """Answer `status` with ``{"error": message}`` (a websocket is closed with policy violation, 1008)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
