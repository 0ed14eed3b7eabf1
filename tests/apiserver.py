"""A real SkyPilot API server for tests: private HOME, a free loopback port, its own process
group, and torn down on every path out.

`running_api_server(home)` starts `python -m sky.server.server --host 127.0.0.1 --port PORT`
(what `sky api start` runs, minus its shared `~/.sky` and default port), waits for
`/api/health`, yields the URL and kills the whole process group when the block ends, however
it ends: a start that times out, a failed assertion, Ctrl-C, the end of the session. The box's
production port (46580) is refused outright, and the server never sees the caller's HOME,
SkyPilot settings, kube config or cloud credentials: only the variables in `_PASSED_ENV`, the
ones below, and `extra_env`.

`sky api start` is not used on purpose: it returns before we hold the server's PID, so a slow
start (or a failed `sky api stop`) used to leave a server running after pytest exited.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

PRODUCTION_PORT = 46580  # the box's shared API server (skyapi.DEFAULT_ENDPOINT): never ours
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
# SIGTERM first so the server can stop its workers; it takes ~7 s on an idle 2-core machine,
# and a test server's state is thrown away anyway, so whatever is left after 5 s is SIGKILLed.
_STOP_GRACE_S = 5.0
_KILL_WAIT_S = 10.0

# Process groups started here and not yet stopped: an atexit hook kills what a `finally`
# could not reach.
_running: dict[int, Path] = {}


class ApiServerError(RuntimeError):
    """The server did not come up (or would not die); the message carries its log's tail."""


def free_port() -> int:
    """A loopback port nothing listens on right now (never the production port), whose
    request-queue port is free too: a server on port P also binds the queue manager port
    SkyPilot derives from P, and refuses to start when that one is taken."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != PRODUCTION_PORT and _bindable(queue_manager_port(port)):
            return port


def queue_manager_port(port: int) -> int:
    """sky/server/requests/queues/mp_queue.py `get_queue_manager_port` for a server on `port`
    (50011 for 46580, moved in lockstep and kept within [50000, 60000))."""
    default_queue, default_server = 50011, PRODUCTION_PORT
    return 50000 + (default_queue - 50000 + port - default_server) % 10000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def server_env(
    home: Path, port: int, extra_env: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    """The server's whole environment. `extra_env` adds variables; a None value removes one."""
    url = f"http://127.0.0.1:{port}"
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env.update(
        {
            "HOME": str(home),
            "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
            # What `sky api start` sets for the server it spawns (sky/server/common.py).
            "IS_SKYPILOT_SERVER": "true",
            "WEBSOCKETS_MAX_LINE_LENGTH": "65536",
            "WEBSOCKETS_MAX_NUM_HEADERS": "256",
            # Anything in the server that calls "the local API server" (the jobs controller in
            # consolidation mode, for one) must reach this one, not the default 46580.
            "SKYPILOT_API_SERVER_LOCAL_PORT": str(port),
            "SKYPILOT_API_SERVER_ENDPOINT": url,
            "PYTHONUNBUFFERED": "1",
        }
    )
    for key, value in (extra_env or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def write_sky_files(home: Path, files: Mapping[str, str]) -> None:
    """Write `files` (path relative to HOME/.sky -> text) into the private SkyPilot dir."""
    sky_dir = home / ".sky"
    for rel, text in files.items():
        path = Path(rel)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{rel!r}: a path inside HOME/.sky, without `..`")
        target = sky_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


@contextlib.contextmanager
def running_api_server(
    home: Path,
    *,
    config_yaml: str | None = None,
    files: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str | None] | None = None,
    deploy: bool = False,
    port: int | None = None,
    start_timeout: float = 240,
    warm_up: bool = False,
    python: str = sys.executable,
) -> Iterator[str]:
    """Run a SkyPilot API server with `home` as its HOME; yield its URL (`http://127.0.0.1:P`).

    config_yaml: written to HOME/.sky/config.yaml (the server's SkyPilot config).
    files: more files for HOME/.sky, relative path -> text (e.g. {"plugins.yaml": ...});
        written after config_yaml, so "config.yaml" here wins.
    extra_env: variables for the server on top of `server_env`'s; None removes one.
    deploy: pass `--deploy` (as the box's rendered unit does; consolidation mode).
    port: default a free one; the production port 46580 is refused.
    start_timeout: seconds for /api/health to answer (and for the warm-up); a cold start on
        a 2-core machine takes 10-30 s, so the default leaves room for a loaded one.
    warm_up: before yielding, run one `sky.status` request to completion. The server says
        healthy before its request workers have started (each imports SkyPilot: 15-45 s of
        CPU on 2 cores), and the first request would otherwise pay for them.

    The server runs in its own session (process group) and, on Linux, gets SIGTERM if the
    thread that started it dies. Its output goes to HOME/api-server.log.
    """
    port = free_port() if port is None else port
    if port == PRODUCTION_PORT:
        raise ValueError(f"port {PRODUCTION_PORT} is the box's production API server: pick another")
    home.mkdir(parents=True, exist_ok=True)
    write_sky_files(home, {"config.yaml": config_yaml} if config_yaml is not None else {})
    write_sky_files(home, files or {})
    url = f"http://127.0.0.1:{port}"
    args = [python, "-m", "sky.server.server", "--host", "127.0.0.1", "--port", str(port)]
    if deploy:
        args.append("--deploy")
    log_path = home / "api-server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args,
            cwd=home,
            env=server_env(home, port, extra_env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # only a prctl call: safe between fork and exec
        )
    _running[proc.pid] = home  # start_new_session: its PGID is its PID
    try:
        deadline = time.monotonic() + start_timeout
        _wait_healthy(proc, url, log_path, start_timeout)
        if warm_up:
            _warm_up(url, log_path, max(1.0, deadline - time.monotonic()))
        yield url
    finally:
        stop_group(proc.pid, home, proc)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent thread dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ApiServerError(
                f"the API server exited with {proc.returncode} before it was healthy:\n"
                + _tail(log)
            )
        if _healthy(url):
            return
        if time.monotonic() > deadline:
            raise ApiServerError(
                f"the API server at {url} was not healthy within {timeout:.0f} s:\n" + _tail(log)
            )
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=5) as response:
            body = json.loads(response.read() or b"{}")
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return isinstance(body, dict) and body.get("status") == "healthy"


