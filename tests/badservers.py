"""API servers that misbehave, on free loopback ports, for the outside-failure tests.

Each is a real TCP listener in a thread of this process, so a failure the SDK or deskgpu
meets is the one a real broken server gives: nothing is mocked. `silent` listens and never
accepts (the kernel completes the handshake, nobody answers); `trickle` sends an answer one
byte at a time and never finishes; `junk` answers HTTP 200 with a body that is not
SkyPilot's; `error_500` answers every request with FastAPI's error shape; `healthy_then_hang`
answers `/api/health` like SkyPilot 0.14 and then never answers anything else (a server
whose request workers are stuck).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

Handler = Callable[[socket.socket, bytes, threading.Event], None]


@dataclass
class BadServer:
    url: str
    heads: list[bytes] = field(default_factory=list)  # each request's first bytes, in order


@contextlib.contextmanager
def serving(handler: Handler | None) -> Iterator[BadServer]:
    """Listen on a free loopback port; `handler(conn, request_head, stop)` per connection
    (None: never accept). Yields the server; stops every connection when the block ends."""
    stop = threading.Event()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    server = BadServer(f"http://127.0.0.1:{listener.getsockname()[1]}")
    conns: list[socket.socket] = []

    def serve_one(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(5)
            head = _read_head(conn)
            server.heads.append(head)
            assert handler is not None
            handler(conn, head, stop)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True) if handler else None
    if thread is not None:
        thread.start()
    try:
        yield server
    finally:
        stop.set()
        if thread is not None:
            thread.join(5)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
        listener.close()


def _read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _answer(
    conn: socket.socket, status: str, body: bytes, kind: str, extra: dict[str, str] | None = None
) -> None:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
    conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)


def trickle(conn: socket.socket, _head: bytes, stop: threading.Event) -> None:
    """A status line and headers promising a body, then one byte every 0.3 s, forever."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    conn.sendall(b"Content-Length: 1000000\r\n\r\n")
    while not stop.wait(0.3):
        conn.sendall(b" ")


def not_http(conn: socket.socket, _head: bytes, _stop: threading.Event) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")


def junk(conn: socket.socket, _head: bytes, _stop: threading.Event) -> None:
    _answer(conn, "200 OK", b"<html><body>It works!</body></html>", "text/html")


def error_500(conn: socket.socket, _head: bytes, _stop: threading.Event) -> None:
    body = json.dumps({"detail": "database is locked"}).encode()
    _answer(conn, "500 Internal Server Error", body, "application/json")


def healthy_then_hang(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    if head.startswith(b"GET /api/health"):
        health = skypilot_health()
        versions = {  # the SDK checks compatibility from these headers
            "X-SkyPilot-API-Version": str(health["api_version"]),
            "X-SkyPilot-Version": str(health["version"]),
            "X-SkyPilot-Commit": str(health["commit"]),
        }
        _answer(conn, "200 OK", json.dumps(health).encode(), "application/json", versions)
        return
    while not stop.wait(0.5):  # hold the connection, say nothing
        pass


def skypilot_health() -> dict[str, object]:
    """What a healthy SkyPilot server of the installed version answers on /api/health."""
    import sky
    from sky.server import constants

    return {
        "status": "healthy",
        "api_version": str(constants.API_VERSION),
        "version": sky.__version__,
        "version_on_disk": sky.__version__,
        "commit": sky.__commit__,
        "basic_auth_enabled": False,
        "user": None,
    }


def elapsed(start: float) -> float:
    return time.monotonic() - start
