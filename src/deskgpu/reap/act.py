"""The only place reap changes anything: notices, `sky down`, and killing unmanaged PIDs.

Who may act: root or a member of the `admin_group` on any session; anyone else only on
sessions they own. A non-root user chooses their config (`--config`, `DESKGPU_CONFIG`), so
`admin_group` counts only when it comes from the root-owned system config: otherwise a user
could name their own group, and tiny thresholds, and reap everyone. Unmanaged processes:
root only, and only on request.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deskgpu import hostio
from deskgpu.config import HostConfig
from deskgpu.errors import OutsideError
from deskgpu.identity import Actor
from deskgpu.reap.idle import when
from deskgpu.reap.rule import Decision
from deskgpu.units import format_duration

PROC = Path("/proc")


@dataclass(frozen=True)
class Outcome:
    """What happened to one decision under `--yes`."""

    subject: str
    did: str  # warned, torn-down, killed, skipped, failed
    ok: bool
    message: str

    def to_dict(self) -> dict[str, object]:
        return {"subject": self.subject, "did": self.did, "ok": self.ok, "message": self.message}


def notice_text(decision: Decision, host: str, checkpoint_root: str) -> str:
    after = f"after {when(decision.reap_after)}" if decision.reap_after else "soon"
    return (
        f"Your session {decision.subject} on {host} looks abandoned: {decision.summary}. "
        f"deskgpu reap will tear it down (sky down) {after} unless it is used again (a job, "
        f"an SSH/IDE session, GPU work) or relaunched with `keep: true`. Files you wrote to "
        f"{checkpoint_root}/{decision.owner}/ (your $DESKGPU_CHECKPOINT_DIR) survive teardown "
        "by design; everything else inside the container is lost."
    )


def notify(argv: tuple[str, ...], fields: dict[str, str], timeout_s: float) -> str | None:
    """Run the notify hook: each argument gets `{cluster}`, `{owner}`, ... substituted.

    An argument list, never a shell: a cluster name cannot inject a command. The fields
    are also in the environment as DESKGPU_NOTICE_<FIELD>. Returns an error line or None.
    """
    if not argv:
        return None
    args = []
    for arg in argv:
        for key, value in fields.items():
            arg = arg.replace("{" + key + "}", value)
        args.append(arg)
    env = dict(os.environ)
    env.update({f"DESKGPU_NOTICE_{k.upper()}": v for k, v in fields.items()})
    done = hostio.run(args, timeout_s, env=env)
    if done.returncode is None:  # missing, could not start, or killed (with its children)
        return f"notify hook failed: {done.why()}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return f"notify hook {argv[0]} exited {done.returncode}: {tail[0][:200]}"
    return None


def teardown(
    decision: Decision,
    config: HostConfig,
    down: Callable[[str, HostConfig], None] | None = None,
) -> Outcome:
    """`sky down` one session; a failure is this session's outcome, not the run's end."""
    if down is None:
        from deskgpu.skypilot import sdk as skyapi

        down = skyapi.down_cluster
    started = time.monotonic()
    try:
        down(decision.subject, config)
    except OutsideError as exc:
        return Outcome(decision.subject, "failed", False, str(exc))
    took = format_duration(time.monotonic() - started)
    return Outcome(decision.subject, "torn-down", True, f"sky down finished in {took}")


def kill_unmanaged(
    decision: Decision,
    actor: Actor,
    timeout_s: float,
    proc_root: Path = PROC,
    send: Callable[[int, int], None] | None = None,
) -> Outcome:
    """SIGTERM, then SIGKILL after `timeout_s`; root only; only ever the very process seen.

    A PID is a name that the kernel reuses: before each signal the process must still have
    the command line, owner and start time (/proc/<pid>/stat field 22) it had when seen.
    Where the kernel has pidfds (Linux 5.3+), the signals go through one, so they cannot
    reach a process that took the PID over in between. `send` replaces `os.kill` in tests.
    """
    pid = decision.pid
    subject = decision.subject
    if pid is None:
        return Outcome(subject, "skipped", True, "no PID")
    if decision.node is not None:  # our /proc is not that node's: never signal a namesake
        return Outcome(
            subject,
            "skipped",
            False,
            f"it runs on {decision.node}, seen through Prometheus: kill it there, where its "
            "identity can be checked (`DESKGPU_TELEMETRY=nvml deskgpu reap --kill-unmanaged "
            "--yes` on that node)",
        )
    if not actor.is_root:
        return Outcome(subject, "skipped", False, "killing unmanaged processes needs root")
    if pid <= 1:
        return Outcome(subject, "skipped", False, f"PID {pid} is never killed")
    if not decision.command or decision.command == "?":
        return Outcome(
            subject, "skipped", False, "command line unknown: cannot tell it is the same process"
        )
    seen = identity(proc_root, pid)
    if seen is None:
        return Outcome(subject, "skipped", True, "already exited")
    command, uid, started = seen
    if command[:200] != decision.command[:200]:  # snapshots cut at 200
        return Outcome(
            subject, "skipped", False, f"PID {pid} is now a different process ({command[:60]})"
        )
    if (decision.proc_uid is not None and uid != decision.proc_uid) or (
        decision.proc_start_time is not None and started != decision.proc_start_time
    ):
        return Outcome(
            subject,
            "skipped",
            False,
            f"PID {pid} is now a different process (owner or start time changed)",
        )
    pidfd: int | None = None
    if send is None and hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return Outcome(subject, "skipped", True, "already exited")
        except OSError:
            pidfd = None  # e.g. a kernel without pidfds: fall back to checked kill()
    try:
        if not _signal(proc_root, pid, seen, signal.SIGTERM, pidfd, send):
            return Outcome(subject, "skipped", True, "already exited")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if identity(proc_root, pid) != seen:
                return Outcome(subject, "killed", True, "exited after SIGTERM")
            time.sleep(0.1)
        if not _signal(proc_root, pid, seen, signal.SIGKILL, pidfd, send):
            return Outcome(subject, "killed", True, "exited after SIGTERM")
    except ProcessLookupError:
        return Outcome(subject, "killed", True, "exited after SIGTERM")
    except PermissionError as exc:
        return Outcome(subject, "failed", False, f"cannot signal PID {pid}: {exc.strerror}")
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return Outcome(subject, "killed", True, f"SIGKILL after {timeout_s:g} s")


def _signal(
    proc_root: Path,
    pid: int,
    seen: tuple[str, int, int],
    sig: int,
    pidfd: int | None,
    send: Callable[[int, int], None] | None,
) -> bool:
    """Send `sig` if `pid` is still the process `seen`; False when it is not (it exited)."""
    if identity(proc_root, pid) != seen:
        return False
    if pidfd is not None:
        signal.pidfd_send_signal(pidfd, sig)
    else:
        (send or os.kill)(pid, sig)
    return True


def identity(proc_root: Path, pid: int) -> tuple[str, int, int] | None:
    """(command line, owner uid, start time in clock ticks); None when gone or a zombie."""
    base = proc_root / str(pid)
    try:
        uid = base.stat().st_uid
        raw = (base / "cmdline").read_bytes()
        stat = (base / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # fields[0] is field 3 (state)
    try:
        started = int(fields[19])  # field 22: starttime
    except (IndexError, ValueError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    text = " ".join(part for part in raw.decode(errors="replace").split("\0") if part)
    return (text, uid, started) if text else None
