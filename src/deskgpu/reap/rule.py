"""The zombie rule: a pure function from evidence to decisions, each with its reasons.

A session is reaped only when every signal agrees (DESIGN.md, "Zombie rule"): it is
interactive, older than `min_age`, has no running or pending job, holds at least
`min_vram_mib`, and the history proves it idle for at least `idle_window` — every
observation in that stretch saw each of its GPUs below `util_threshold_pct`, no SSH/IDE
connection, a quiet CPU, and no gap longer than `max_sample_gap`. Its owner is warned
first; it is torn down once a warning of the current idle stretch is `grace` old.

Batch jobs are never reaped: one running at 0% GPU for `stalled_batch_after` is reported.
Processes holding VRAM outside any pod are reported. Protected sessions are listed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deskgpu.config.reap import ReapSettings
from deskgpu.identity import safe_user
from deskgpu.labels import LABEL_KEEP
from deskgpu.reap.evidence import Evidence, Session, UnmanagedProcess, iso
from deskgpu.reap.idle import IdleRun, InMemorySamples, SessionSamples, when
from deskgpu.units import format_duration, format_mib

# Display servers and compositors: they hold VRAM for the screen, and killing one logs
# everyone at the console out. NVML reports most as "graphics" processes; these names
# catch the ones it reports as compute (or when the type was not recorded).
GRAPHICS_COMMANDS = frozenset(
    {
        "Xorg", "X", "Xwayland", "gnome-shell", "kwin_x11", "kwin_wayland", "plasmashell",
        "sddm-greeter", "gdm-x-session", "mutter", "weston", "sway", "cinnamon", "compiz",
    }
)  # fmt: skip


class Action(str, enum.Enum):
    REAP = "reap"  # tear down now (with --yes)
    WARN = "warn"  # a zombie in its grace period: notify the owner
    REPORT_STALLED = "report-stalled"  # a batch job running at 0% GPU: shown, never torn down
    REPORT_UNMANAGED = "report-unmanaged"  # VRAM held outside any pod: killed only on request
    PROTECTED = "protected"  # `keep` label or the host config's allowlist
    KEEP = "keep"

    @property
    def is_zombie(self) -> bool:
        return self in (Action.REAP, Action.WARN)


@dataclass(frozen=True)
class Decision:
    """One session's or process's fate, with the reasons in words."""

    subject: str  # the cluster name, or `pid:<n>` for an unmanaged process
    action: Action
    owner: str
    kind: str  # interactive, batch or unmanaged
    reasons: tuple[str, ...]
    vram_mib: float | None = None
    gpus: tuple[int, ...] = ()  # what its processes use
    allocated_gpus: tuple[int, ...] | None = None  # through the device plugin; None: unknown
    unused_allocated_gpus: tuple[int, ...] = ()  # the right-sizing note's GPUs
    idle_since: float | None = None
    warned_at: float | None = None
    reap_after: float | None = None  # when the grace period ends
    pid: int | None = None
    command: str | None = None
    proc_uid: int | None = None  # the process's identity when seen (see UnmanagedProcess)
    proc_start_time: int | None = None
    node: str | None = None  # where it runs (Prometheus telemetry); None: this host
    # Why this caller's `--yes` would skip it (`may_act_on`); set by the run, not the rule.
    refused: str | None = None

    @property
    def summary(self) -> str:
        return ", ".join(self.reasons)

    @property
    def held_gpus(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.gpus) | set(self.allocated_gpus or ())))

    @property
    def actionable(self) -> bool:
        """A zombie this caller's `--yes` would warn or tear down."""
        return self.action.is_zombie and self.refused is None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "subject": self.subject,
            "action": self.action.value,
            "owner": self.owner,
            "kind": self.kind,
            "summary": self.summary,
            "reasons": list(self.reasons),
            "vram_mib": self.vram_mib,
            "gpus": list(self.gpus),
            "allocated_gpus": None if self.allocated_gpus is None else list(self.allocated_gpus),
            "unused_allocated_gpus": list(self.unused_allocated_gpus),
            "refused": self.refused,
            "idle_since": iso(self.idle_since),
            "warned_at": iso(self.warned_at),
            "reap_after": iso(self.reap_after),
        }
        if self.node is not None:
            out["node"] = self.node
        if self.pid is not None:
            out["pid"] = self.pid
            out["command"] = self.command
            out["uid"] = self.proc_uid
            out["start_time"] = self.proc_start_time
        return out


