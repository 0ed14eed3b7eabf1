"""The only place reap changes anything: notices, `sky down`, and killing unmanaged PIDs.

Who may act: root or a member of the host config's `admin_group` on any session; anyone
else only on sessions they own. Unmanaged processes: root only, and only on request.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deskgpu.config import HostConfig
from deskgpu.errors import OutsideError
from deskgpu.identity import safe_user
from deskgpu.reap.rule import Decision, when
from deskgpu.units import format_duration

PROC = Path("/proc")


@dataclass(frozen=True)
class Actor:
    """Who runs reap."""

    user: str
    uid: int
    groups: frozenset[str]

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def current_actor() -> Actor:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid{uid}"
    names = set()
    for gid in {*os.getgroups(), os.getgid()}:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return Actor(user, uid, frozenset(names))


def may_act_on(actor: Actor, owner: str, admin_group: str | None) -> bool:
    if actor.is_root or (admin_group is not None and admin_group in actor.groups):
        return True
    return owner in (actor.user, safe_user(actor.user))


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
    try:
        done = subprocess.run(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"notify hook {argv[0]} failed: {exc}"
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
        from deskgpu import skyapi

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
    send: Callable[[int, int], None] = os.kill,
) -> Outcome:
    """SIGTERM, then SIGKILL after `timeout_s`; root only; checks the PID is the same process."""
    pid = decision.pid
    subject = decision.subject
    if pid is None:
        return Outcome(subject, "skipped", True, "no PID")
    if not actor.is_root:
        return Outcome(subject, "skipped", False, "killing unmanaged processes needs root")
    now_cmd = _cmdline(proc_root, pid)
    if now_cmd is None:
        return Outcome(subject, "skipped", True, "already exited")
    if decision.command and now_cmd[:200] != decision.command[:200]:  # snapshots cut at 200
        return Outcome(
            subject, "skipped", False, f"PID {pid} is now a different process ({now_cmd[:60]})"
        )
    try:
        send(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if _cmdline(proc_root, pid) is None:
                return Outcome(subject, "killed", True, "exited after SIGTERM")
            time.sleep(0.1)
        send(pid, signal.SIGKILL)
    except ProcessLookupError:
        return Outcome(subject, "killed", True, "exited after SIGTERM")
    except PermissionError as exc:
        return Outcome(subject, "failed", False, f"cannot signal PID {pid}: {exc.strerror}")
    return Outcome(subject, "killed", True, f"SIGKILL after {timeout_s:g} s")


def _cmdline(proc_root: Path, pid: int) -> str | None:
    """The process's command line; None when gone (or a zombie with an empty cmdline)."""
    try:
        raw = (proc_root / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    text = " ".join(part for part in raw.decode(errors="replace").split("\0") if part)
    return text or None
