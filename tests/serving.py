"""Test helpers for the HTTP server: a real uvicorn server on a free loopback port in a background thread, and a
small HTTP client over urllib (real sockets, real HTTP; no test client shortcuts)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass
class Response:
    status: int
    body: Any  # the JSON, or the text when it is not JSON
    headers: dict[str, str]


class Client:
    """JSON over HTTP to one server; `auth`: (user, password) for HTTP Basic."""

    def __init__(self, base: str, auth: tuple[str, str] | None = None):
        self.base, self.auth = base, auth

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                timeout: float = 120) -> Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.auth is not None:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                status, text, headers = answer.status, answer.read().decode(), dict(answer.headers)
        except urllib.error.HTTPError as error:
            status, text, headers = error.code, error.read().decode(), dict(error.headers)
        try:
            return Response(status, json.loads(text), headers)
        except json.JSONDecodeError:
            return Response(status, text, headers)

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Response:
        return self.request("POST", path, {} if body is None else body, **kwargs)


@contextlib.contextmanager
def running_server(config: Any, auth: tuple[str, str] | None = None) -> Iterator[Client]:
    """An sdtorch server for `config` (a ServerConfig) listening on 127.0.0.1 at a free port; stopped on exit."""
    import uvicorn

    from sdtorch.server.app import create_app

    app = create_app(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield Client(f"http://127.0.0.1:{sock.getsockname()[1]}", auth)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_image(text: str) -> Image.Image:
    """A response's base64 PNG, opened (its text chunks in .info)."""
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image