def decide(
    evidence: Evidence,
    settings: ReapSettings,
    now: float | None = None,
    *,
    samples: Mapping[str, SessionSamples] | None = None,
) -> list[Decision]:
    """Decide every session and unmanaged process. `now` defaults to when evidence was taken.

    `samples` answers for a session's samples by its cluster name (the history's, for
    evidence built without them); by default the evidence's own samples answer."""
    at = evidence.collected_at if now is None else now
    found = samples or {}
    decisions = [decide_session(s, settings, at, found.get(s.cluster)) for s in evidence.sessions]
    decisions += [decide_unmanaged(p, settings) for p in evidence.unmanaged]
    return decisions


def protected_users(allow: tuple[str, ...]) -> dict[str, str]:
    """`user:<name>` entries: each name and its `safe_user` form (what owner labels carry)."""
    out: dict[str, str] = {}
    for entry in allow:
        if entry.startswith("user:") and entry[5:]:
            name = entry[5:]
            out[name] = entry
            out[safe_user(name)] = entry
    return out


def protected_by(
    owner: str, cluster: str | None, labels: dict[str, str], allow: tuple[str, ...]
) -> str | None:
    if labels.get(LABEL_KEEP, "").lower() in ("true", "1", "yes"):
        return f"`keep: true` in its job spec (label {LABEL_KEEP})"
    if cluster is not None and cluster in allow:
        return "listed in the host config's `protected`"
    entry = protected_users(allow).get(owner)
    if entry is not None:
        return f"user {owner} is listed in the host config's `protected` ({entry})"
    return None


def unmatched_protected(evidence: Evidence, allow: tuple[str, ...]) -> list[str]:
    """Notes for `protected` entries that match no session or process seen: likely a typo."""
    clusters = {s.cluster for s in evidence.sessions}
    owners = {s.owner for s in evidence.sessions} | {p.user for p in evidence.unmanaged}
    notes = []
    for entry in allow:
        if entry.startswith("user:"):
            name = entry[5:]
            hit = bool({name, safe_user(name)} & owners)
        else:
            hit = entry in clusters
        if not hit:
            notes.append(f"protected entry {entry!r} matches no session or process seen now")
    return notes


def _idle_for(run: IdleRun, session: Session, now: float) -> tuple[float, float | None]:
    """(seconds proven idle, since when), with the last activity SkyPilot saw as a bound."""
    since = run.since
    if since is None:
        return 0.0, None
    if session.last_activity_at is not None and session.last_activity_at > since:
        since = session.last_activity_at
    return max(0.0, now - since), since


def _held(session: Session) -> str:
    if session.vram_mib is None:
        return "VRAM held unknown"
    return f"{format_mib(session.vram_mib)} held{session.where}"


def _gpu_list(gpus: tuple[int, ...]) -> str:
    return ",".join(map(str, gpus))


def _n_gpus(n: int) -> str:
    return f"{n} GPU{'' if n == 1 else 's'}"


def _pod_gone(samples: SessionSamples, settings: ReapSettings, now: float) -> str:
    """Since when its pod is gone, as far as the history says (not every gone pod vanished
    mid-run: one gone for days is a leftover record)."""
    last = samples.last_seen(now)
    if last is None:
        return "its pod is gone: no observation of it in the history"
    if now - last <= settings.max_sample_gap_s:
        return f"its pod is gone: it vanished mid-run, after {when(last)}"
    return f"its pod is gone: last seen {when(last)}, {format_duration(now - last)} ago"


