"""The shared SkyPilot API server over plain HTTP: no `import sky` (seconds), hard deadlines.

- `request`: one HTTP exchange bounded as a whole. A socket timeout alone restarts with
  every byte, so a server that trickles its answer would hold us forever; here a timer
  shuts the socket at the deadline, whatever it is doing.
- `probe`: `GET /api/health` before a command imports the SDK. A refused, unroutable or
  silent endpoint, an answer that is not SkyPilot's, or an HTTP error becomes one
  `OutsideError` line in at most the user's budget (a refused port: milliseconds), where
  the SDK would retry for many seconds first.
- `call`: a read-only API request and its result (`POST /<route>`, then `GET /api/get`), the
  plain-HTTP form of `sky.get(sky.<route>(...))`; `deskgpu queue` reads SkyPilot this way.

doctor's probes use `request` too (`doctor.probes.http_get`): one HTTP client.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deskgpu.deadline import Deadline
from deskgpu.errors import OutsideError

# A loopback (or LAN) server accepts in microseconds; an unroutable address never does.
CONNECT_TIMEOUT_S = 0.5
# The most a health probe may take of a longer budget: /api/health is answered by the
# server's event loop itself, so a server that cannot answer it in this long is hung.
PROBE_TIMEOUT_S = 10.0
MAX_TEXT = 64 * 1024  # what an error line is looked for in
MAX_BODY = 64 * 1024 * 1024  # a queue of thousands of jobs is a few MiB
_FIX_UNREACHABLE = (
    "ask the box's admin to start it (`systemctl start skypilot-api`), or set api_server in "
    "the host config"
)


def unreachable_message(endpoint: str, why: str | None = None) -> str:
    """The one line for "nothing answers at the endpoint" (the SDK's own errors say it too)."""
    detail = f" ({why})" if why else ""
    return f"SkyPilot API server at {endpoint} is unreachable{detail}: {_FIX_UNREACHABLE}"


def silent_message(endpoint: str, seconds: float, started: bool = False) -> str:
    what = "did not finish answering" if started else "did not answer"
    return (
        f"SkyPilot API server at {endpoint} {what} within {seconds:g} s: it accepts "
        "connections but is hung or overloaded (`systemctl status skypilot-api` on the box)"
    )


@dataclass
class Reply:
    """One HTTP exchange: the answer, or why there is none. Never raised; failure is data."""

    url: str
    status: int | None = None
    reason: str = ""  # the status line's phrase ("Not Found")
    headers: dict[str, str] = field(default_factory=dict)  # names lowercased
    body: bytes = b""
    error: str | None = None  # connection refused, no answer within N s, not HTTP, ...
    unreachable: bool = False  # the connection itself failed: nothing is listening there
    timed_out: bool = False  # connected, but no complete answer before the deadline
    answered: bool = False  # some bytes of an answer arrived (a trickle, when timed out)
    elapsed_s: float = 0.0

    def text(self, limit: int | None = None) -> str:
        data = self.body if limit is None else self.body[:limit]
        return data.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; `ValueError` when it is not."""
        return json.loads(self.body)


def request(
    method: str,
    url: str,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 3.0,
    deadline: Deadline | None = None,
    max_bytes: int = MAX_BODY,
) -> Reply:
    """One HTTP exchange, finished (or abandoned) within `timeout_s` and `deadline`.

    `body` is sent as JSON. The connection gets `CONNECT_TIMEOUT_S` of that.
    """
    start = time.monotonic()
    end = start + timeout_s if deadline is None else min(start + timeout_s, deadline.at)
    reply = Reply(url=url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        reply.error, reply.unreachable = "not an http(s) URL", True
        return reply
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        reply.error, reply.unreachable = "bad port in the URL", True
        return reply
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sent_headers = {"Accept": "application/json", **(headers or {})}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent_headers["Content-Type"] = "application/json"
    conn: http.client.HTTPConnection
    connect_s = max(0.001, min(CONNECT_TIMEOUT_S, end - time.monotonic()))
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname, port, timeout=connect_s, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=connect_s)
    try:
        try:
            conn.connect()
        except TimeoutError:
            reply.error, reply.unreachable = f"no connection within {connect_s:g} s", True
            return reply
        except ssl.SSLError as exc:
            reply.error = f"TLS failed: {exc.reason or exc}"
            return reply
        except OSError as exc:
            reply.error, reply.unreachable = _os_reason(exc), True
            return reply
        _exchange(conn, method, target, data, sent_headers, end - start, end, max_bytes, reply)
    finally:
        conn.close()
        reply.elapsed_s = round(time.monotonic() - start, 3)
    return reply


def _exchange(
    conn: http.client.HTTPConnection,
    method: str,
    target: str,
    data: bytes | None,
    headers: dict[str, str],
    budget: float,
    end: float,
    max_bytes: int,
    reply: Reply,
) -> None:
    sock = conn.sock
    cut = threading.Event()

    def cut_off() -> None:
        cut.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv, whatever it waits for

    timer = threading.Timer(max(0.0, end - time.monotonic()), cut_off)
    timer.daemon = True
    timer.start()
    try:
        sock.settimeout(max(0.001, end - time.monotonic()))
        conn.request(method, target, body=data, headers=headers)
        response = conn.getresponse()
        reply.answered = True
        reply.status = response.status
        reply.reason = response.reason
        reply.headers = {k.lower(): v for k, v in response.getheaders()}
        reply.body = response.read(max_bytes)
    except (TimeoutError, http.client.HTTPException, OSError) as exc:
        if cut.is_set() or isinstance(exc, TimeoutError) or time.monotonic() >= end:
            reply.timed_out = True
            what = "the answer did not finish" if reply.answered else "no answer"
            reply.error = f"{what} within {budget:.3g} s"
        elif isinstance(exc, http.client.HTTPException):
            said = " ".join(str(exc).split())  # it may carry the peer's \r\n
            reply.error = f"not an HTTP answer ({type(exc).__name__}: {said})"[:200]
        else:
            reply.error = _os_reason(exc)
    finally:
        timer.cancel()
    if not reply.timed_out and cut.is_set():  # the last bytes raced the timer
        reply.timed_out, reply.error = True, f"the answer did not finish within {budget:.3g} s"


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def health_problem(reply: Reply, endpoint: str, budget_s: float) -> str | None:
    """What is wrong with a `GET /api/health` exchange, as one line; None: a healthy server."""
    if reply.unreachable:
        return unreachable_message(endpoint, reply.error)
    if reply.timed_out:
        return silent_message(endpoint, budget_s, started=reply.answered)
    if reply.status is None:  # connected, then no HTTP came back
        return not_skypilot(endpoint, reply.error or "no answer")
    if reply.status >= 500:
        return server_error(endpoint, reply)
    if reply.status == 401:
        return f"SkyPilot API server at {endpoint} refused our login (HTTP 401)"
    if reply.status == 403:
        return f"SkyPilot API server at {endpoint} refused: {_detail(reply)}"
    try:
        health = reply.json()
    except ValueError:
        health = None
    if reply.status != 200 or not isinstance(health, dict) or "status" not in health:
        what = f"HTTP {reply.status}" + (", not JSON" if health is None else "")
        return not_skypilot(endpoint, f"GET /api/health answered {what}: {_snippet(reply)}")
    if str(health.get("status")).lower() != "healthy":
        return f"SkyPilot API server at {endpoint} says it is {health.get('status')}"
    return None


def not_skypilot(endpoint: str, what: str) -> str:
    return (
        f"{endpoint} is not a SkyPilot API server ({what}): check api_server in the host "
        "config and SKYPILOT_API_SERVER_ENDPOINT"
    )


def server_error(endpoint: str, reply: Reply) -> str:
    return f"SkyPilot API server at {endpoint}: API server error {reply.status}: {_detail(reply)}"


def detail(reply: Reply) -> str:
    """What an HTTP error answer says, as one line (FastAPI's `detail`, else its first line)."""
    return _detail(reply)


def _detail(reply: Reply) -> str:
    """FastAPI's `{"detail": ...}` when there is one, a traceback's last line (the error),
    else the body's first line."""
    with contextlib.suppress(ValueError):
        data = reply.json()
        if isinstance(data, dict) and data.get("detail"):
            return _one_line(str(data["detail"]))
    text = reply.text(MAX_TEXT)
    if "Traceback" in text:
        lines = [ln.strip(" |+") for ln in text.splitlines() if ln.strip(" |+")]
        return _one_line(lines[-1]) if lines else "(empty answer)"
    return _snippet(reply) or "(empty answer)"


def _snippet(reply: Reply) -> str:
    return _one_line(reply.text(400))


def _one_line(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:160] + ("…" if len(line) > 160 else "")


def probe(endpoint: str, deadline: Deadline) -> None:
    """Raise `OutsideError` (one line) unless a healthy SkyPilot API server answers in time."""
    reply = request(
        "GET", endpoint.rstrip("/") + "/api/health", timeout_s=min(deadline.left(), PROBE_TIMEOUT_S)
    )
    problem = health_problem(reply, endpoint, min(deadline.budget_s, PROBE_TIMEOUT_S))
    if problem is not None:
        raise OutsideError(problem)


class RequestFailed(Exception):
    """The server ran the request and it failed: SkyPilot's exception type and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.message = message


def call(endpoint: str, route: str, body: dict[str, Any], deadline: Deadline) -> Any:
    """`POST /<route>` then `GET /api/get` for its result; the decoded return value.

    Raises `OutsideError` for a failed exchange and `RequestFailed` for a request the server
    ran and that failed (its SkyPilot exception, e.g. `ClusterNotUpError`).
    """
    base = endpoint.rstrip("/")
    payload = {**request_env(), **body}
    posted = request("POST", f"{base}/{route}", body=payload, timeout_s=deadline.left())
    _check(posted, endpoint, deadline)
    request_id = posted.headers.get("x-skypilot-request-id")
    if not request_id:
        raise OutsideError(not_skypilot(endpoint, f"POST /{route} named no request id"))
    query = urllib.parse.urlencode({"request_id": request_id})
    got = request("GET", f"{base}/api/get?{query}", timeout_s=deadline.left())
    result = _failed_request(got)  # a request that failed comes back as HTTP 500
    if result is None:
        _check(got, endpoint, deadline)
    try:
        result = result or got.json()
        status = str(result["status"]).upper()
        if status == "SUCCEEDED":
            value = result.get("return_value")
            return json.loads(value) if isinstance(value, str) else value
        error = result.get("error")
        error = json.loads(error) if isinstance(error, str) else error
    except (ValueError, KeyError, TypeError) as exc:
        raise OutsideError(
            not_skypilot(endpoint, f"GET /api/get answered {exc!r}: {_snippet(got)}")
        ) from None
    if isinstance(error, dict):
        raise RequestFailed(str(error.get("type") or status), str(error.get("message") or ""))
    raise RequestFailed(status, f"request {status.lower()}")


def _failed_request(reply: Reply) -> dict[str, Any] | None:
    """`GET /api/get` of a request that failed: HTTP 500 with the request record (its
    status and pickled-and-described error) as FastAPI's `detail`."""
    if reply.status != 500:
        return None
    with contextlib.suppress(ValueError):
        detail = reply.json().get("detail") if isinstance(reply.json(), dict) else None
        if isinstance(detail, dict) and "status" in detail and "error" in detail:
            return detail
    return None


def _check(reply: Reply, endpoint: str, deadline: Deadline) -> None:
    if reply.unreachable:
        raise OutsideError(unreachable_message(endpoint, reply.error))
    if reply.timed_out:
        raise OutsideError(silent_message(endpoint, deadline.budget_s, started=reply.answered))
    if reply.status is None:
        raise OutsideError(not_skypilot(endpoint, reply.error or "no answer"))
    if reply.status >= 500:
        raise OutsideError(server_error(endpoint, reply))
    if reply.status == 401:
        raise OutsideError(f"SkyPilot API server at {endpoint} refused our login: {_detail(reply)}")
    if reply.status == 403:  # the box's guard: who is asking, or a host config it lacks
        raise OutsideError(f"SkyPilot API server at {endpoint} refused: {_detail(reply)}")
    if reply.status != 200:
        raise OutsideError(not_skypilot(endpoint, f"HTTP {reply.status}: {_detail(reply)}"))


def request_env() -> dict[str, Any]:
    """Who is asking, as the SDK tells the server (`env_vars` of every request body).

    The server names a request's user from `SKYPILOT_USER` and `SKYPILOT_USER_ID` and fails
    a request that carries one without the other. The id is the SDK's (its env variable,
    else ~/.sky/user_hash); with none yet (the SDK writes it on first use), nothing is sent
    and the server files these read-only requests under its own account.
    """
    from deskgpu.identity import current_user

    user_hash = os.environ.get("SKYPILOT_USER_ID", "")
    if not _USER_HASH.match(user_hash):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            user_hash = (Path.home() / ".sky" / "user_hash").read_text().strip()
    if not _USER_HASH.match(user_hash):
        return {}
    env = {"SKYPILOT_USER": current_user()}
    env["SKYPILOT_USER_ID"] = user_hash
    if os.environ.get("SKYPILOT_DISABLE_USAGE_COLLECTION"):
        env["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
    return {"env_vars": env}


_USER_HASH = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]*$")  # sky.utils.common_utils
