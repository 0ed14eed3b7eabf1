"""The host, read and run from one place: child processes and account names.

`run` is the only way deskgpu starts a program (doctor's probes, kubectl, reap's notify hook):
the child gets a session of its own, and when it runs past its timeout the whole process group
is killed, so a command that forked (a shell script, a wrapper, kubectl's plugins) leaves no
grandchild behind. It never raises: a missing program, an exec error and a timeout are fields
of the result.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

MAX_TEXT = 64_000  # a command's stdout or stderr kept (a runaway child cannot fill memory)


@dataclass(frozen=True)
class Completed:
    """What a child did: its exit status, or why there is none."""

    argv: list[str]
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    missing: bool = False  # the program is not on PATH
    error: str | None = None  # it could not be started (OSError)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def why(self) -> str:
        """One line saying how it ended, for a message."""
        if self.missing:
            return f"{self.argv[0]} not found"
        if self.error is not None:
            return f"{self.argv[0]} could not start: {self.error}"
        if self.timed_out:
            return f"{self.argv[0]} ran past its timeout ({self.elapsed_s:.0f} s) and was killed"
        return f"{self.argv[0]} exited {self.returncode}"


def run(
    argv: list[str],
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
) -> Completed:
    """Run `argv` (no shell) with `env` (default: ours) for at most `timeout_s`; on a timeout
    its whole process group is killed. `input_text` is its stdin, else it reads nothing."""
    path = (env if env is not None else os.environ).get("PATH")
    if "/" not in argv[0] and shutil.which(argv[0], path=path) is None:
        return Completed(argv=argv, missing=True)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if input_text is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=dict(env) if env is not None else None,
            start_new_session=True,  # its own group: a timeout kills it and its children
        )
    except OSError as exc:
        return Completed(
            argv=argv, error=exc.strerror or str(exc), elapsed_s=time.monotonic() - start
        )
    timed_out = False
    try:
        out, err = proc.communicate(input_text, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc.pid)
        try:  # a grandchild that left the group may hold the pipes: do not wait on it
            out, err = proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = "", ""
            proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt): take the group with us
            kill_group(proc.pid)
            proc.wait()
    return Completed(
        argv=argv,
        returncode=None if timed_out else proc.returncode,
        stdout=(out or "")[:MAX_TEXT],
        stderr=(err or "")[:MAX_TEXT],
        timed_out=timed_out,
        elapsed_s=round(time.monotonic() - start, 3),
    )


def kill_group(pgid: int) -> None:
    """SIGKILL a process group we started; gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def user_name(uid: int) -> str | None:
    """The account name of `uid`, or None when no account has it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None