def decide_session(
    session: Session,
    settings: ReapSettings,
    now: float,
    samples: SessionSamples | None = None,
) -> Decision:
    """One session's decision; `samples` answers for its samples (default: its own)."""
    if samples is None:
        samples = InMemorySamples(session)

    def make(action: Action, reasons: list[str], **extra: Any) -> Decision:
        return Decision(
            subject=session.cluster,
            action=action,
            owner=session.owner,
            kind=session.kind,
            reasons=tuple(reasons),
            vram_mib=session.vram_mib,
            gpus=session.gpus,
            allocated_gpus=session.allocated_gpus,
            node=session.node,
            **extra,
        )

    shield = protected_by(session.owner, session.cluster, session.labels, settings.protected)
    if shield:
        return make(Action.PROTECTED, [f"protected: {shield}", _held(session)])
    if not session.pod_present:
        return make(
            Action.KEEP,
            [
                _pod_gone(samples, settings, now),
                "it holds no GPU on this host",
                f"SkyPilot still lists it as {session.status}; nothing to reclaim",
            ],
        )
    if session.kind == "batch":
        return _decide_batch(session, settings, now, make, samples)

    blockers: list[str] = []
    if session.jobs_running:
        blockers.append(f"{session.jobs_running} running job(s)")
    if session.jobs_pending:
        blockers.append(f"{session.jobs_pending} pending job(s)")
    if session.ssh_attached:
        blockers.append("an SSH/IDE session is attached now")
    elif session.ssh_attached is None:
        blockers.append("SSH/IDE state unknown now")
    if session.created_at is None:
        blockers.append("age unknown")
    elif session.created_at > now:
        blockers.append(
            f"created {when(session.created_at)}, after this evidence was collected "
            "(a clock out of step?)"
        )
    elif now - session.created_at < settings.min_age_s:
        blockers.append(
            f"too young: age {format_duration(now - session.created_at)} is under the minimum "
            f"{format_duration(settings.min_age_s)}"
        )
    allocated = session.allocated_gpus
    if allocated:
        pass  # allocated GPUs are held whatever the VRAM: min_vram_mib is for VRAM-only evidence
    elif session.vram_mib is None:
        blockers.append("VRAM held unknown")
    elif session.vram_mib < settings.min_vram_mib:
        why = "no GPU allocated to it" if allocated == () else "its GPU allocation is unknown"
        blockers.append(
            f"holds only {format_mib(session.vram_mib)} (under {format_mib(settings.min_vram_mib)})"
            f" and {why}"
        )
    run = samples.idle_run(settings, now, interactive=True)
    idle_for, since = _idle_for(run, session, now)
    if not blockers and (session.jobs_running is None or session.jobs_pending is None):
        blockers.append("its job queue could not be checked")
    if idle_for < settings.idle_window_s:
        proven = f"idle only {format_duration(idle_for)}" if since is not None else "not idle"
        stop = run.stopped_by
        if since is not None and since == session.last_activity_at:
            stop = f"activity at {when(since)}"
        elif stop is None:
            stop = _history_start(run, session, settings, now)
        blockers.append(f"{proven} (need {format_duration(settings.idle_window_s)}): {stop}")
    if blockers:
        unused = samples.unused_allocated(settings, now)
        if unused:
            blockers.append(_right_size_note(session, samples, unused, now))
        return make(Action.KEEP, blockers, idle_since=since, unused_allocated_gpus=unused)

    assert since is not None  # idle_for >= idle_window > 0
    last_ssh = samples.last_ssh(now)
    if last_ssh is not None:
        ssh = f"no SSH since {when(last_ssh)}"
    elif session.last_activity_at is not None:
        ssh = f"no SSH or activity since {when(session.last_activity_at)}"
    else:
        ssh = f"no SSH in {format_duration(idle_for)}"
    idle = format_duration(idle_for)
    if allocated and not session.gpus and not session.vram_mib:
        peak = run.peak_util_pct
        use = "unused" if peak == 0 else f"at most {peak:.0f}% GPU"
        facts = [
            f"idle {idle}",
            f"{_n_gpus(len(allocated))} allocated, {use} for {idle} (no GPU process)",
            f"GPU {_gpu_list(allocated)} allocated through the device plugin",
        ]
    else:
        facts = [f"idle {idle}", f"{run.peak_util_pct:.0f}% GPU over {idle}", _held(session)]
        if allocated and set(allocated) != set(session.gpus):
            facts.append(f"{_n_gpus(len(allocated))} allocated (GPU {_gpu_list(allocated)})")
    facts += [ssh, "no running job"]
    # A warning counts only if the evidence shows the session idle ever since it was given.
    # One older than the idle stretch is stale: the owner came back in between, or the
    # history no longer reaches back to it (pruned: nobody can say what happened since), or
    # it was given to an earlier session of the same name. Stale means a fresh notice.
    warned = session.warned_at
    if warned is not None and warned > now:
        facts.append(
            f"the notice dated {when(warned)} is after this evidence was collected: "
            "refused as evidence, not counted"
        )
        warned = None
    elif warned is not None and (
        warned < since or (session.created_at is not None and warned < session.created_at)
    ):
        facts.append(f"the notice of {when(warned)} predates this idle stretch")
        warned = None
    grace = settings.grace_s
    if warned is None:
        after = now + grace
        return make(
            Action.WARN,
            [*facts, f"first notice now; torn down after {when(after)} if still idle"],
            idle_since=since,
            reap_after=after,
        )
    after = warned + grace
    if now >= after:
        return make(
            Action.REAP,
            [*facts, f"warned {format_duration(now - warned)} ago, grace {format_duration(grace)}"],
            idle_since=since,
            warned_at=warned,
            reap_after=after,
        )
    return make(
        Action.WARN,
        [*facts, f"warned {format_duration(now - warned)} ago; torn down after {when(after)}"],
        idle_since=since,
        warned_at=warned,
        reap_after=after,
    )


