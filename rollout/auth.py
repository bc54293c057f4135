"""The rollout server's shared secret: where it comes from, how the client sends it, how the server checks it.

The secret is read from the environment, never from a command line (``ps`` shows those to every user):
``REASONRL_ROLLOUT_TOKEN`` holds it, or ``REASONRL_ROLLOUT_TOKEN_FILE`` names a file that does (surrounding
whitespace stripped). Server and learner read the same variables. The client sends
``Authorization: Bearer <secret>`` on every request; the server compares in constant time
(`hmac.compare_digest`). Without a secret the server may bind only a loopback address (`check_bind`) and then
answers only loopback clients.

Make one with ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "REASONRL_ROLLOUT_TOKEN"
TOKEN_FILE_ENV = "REASONRL_ROLLOUT_TOKEN_FILE"
MIN_TOKEN_CHARS = 16
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class TokenError(ValueError):
    """The configured secret is unusable (both sources set, unreadable file, too short, not header-safe)."""


def load_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The shared secret from `environ` (default ``os.environ``); None when neither variable is set."""
    env = os.environ if environ is None else environ
    value, path = env.get(TOKEN_ENV), env.get(TOKEN_FILE_ENV)
    if value is not None and path is not None:
        raise TokenError(f"both {TOKEN_ENV} and {TOKEN_FILE_ENV} are set: set one of them")
    if path is not None:
        source = f"{TOKEN_FILE_ENV}={path}"
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"{source}: cannot read the rollout server secret: {err}") from None
    elif value is None:
        return None
    else:
        source = TOKEN_ENV
    if len(value) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"the rollout server secret from {source} has {len(value)} characters; use at least "
            f"{MIN_TOKEN_CHARS}, e.g. from `{MAKE_TOKEN}`"
        )
    if not all(c.isascii() and c.isprintable() and not c.isspace() for c in value):
        raise TokenError(f"the rollout server secret from {source} must be printable ASCII without spaces")
    return value


def bearer(token: str | None) -> dict[str, str]:
    """The request header that carries `token` (none without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def token_matches(authorization: bytes | None, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (scheme case-insensitive; the secret
    compared in constant time)."""
    scheme, _, credentials = (authorization or b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token.encode())


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or ``localhost``) is a loopback address; other names count as not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback `host` without a secret: anyone reaching the port could swap the weights."""
    if token is None and not is_loopback(host):
        raise TokenError(
            f"rollout server: --host {host} is reachable from other machines and no secret is set, so anyone "
            "who can reach the port could generate, pause the server or replace its weights. Set "
            f"{TOKEN_ENV} (or {TOKEN_FILE_ENV}, a file holding it) for the server and the learner, e.g. "
            f"`export {TOKEN_ENV}=$({MAKE_TOKEN})`, or bind 127.0.0.1"
        )
