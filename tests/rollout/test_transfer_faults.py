"""`rollout.transfer.CollectiveSender` against servers that fail, without vLLM: a fake HTTP server (a server
started without the matching ``--weight-transfer``), so each failure's wait is checked in seconds."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
import torch

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
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoTransferServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


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
