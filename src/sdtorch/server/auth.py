"""HTTP Basic auth on every path (API, docs and the web page), as A1111's `--api-auth user:pass[,user2:pass2]`."""

from __future__ import annotations

import base64
import binascii
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import InvalidInputError
from .errors import error_response

Credentials = tuple[tuple[str, str], ...]


def parse_api_auth(text: str) -> Credentials:
    """[(user, password)] from "user:pass[,user2:pass2]"; InvalidInputError for an entry without both."""
    pairs = []
    for entry in text.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise InvalidInputError(f"--api-auth {entry.strip()!r}: use USER:PASSWORD (several joined by commas)")
        pairs.append((user, password))
    return tuple(pairs)


def _matches(header: str, credentials: Credentials) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError):
        return False
    found = False
    for known_user, known_password in credentials:  # every pair compared, in constant time each
        found |= secrets.compare_digest(user.encode(), known_user.encode()) & secrets.compare_digest(
            password.encode(), known_password.encode())
    return found


class BasicAuth:
    """ASGI middleware: a request without valid credentials gets 401 and a Basic challenge (browsers then ask)."""

    def __init__(self, app: ASGIApp, credentials: Credentials):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        header = headers.get(b"authorization", b"").decode("latin-1")
        if _matches(header, self.credentials):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "HTTPException", "Incorrect username or password",
                                   headers={"WWW-Authenticate": 'Basic realm="sdtorch"'})
        await response(scope, receive, send)
