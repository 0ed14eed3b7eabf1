"""Session-wide guards for a hermetic suite, checked at the end of every run (conftest.py).

- `PortRecorder` holds the box's production API server port (127.0.0.1:46580, and [::1]:46580)
  for the whole session and records every connection, naming the process that made it. The
  suite points everything at ports of its own; a connection here means a test reached for the
  shared server it must never touch. When something else already holds the port (the real
  box), the recorder says so and records nothing.
- `leftover_processes` finds processes still running with a HOME or working directory under
  the session's temporary directory: every HOME the suite hands out lives there, and the API
  server runs in its own (its executors, whose environ setproctitle overwrites, keep its
  cwd). These are processes the suite started (a SkyPilot API server and its workers, a
  test's child) that outlived it. A process group alone is not evidence: its number may
  belong to someone else's process by the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

from tests.apiserver import PRODUCTION_PORT, proc_stats, process_cmdline, process_cwd, process_home


class PortRecorder:
    """Listens on the production port and records who connects (then hangs up on them)."""

    def __init__(self, port: int = PRODUCTION_PORT) -> None:
        self.port = port
        self.connections: list[str] = []
        self.notes: list[str] = []
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()

    def start(self) -> None:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            try:
                sock.bind((host, self.port))
                sock.listen(64)
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6 and not socket.has_ipv6:
                    continue
                self.notes.append(
                    f"could not hold {_addr(host, self.port)} ({exc.strerror}); "
                    f"{_listener_of(self.port)}: connections to it are not recorded"
                )
                continue
            sock.settimeout(0.2)
            self._socks.append(sock)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    @property
    def holding(self) -> bool:
        return bool(self._socks)

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            who = _connecting_process(peer[1], self.port)
            said = _first_line(conn)
            self.connections.append(
                f"{time.strftime('%H:%M:%S')} from {_addr(peer[0], peer[1])}: {who}; sent {said}"
            )
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        time.sleep(0.3)  # let the accept loops see the flag (they wake every 0.2 s)
        for sock in self._socks:
            sock.close()


def _first_line(conn: socket.socket) -> str:
    """What the client sent first (an HTTP request line names the call), if anything."""
    conn.settimeout(0.5)
    try:
        data = conn.recv(200)
    except OSError:
        return "nothing"
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    return repr(line) if line else "nothing"


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tcp_rows() -> list[list[str]]:
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            rows += [line.split() for line in Path(table).read_text().splitlines()[1:]]
    return rows


def _pids_with_socket(inodes: set[str]) -> list[int]:
    wanted = {f"socket:[{inode}]" for inode in inodes if inode != "0"}
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # gone, or someone else's
            continue
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile (the listing's own fd)
                if os.readlink(fd) in wanted:
                    pids.append(int(fd_dir.parent.name))
                    break
    return pids


def _describe(pid: int) -> str:
    return f"pid {pid} `{process_cmdline(pid)[:160]}` HOME={process_home(pid)}"


def _connecting_process(peer_port: int, port: int) -> str:
    """Best effort: the process owning the client end of this loopback connection."""
    inodes = {
        row[9]
        for row in _tcp_rows()
        if len(row) > 9
        and int(row[1].rsplit(":", 1)[1], 16) == peer_port
        and int(row[2].rsplit(":", 1)[1], 16) == port
    }
    pids = _pids_with_socket(inodes)
    return "; ".join(_describe(pid) for pid in pids) if pids else "process not found"


def _listener_of(port: int) -> str:
    inodes = {
        row[9]
        for row in _tcp_rows()
        if len(row) > 9 and row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port
    }
    pids = _pids_with_socket(inodes)
    if pids:
        return "held by " + "; ".join(_describe(pid) for pid in pids)
    return "held by a process this user cannot see"


def leftover_processes(basetemp: Path, wait_s: float = 10.0) -> list[str]:
    """This session's processes still running after `wait_s` (see the module docstring);
    they are SIGKILLed and described."""
    deadline = time.monotonic() + wait_s
    while True:
        found = _ours(basetemp)
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    described = [_describe(pid) for pid in found]
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return described


def _ours(basetemp: Path) -> list[int]:
    root = str(basetemp)
    me = os.getpid()
    found = []
    for stat in proc_stats():
        if stat.pid == me or stat.state == "Z":
            continue
        places = [p for p in (process_home(stat.pid), process_cwd(stat.pid)) if p is not None]
        if any(p == root or p.startswith(root + os.sep) for p in places):
            found.append(stat.pid)
    return sorted(found)