def _warm_up(url: str, log: Path, timeout: float) -> None:
    """POST /status, then wait on /api/get: the plain-HTTP form of `sky.get(sky.status())`."""
    post = urllib.request.Request(
        f"{url}/status", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(post, timeout=30) as response:
            request_id = response.headers.get("X-Skypilot-Request-ID")
        with urllib.request.urlopen(f"{url}/api/get?request_id={request_id}", timeout=timeout):
            pass
    except (OSError, urllib.error.URLError) as exc:
        message = f"the API server at {url} failed its warm-up ({exc}):\n" + _tail(log)
        raise ApiServerError(message) from exc


class BackgroundApiServer:
    """`running_api_server` (warmed up) in a thread of its own, so a cold start overlaps with
    whatever runs meanwhile; `url()` waits for it, `stop()` ends it (also mid-start).

    The thread lives until `stop()`: the server's PR_SET_PDEATHSIG is tied to it.
    """

    def __init__(self, home: Path, **options: Any) -> None:
        self.home = home
        self._options = {"warm_up": True, **options}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._url: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sky-api-server", daemon=True)

    def start(self) -> BackgroundApiServer:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with running_api_server(self.home, **self._options) as url:
                self._url = url
                self._ready.set()
                self._stop.wait()
        except BaseException as exc:  # handed to whoever waits in url()
            self._error = exc
        finally:
            self._ready.set()

    def url(self) -> str:
        self._ready.wait()
        if self._error is not None:
            raise ApiServerError(f"the session's API server did not start: {self._error}")
        assert self._url is not None
        return self._url

    def stop(self) -> None:
        self._stop.set()
        if not self._ready.is_set():  # still starting: kill it so the start fails at once
            for pgid, home in list(_running.items()):
                if home == self.home:
                    with contextlib.suppress(ApiServerError):
                        stop_group(pgid, home)
        self._thread.join()


def _tail(log: Path, lines: int = 40) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def stop_group(pgid: int, home: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after a grace period, and
    anything else still running with this HOME (a child that left the group)."""
    try:
        _signal_all(pgid, home, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        while _members(pgid, home) and time.monotonic() < deadline:
            _reap(proc)
            time.sleep(0.2)
    finally:  # a second Ctrl-C while waiting still kills everything
        _signal_all(pgid, home, signal.SIGKILL)
        deadline = time.monotonic() + _KILL_WAIT_S
        while _members(pgid, home) and time.monotonic() < deadline:
            _reap(proc)
            time.sleep(0.1)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        left = _members(pgid, home)
        _running.pop(pgid, None)
        if left:
            raise ApiServerError(f"API server processes survived SIGKILL: {sorted(left)}")


def _reap(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.poll()  # a dead leader stays a zombie (and in the group) until waited for


def _signal_all(pgid: int, home: Path, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for pid in _members(pgid, home):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _members(pgid: int, home: Path) -> set[int]:
    """Live processes in the group, or anywhere with the server's home as HOME or working
    directory (SkyPilot's executors rewrite their argv and environ with setproctitle, so
    /proc shows no HOME for them; they keep the server's cwd)."""
    found = {
        stat.pid
        for stat in proc_stats()
        if stat.state != "Z"
        and (stat.pgrp == pgid or str(home) in (process_home(stat.pid), process_cwd(stat.pid)))
    }
    found.discard(os.getpid())
    return found


class ProcStat(NamedTuple):
    pid: int
    state: str
    ppid: int
    pgrp: int


def proc_stats() -> Iterator[ProcStat]:
    """Every process's /proc/PID/stat head (those that vanish while being read are skipped)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = raw[raw.rindex(")") + 2 :].split()
        yield ProcStat(int(entry.name), fields[0], int(fields[1]), int(fields[2]))


def process_home(pid: int) -> str | None:
    """HOME in a process's environment (None if unreadable: gone, or someone else's)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(b"HOME="):
            return item[5:].decode(errors="replace")
    return None


def process_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


@atexit.register
def _kill_leftovers() -> None:
    for pgid, home in list(_running.items()):
        with contextlib.suppress(ApiServerError):
            stop_group(pgid, home)
