"""Record and replay SkyPilot API server HTTP exchanges on 127.0.0.1.

The SkyPilot SDK runs unmodified against a `ReplayServer`: same HTTP, same parsing, same
exceptions as against the live server. Recordings come from a real `sky api start` server
through `RecordingProxy` (`python -m tests.skyreplay record UPSTREAM OUT.json -- CMD...`);
a success path that cannot happen here (no GPUs, no k3s) is a recording whose final
responses were edited by hand and say so in their `note`.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_KEEP_HEADERS = {
    "content-type",
    "x-skypilot-request-id",
    "x-skypilot-api-version",
    "x-skypilot-version",
    "x-skypilot-commit",
}


def _key(method: str, path: str) -> str:
    return f"{method} {path.split('?', 1)[0]}"


class _ReplayHandler(http.server.BaseHTTPRequestHandler):
    server: ReplayServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        key = _key(self.command, self.path)
        self.server.seen.append(
            {"key": key, "path": self.path, "body": body.decode("utf-8", "replace")}
        )
        queue = self.server.exchanges.get(key)
        if not queue:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"detail": "not in recording"}')
            return
        exchange = queue.pop(0) if len(queue) > 1 else queue[0]
        payload = exchange["body"]
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(exchange["status"])
        for name, value in exchange.get("headers", {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _serve


class ReplayServer(http.server.ThreadingHTTPServer):
    """Serves a recording's responses, in order per (method, path)."""

    def __init__(self, recording: dict[str, Any] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _ReplayHandler)
        self.exchanges: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.seen: list[dict[str, str]] = []
        if recording is not None:
            self.load(recording)

    def load(self, recording: dict[str, Any] | Path) -> ReplayServer:
        """Serve another recording from the same URL (the SDK caches its server URL in-process)."""
        if isinstance(recording, Path):
            recording = json.loads(recording.read_text())
        self.exchanges = defaultdict(list)
        for exchange in recording["exchanges"]:
            self.exchanges[_key(exchange["method"], exchange["path"])].append(exchange)
        self.seen = []
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def replaying(recording_path: Path | None = None) -> Iterator[ReplayServer]:
    server = ReplayServer(json.loads(recording_path.read_text()) if recording_path else None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: RecordingProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        request = urllib.request.Request(
            self.server.upstream + self.path,
            data=body,
            method=self.command,
            headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, headers, data = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            status, headers, data = exc.code, dict(exc.headers), exc.read()
        text = data.decode("utf-8", "replace")
        try:
            recorded: Any = json.loads(text)
        except ValueError:
            recorded = text
        self.server.recorded.append(
            {
                "method": self.command,
                "path": self.path,
                "status": status,
                "headers": {k: v for k, v in headers.items() if k.lower() in _KEEP_HEADERS},
                "body": recorded,
            }
        )
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward


class RecordingProxy(http.server.ThreadingHTTPServer):
    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.rstrip("/")
        self.recorded: list[dict[str, Any]] = []


def record(upstream: str, out: Path, command: list[str]) -> int:
    """Run `command` with SKYPILOT_API_SERVER_ENDPOINT pointing at a recording proxy."""
    import os

    proxy = RecordingProxy(upstream)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "SKYPILOT_API_SERVER_ENDPOINT": f"http://127.0.0.1:{proxy.server_address[1]}",
    }
    code = subprocess.run(command, env=env).returncode
    proxy.shutdown()
    out.write_text(
        json.dumps(
            {"recorded_from": upstream, "command": command, "exchanges": proxy.recorded}, indent=1
        )
        + "\n"
    )
    return code


if __name__ == "__main__":
    # python -m tests.skyreplay record http://127.0.0.1:46999 out.json -- deskgpu submit ...
    if len(sys.argv) < 5 or sys.argv[1] != "record" or sys.argv[4] != "--":
        sys.exit("usage: python -m tests.skyreplay record UPSTREAM OUT.json -- COMMAND...")
    sys.exit(record(sys.argv[2], Path(sys.argv[3]), sys.argv[5:]))
