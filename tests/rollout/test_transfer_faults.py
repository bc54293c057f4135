"""`rollout.transfer.CollectiveSender` against servers that fail, without vLLM: a fake HTTP server (a server
started without the matching ``--weight-transfer``) and a recording client (requests that fail), so each
failure's cleanup and wait are checked in seconds."""

from __future__ import annotations

import gc
import json
import time
import weakref
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
import torch
from helpers import serving

from rollout.engines.remote import _Http
from rollout.transfer import CollectiveSender

WEIGHTS = [("w", torch.ones(2))]


class NoTransferServer(BaseHTTPRequestHandler):
    """A server started without a weight-transfer backend: it has one worker, and vLLM fails
    ``/init_weight_transfer_engine`` at once (a worker raises 'Weight transfer not configured': HTTP 500)."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.answer(200, json.dumps({"world_size": 1}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.seen.append(self.path)
        self.answer(500, b"Internal Server Error")

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def no_transfer_server() -> Iterator[str]:
    NoTransferServer.seen = []
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), NoTransferServer)) as url:
        yield url


def test_a_server_without_the_backend_fails_the_first_sync_at_once(no_transfer_server: str) -> None:
    """The server's error answer ends the rendezvous wait (not the store's timeout), and the error says how to
    start the server."""
    http = _Http(no_transfer_server, timeout_s=30)
    sender = CollectiveSender(http, no_transfer_server, "gloo", timeout_s=30, host="127.0.0.1")
    start = time.monotonic()
    with pytest.raises(RuntimeError) as caught:
        sender.send(WEIGHTS)
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "/init_weight_transfer_engine failed: HTTP 500" in message, message
    assert "start the rollout server with --weight-transfer gloo" in message, message
    assert NoTransferServer.seen == ["/get_world_size", "/init_weight_transfer_engine"]
    assert sender.group is None and sender.connects == 0
    http.close()


class Recorder:
    """A client that records its requests and raises `fail[path]` for a path listed there."""

    def __init__(self, fail: dict[str, BaseException]) -> None:
        self.fail = fail
        self.posts: list[str] = []

    def get(self, path: str) -> Any:
        raise AssertionError(f"unexpected GET {path}")

    def post(self, path: str, body: Any = None) -> Any:
        self.posts.append(path)
        if path in self.fail:
            raise self.fail[path]
        return None


def test_a_failed_start_still_ends_the_servers_update() -> None:
    """A start whose answer is lost may have begun the update on the server, which then refuses every later
    start: the sender ends it with /finish_weight_update, as after any other failed update."""
    client = Recorder({"/start_weight_update": TimeoutError("no answer")})
    sender = CollectiveSender(client, "http://127.0.0.1:1", "gloo", timeout_s=5, host="127.0.0.1")
    sender.group = object()  # connected
    with pytest.raises(TimeoutError, match="no answer"):
        sender.send(WEIGHTS)
    assert client.posts == ["/start_weight_update", "/finish_weight_update"]
    assert sender.group is None  # rebuilt at the next sync


class SlowToDestroy:
    """Stands for a gloo group with a send in flight: destroying it waits out that send's timeout."""

    def __del__(self) -> None:
        time.sleep(2)


def test_close_releases_abandoned_groups_without_waiting() -> None:
    sender = CollectiveSender(Recorder({}), "http://127.0.0.1:1", "gloo", timeout_s=5, host="127.0.0.1")
    group = SlowToDestroy()
    released = weakref.ref(group)
    sender._abandoned.append(group)
    del group
    start = time.monotonic()
    sender.close()
    assert time.monotonic() - start < 1 and sender._abandoned == []
    deadline = time.monotonic() + 10
    while released() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert released() is None
