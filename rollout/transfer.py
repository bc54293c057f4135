"""Collective weight transfer, learner side: weights broadcast to a rollout server's workers, no shared storage.

The protocol is vLLM's weight-transfer API (its ``/init_weight_transfer_engine``, ``/start_weight_update``,
``/update_weights``, ``/finish_weight_update`` routes, vLLM ≥ 0.26):

1. once: the learner (rank 0 of a new group) opens a rendezvous on ``host:port`` and, concurrently, asks the
   server to join it with ``world_size = 1 + the server's workers`` (``/get_world_size``);
2. per update: ``/start_weight_update``; then ``/update_weights`` announces every tensor (names, dtypes, full
   shapes, in order) while the learner broadcasts them one by one in that order, and each worker loads
   each tensor as it arrives; ``/finish_weight_update`` ends the layerwise reload.

Backends: ``nccl`` (GPU; vLLM's own engine on the server, ``PyNcclCommunicator`` here; two processes need
two GPUs) and ``gloo`` (TCP, host memory; `rollout.gloo_engine` on the server, `gloo_group` here), which is
what runs on CPU. The server is started with the same backend (``reasonrl rollout-server --weight-transfer``).

Failure is bounded: each broadcast is awaited while watching the ``/update_weights`` request, so a server
that refuses the update (its guard checks names and shapes first) or dies ends the sync with that error
instead of a hang; the group is then rebuilt at the next sync. A server that refuses to join the group (one
started without the same ``--weight-transfer``) fails the first sync as soon as it answers, not after the
rendezvous timeout. Naive twin: the filesystem transfer (`rollout.weights.write_safetensors_shards` +
``reload_weights``); tests check both give the same weights.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

import torch
import torch.distributed as dist

from rollout.weights import TensorMeta, WeightStream

BACKEND_GLOO = "gloo"
BACKEND_NCCL = "nccl"
BACKENDS = (BACKEND_GLOO, BACKEND_NCCL)
Pairs = Iterable[tuple[str, torch.Tensor]]


class Client(Protocol):
    """The HTTP calls the sender makes (`rollout.engines.remote`'s client: JSON, the secret, timeouts)."""

    def get(self, path: str) -> Any: ...

    def post(self, path: str, body: Any = None) -> Any: ...


def gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """A gloo process group of `world_size` ranks that meet at ``host:port`` (rank 0 listens there), outside
    ``torch.distributed``'s global state; every operation fails after `timeout_s`.

    Rank 0's rendezvous store listens on ``port`` on all interfaces, whatever `host`, and takes no secret:
    firewall the learner's port range like the rollout server's port."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)  # type: ignore[attr-defined]
    prefixed = dist.PrefixStore("reasonrl-weights", store)  # type: ignore[attr-defined]
    return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)


def address_towards(url: str) -> str:
    """This machine's address on the route to the server at `url` (what the server dials back to)."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or "127.0.0.1"
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:  # UDP connect: no packet is sent
        sock.connect((host, parsed.port or 80))
        return str(sock.getsockname()[0])


def _family(host: str) -> socket.AddressFamily:
    """The socket family for `host`: IPv6 for an IPv6 address, else IPv4 (host names resolve to IPv4)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at `host` now (the rendezvous port; a server's port in tests)."""
    with socket.socket(_family(host)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def update_info(listing: list[TensorMeta]) -> dict[str, Any]:
    """The ``update_info`` body of ``/update_weights``: names, dtype names (``float32``) and full shapes."""
    return {
        "names": [m.name for m in listing],
        "dtype_names": [str(m.dtype).removeprefix("torch.") for m in listing],
        "shapes": [list(m.shape) for m in listing],
    }


class CollectiveSender:
    """Sends weight updates to a rollout server over a `backend` group (module docstring).

    Args:
        client: the server's HTTP client.
        server_url: the server's URL (to find this machine's address on the route to it).
        backend: ``gloo`` or ``nccl``.
        timeout_s: the longest one sync may wait for the server (rendezvous, each broadcast).
        host: the address the server's workers dial to meet this learner; default: `address_towards`.
    """

    def __init__(
        self,
        client: Client,
        server_url: str,
        backend: str,
        *,
        timeout_s: float = 600,
        host: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"weight transfer backend {backend!r}: use one of {BACKENDS} (or filesystem)")
        self.client = client
        self.backend = backend
        self.timeout_s = timeout_s
        self.host = host or address_towards(server_url)
        self.group: Any = None  # gloo ProcessGroup or vLLM PyNcclCommunicator, built at the first send
        self.connects = 0
        self.settle_s = 10.0  # a send's completion after the server confirmed the update (`_await`)
        self._abandoned: list[Any] = []  # groups with a send in flight: destroying one waits out its timeout
        # (released by `close`)

    def send(self, weights: Pairs) -> int:
        """One full update (start, announce + broadcast, finish); the bytes sent."""
        if self.group is None:
            self._connect()
        listing, tensors = _listed(weights)
        try:
            self.client.post("/start_weight_update")  # failed, it may still have begun the server's update
            with ThreadPoolExecutor(1, thread_name_prefix="weight-update") as pool:
                announced = pool.submit(
                    self.client.post, "/update_weights", {"update_info": update_info(listing)}
                )
                nbytes = self._broadcast(listing, tensors, announced)
                announced.result()
        except BaseException:
            self._abandon()  # the group's state is unknown: rebuild it at the next sync
            _quietly(self.client.post, "/finish_weight_update")  # end the server's update session
            raise
        self.client.post("/finish_weight_update")
        return nbytes

    def _abandon(self) -> None:
        if self.group is not None:
            self._abandoned.append(self.group)
        self.group = None

    def close(self) -> None:
        """End the transfer: the server's side (best effort), and the groups given up after failed syncs,
        released in a background thread (destroying one with a send in flight waits out its timeout)."""
        abandoned, self._abandoned = self._abandoned, []
        if abandoned:
            threading.Thread(target=abandoned.clear, name="weight-group-release", daemon=True).start()
        if self.group is not None:
            self.group = None
            _quietly(self.client.post, "/shutdown_weight_transfer_engine")  # vLLM 0.32; 404 on 0.26

    def _connect(self) -> None:
        """Open the group: this learner's rendezvous and the server's request to join it, concurrently. An
        error answer from the server ends the wait at once (the rendezvous would wait `timeout_s` for workers
        that never come); the rendezvous is then left to time out in the background."""
        workers = int(self.client.get("/get_world_size")["world_size"])
        port = free_port(self.host)
        init = {"master_address": self.host, "master_port": port, "rank_offset": 1, "world_size": 1 + workers}
        joined = _in_background(self.client.post, "/init_weight_transfer_engine", {"init_info": init})
        group = _in_background(self._join, init)
        wait([joined, group], return_when=FIRST_EXCEPTION)
        error = joined.exception() if joined.done() else None
        if error is not None:
            if group.done() and group.exception() is None:
                self._abandoned.append(group.result())
            raise self._refused(error)
        self.group = group.result()
        joined.result()
        self.connects += 1

    def _refused(self, error: BaseException) -> BaseException:
        """The error to raise when the server's join request failed with `error`: an HTTP error answer (it has
        a ``status``), most likely from a server started without this backend, says how to start it."""
        if getattr(error, "status", None) is None:
            return error  # no answer (ConnectionError, TimeoutError): the request's own error says so
        return RuntimeError(
            f"weight transfer ({self.backend}): the rollout server did not join the learner's group: {error} "
            f"-- start the rollout server with --weight-transfer {self.backend} (the learner's "
            "rollout.weight_transfer)"
        )

    def _join(self, init: dict[str, Any]) -> Any:
        if self.backend == BACKEND_GLOO:
            return gloo_group(
                init["master_address"], init["master_port"], 0, init["world_size"], self.timeout_s
            )
        from vllm.distributed.weight_transfer.nccl_common import trainer_init  # vLLM 0.26 and 0.32

        return trainer_init(init)

    def _broadcast(self, listing: list[TensorMeta], tensors: Iterator[tuple[str, torch.Tensor]],
                   announced: Future[Any]) -> int:  # fmt: skip
        nbytes = 0
        for meta in listing:
            name, tensor = next(tensors, (None, None))
            if name != meta.name or tensor is None:
                raise RuntimeError(
                    f"weight stream yielded {name!r} where its listing announced {meta.name!r}"
                )
            tensor = self._on_wire(tensor)
            self._await(self._send_one(tensor), announced, meta.name)
            nbytes += tensor.numel() * tensor.element_size()
        return nbytes

    def _on_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        device = (
            torch.device("cpu")
            if self.backend == BACKEND_GLOO
            else torch.device("cuda", torch.cuda.current_device())
        )
        return tensor.detach().to(device).contiguous()

    def _send_one(self, tensor: torch.Tensor) -> Callable[[], bool]:
        """Start broadcasting `tensor`; a function that says whether it has gone."""
        if self.backend == BACKEND_GLOO:
            return self.group.broadcast(tensor, 0).is_completed  # type: ignore[no-any-return]
        stream = torch.cuda.current_stream()
        self.group.broadcast(tensor, src=0, stream=stream)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        return event.query

    def _await(self, done: Callable[[], bool], announced: Future[Any], name: str) -> None:
        """Wait until the send `done` reports it has gone. An update the server answered with an error ends
        the wait with that error. One it answered with success means every announced tensor arrived: the
        send's own completion can still lag behind that answer (seen with gloo: the last broadcast reported
        done after the server's reply), so it gets `settle_s` more before it counts as lost."""
        deadline = time.monotonic() + self.timeout_s
        answered = False
        while not done():
            if announced.done() and not answered:
                error = announced.exception()
                if error is not None:
                    raise error  # the request's own error: ServerError (refused: 422), ConnectionError (died)
                answered, deadline = True, min(deadline, time.monotonic() + self.settle_s)
            if time.monotonic() > deadline:
                if answered:
                    raise RuntimeError(f"weight transfer ({self.backend}): the server ended the update, but "
                                       f"sending {name} did not complete within {self.settle_s} s after it")
                raise TimeoutError(
                    f"weight transfer ({self.backend}): {name} not received within {self.timeout_s} s"
                )
            time.sleep(0.0005)


def _listed(weights: Pairs) -> tuple[list[TensorMeta], Iterator[tuple[str, torch.Tensor]]]:
    """The tensors' listing up front, and the tensors: a `WeightStream` lists itself without gathering
    (ZeRO-3); any other iterable is materialized (views, no copies)."""
    if isinstance(weights, WeightStream):
        return weights.metadata(), iter(weights)
    pairs = list(weights)
    return [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in pairs], iter(pairs)


def _in_background(call: Callable[..., Any], *args: Any) -> Future[Any]:
    """`call(*args)` in a daemon thread: a wait that is given up on (a rendezvous whose peer never comes, a
    request to a server that has already failed otherwise) blocks neither the caller nor the process's exit."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(call(*args))
        except BaseException as err:  # handed to whoever waits on the future
            future.set_exception(err)

    threading.Thread(target=run, name="weight-rendezvous", daemon=True).start()
    return future


def _quietly(call: Callable[[str], Any], path: str) -> None:
    with contextlib.suppress(Exception):  # cleanup after another failure, or a route an older server lacks
        call(path)