def _history_start(run: IdleRun, session: Session, settings: ReapSettings, now: float) -> str:
    """Why an idle stretch that reaches the oldest observation is still too short."""
    oldest = run.since
    created = session.created_at
    if oldest is None:
        return "no GPU reading of it in the history"
    if created is not None and oldest - created <= settings.max_sample_gap_s:
        age = format_duration(now - created) if created is not None else "?"
        return f"too young, idle since it started {age} ago"
    return f"the history reaches back only to {when(oldest)}"


def _right_size_note(
    session: Session, samples: SessionSamples, unused: tuple[int, ...], now: float
) -> str:
    allocated = session.allocated_gpus or ()
    using = len(allocated) - len(unused)
    first = samples.first_seen_on(unused)
    since = now if first is None else first
    return (
        f"right-size: uses {using} of {len(allocated)} allocated GPUs; GPU {_gpu_list(unused)} "
        f"unused for {format_duration(now - since)} (no process, idle): {using} would do "
        "(a note, never a teardown)"
    )


def _decide_batch(
    session: Session,
    settings: ReapSettings,
    now: float,
    make: Callable[..., Decision],
    samples: SessionSamples,
) -> Decision:
    if not session.jobs_running:
        what = f"{session.jobs_pending} pending job(s)" if session.jobs_pending else "no job"
        if session.jobs_running is None:
            what = "its jobs were not checked"
        return make(Action.KEEP, [f"batch: {what}; batch clusters are never reaped"])
    run = samples.idle_run(settings, now, interactive=False)
    idle_for, since = _idle_for(run, session, now)
    if idle_for >= settings.stalled_batch_after_s:
        return make(
            Action.REPORT_STALLED,
            [
                f"batch: {session.jobs_running} running job(s)",
                f"{run.peak_util_pct:.0f}% GPU for {format_duration(idle_for)}",
                "CPU quiet" if settings.cpu_busy_pct is not None else "CPU not checked",
                _held(session),
                "stalled? reported, never torn down by reap",
            ],
            idle_since=since,
        )
    reasons = [f"batch: {session.jobs_running} running job(s)"]
    if since is not None and idle_for > 0:
        reasons.append(
            f"0-{run.peak_util_pct:.0f}% GPU for {format_duration(idle_for)} "
            f"(stalled after {format_duration(settings.stalled_batch_after_s)})"
        )
    if run.stopped_by and run.stopped_by.startswith("CPU busy"):
        reasons.append(f"{run.stopped_by}: likely loading data")
    unused = samples.unused_allocated(settings, now)
    if unused:
        reasons.append(_right_size_note(session, samples, unused, now))
    return make(Action.KEEP, reasons, idle_since=since, unused_allocated_gpus=unused)


def _not_a_target(proc: UnmanagedProcess, settings: ReapSettings) -> str | None:
    """Why an unmanaged process is never a kill candidate, if it is not."""
    if proc.pid <= 1:
        return f"PID {proc.pid} is init: never killed"
    program = proc.command.split(" ", 1)[0].rsplit("/", 1)[-1] if proc.command else ""
    if proc.kernel_thread or program in ("", "?") or proc.command.startswith("["):
        return "a kernel thread or a process with no command line: never killed"
    if proc.process_type == "graphics" or program in GRAPHICS_COMMANDS:
        return f"a graphics process ({program or proc.process_type}): never killed"
    if proc.vram_mib is None:
        return "VRAM held unknown"
    if proc.vram_mib < settings.min_vram_mib:
        return f"holds only {format_mib(proc.vram_mib)} (under {format_mib(settings.min_vram_mib)})"
    return None


def decide_unmanaged(proc: UnmanagedProcess, settings: ReapSettings) -> Decision:
    held = f"PID {proc.pid} of {proc.user} holds {format_mib(proc.vram_mib)} on {proc.where}"
    shield = protected_by(proc.user, None, {}, settings.protected)
    spared = None if shield else _not_a_target(proc, settings)
    action = Action.PROTECTED if shield else Action.KEEP if spared else Action.REPORT_UNMANAGED
    if shield:
        reasons: tuple[str, ...] = (f"protected: {shield}", held)
    elif spared:
        reasons = (held, f"command: {proc.command}", spared)
    else:
        reasons = (held, f"command: {proc.command}", "outside any SkyPilot pod")
    return Decision(
        subject=proc.subject,
        action=action,
        owner=proc.user,
        kind="unmanaged",
        reasons=reasons,
        vram_mib=proc.vram_mib,
        gpus=(proc.gpu,),
        pid=proc.pid,
        command=proc.command,
        proc_uid=proc.uid,
        proc_start_time=proc.start_time,
        node=proc.node,
    )
