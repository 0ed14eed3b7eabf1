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
