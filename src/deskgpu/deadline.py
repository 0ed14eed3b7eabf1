"""The user's time budget for one command, and the watchdog that keeps it.

`--timeout`/`--wait` are deadlines for the whole command, import of SkyPilot and its own
retries included: a `Deadline` starts when the command does, and `bounded` runs a call
that may hang (an SDK request against a server that stopped answering) in a daemon thread
and gives up on it when the budget is spent, with one `OutsideError` line instead of a hang.

A call given up on keeps running in its thread; `abandoned()` says so, and the console
entry point then ends the process without waiting for it (`deskgpu.cli.main`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from deskgpu.errors import OutsideError

T = TypeVar("T")

# What a command may take beyond the user's budget: startup, rendering, a last request.
GRACE_S = 1.5

_abandoned: list[threading.Thread] = []


_process_start: list[float] = []  # time.monotonic() of the console command's process start


def mark_process_start() -> None:
    """Called first thing by the console entry point (`deskgpu.cli.main`)."""
    _process_start[:] = [time.monotonic() - process_age_s()]


def process_age_s(stat_path: str = "/proc/self/stat") -> float:
    """Seconds since this process started (Linux: /proc/self/stat field 22 against the boot
    clock); 0 where that cannot be read."""
    import os
    from pathlib import Path

    try:
        text = Path(stat_path).read_text(encoding="ascii", errors="replace")
        ticks = int(text.rsplit(")", 1)[-1].split()[19])  # field 22, after comm's paren
        started = ticks / os.sysconf("SC_CLK_TCK")
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
    return min(max(0.0, now - started), 3600.0)


class DeadlineExpired(OutsideError):
    """The user's budget ran out while a call was still going (exit 1, one line)."""


@dataclass(frozen=True)
class Deadline:
    """A point in `time.monotonic()` time, and the budget it was made from (for messages)."""

    at: float
    budget_s: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    @classmethod
    def since_start(cls, seconds: float) -> Deadline:
        """A budget for the whole command: counted from when the `deskgpu` process started
        (`mark_process_start`), so the interpreter's start and the imports before the first
        line of the command count too (a loaded 2-core box spends seconds there). Called
        in-process (tests, a library), it counts from now."""
        start = _process_start[0] if _process_start else time.monotonic()
        return cls(start + seconds, seconds)

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def extended(self, seconds: float) -> Deadline:
        """The same budget, `seconds` later (the grace a watchdog allows past it)."""
        return Deadline(self.at + seconds, self.budget_s)


def bounded(call: Callable[[], T], deadline: Deadline, expired: Callable[[], str]) -> T:
    """`call()`, or `DeadlineExpired(expired())` once `deadline` passes; its exceptions pass
    through.

    `expired` builds the message when needed (it may say what the call was doing).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # handed to the waiting thread, raised there
            error.append(exc)

    worker = threading.Thread(target=target, name="deskgpu-bounded", daemon=True)
    worker.start()
    worker.join(deadline.left())
    if worker.is_alive():
        _abandoned.append(worker)
        raise DeadlineExpired(expired())
    if error:
        raise error[0]
    return result[0]


def abandon(thread: threading.Thread) -> None:
    """Note a thread given up on elsewhere (the queue's SkyPilot half)."""
    if thread.is_alive():
        _abandoned.append(thread)


def abandoned() -> bool:
    """True while a call given up on is still running (the process must not wait for it)."""
    return any(t.is_alive() for t in _abandoned)
