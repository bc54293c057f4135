"""The rollout-server client's HTTP layer (`rollout.engines.remote._Http`, on httpx) against a small local
server: the bearer secret on every request, JSON both ways, HTTP errors as `ServerError` with the status and
the server's text, the 401 hint, no redirect followed (the secret stays with the configured server), and
requests from many threads at once through the one client. Refused connections and silent servers are in
`test_rollout_server.py::test_http_errors_name_the_request`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from helpers import serving

from rollout.auth import TOKEN_ENV
from rollout.engines.remote import ServerError, _Http

SECRET = "s3cret-token-0123456789"


class _Handler(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str, str | None, object]]] = []  # (method, path, Authorization, JSON body)

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
        if self.path.startswith("/echo"):
            self._answer(200, json.dumps({"path": self.path, "body": body}).encode())
        elif self.path == "/empty":
            self._answer(200, b"")
        elif self.path == "/broken":
            self._answer(500, b"engine died")
        elif self.path == "/locked":
            self._answer(401, b"Unauthorized")
        elif self.path == "/moved":
            self._answer(307, b"", {"Location": "/echo/after-redirect"})
        else:
            self._answer(404, b"no such route")

    do_GET = do_POST = _handle


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog (5) resets a burst of concurrent connections


@pytest.fixture
def url() -> Iterator[str]:
    _Handler.seen = []
    with serving(_Server(("127.0.0.1", 0), _Handler)) as served:
        yield served


def test_json_both_ways_with_the_secret(url: str) -> None:
    http = _Http(url, timeout_s=5, token=SECRET)
    try:
        assert http.post("/echo", {"a": [1, 2]}, mode="wait") == {"path": "/echo?mode=wait", "body": {"a": [1, 2]}}
        assert http.get("/empty") is None
    finally:
        http.close()
    assert [(m, a) for m, _, a, _ in _Handler.seen] == [("POST", f"Bearer {SECRET}"), ("GET", f"Bearer {SECRET}")]


def test_secret_from_the_environment(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    http = _Http(url, timeout_s=5)
    http.get("/echo")
    http.close()
    assert _Handler.seen[0][2] == f"Bearer {SECRET}"


def test_http_errors_carry_status_and_text(url: str) -> None:
    http = _Http(url, timeout_s=5, token=SECRET)
    with pytest.raises(ServerError, match=re.escape(f"rollout server POST {url}/broken failed: HTTP 500: engine died")) as err:
        http.post("/broken")
    assert err.value.status == 500
    with pytest.raises(ServerError, match=f"HTTP 401: Unauthorized \\(set {TOKEN_ENV} or ") as err:
        http.get("/locked")
    assert err.value.status == 401
    with pytest.raises(ServerError, match="HTTP 307") as err:  # not followed
        http.get("/moved")
    assert [p for _, p, _, _ in _Handler.seen] == ["/broken", "/locked", "/moved"]
    http.close()


def test_one_client_serves_many_threads(url: str) -> None:
    http = _Http(url, timeout_s=10, token=SECRET)
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda i: http.post(f"/echo/{i}", {"i": i}), range(64)))
    http.close()
    assert [a["body"]["i"] for a in answers] == list(range(64))
    assert len(_Handler.seen) == 64 and {a for _, _, a, _ in _Handler.seen} == {f"Bearer {SECRET}"}
