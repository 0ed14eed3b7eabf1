"""`deskgpu reap` and `deskgpu observe` as library calls returning result objects.

reap:    [lock] -> evidence (recorded file | live snapshot + history | live sampling)
         -> decide -> audit every decision -> (--yes) notices, teardowns, kills -> result
observe: snapshot -> append to the history -> (warn_on_observe) give first notices
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.errors import ExitStatus, OutsideError
from deskgpu.reap import act, audit, gather
from deskgpu.reap.evidence import Evidence, Session, iso
from deskgpu.reap.history import History, Notice, open_history
from deskgpu.reap.rule import Action, Decision, decide
from deskgpu.reap.settings import ReapSettings
from deskgpu.snapshot import Snapshot
from deskgpu.units import format_duration


@dataclass
class Live:
    """How reap and observe reach the box; tests swap these for recorded data."""

    snapshot: Callable[[HostConfig], Snapshot] | None = None
    pods: Callable[[], Any] | None = None
    cluster_jobs: Callable[[str, HostConfig], tuple[int, int]] | None = None
    down: Callable[[str, HostConfig], None] | None = None
    proc_root: Path = gather.PROC
    cgroup_root: Path = gather.CGROUP
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep

    def take(self, config: HostConfig) -> Snapshot:
        if self.snapshot is not None:
            return self.snapshot(config)
        from deskgpu import survey

        # GPUs first: without a driver there is nothing to decide, so SkyPilot is not asked
        # (no `import sky`, no API server timeout) and `gather.live_view` says so at once.
        return survey.take(config, require_gpus=True)

    def pod_index(self) -> Any:
        if self.pods is not None:
            return self.pods()
        from deskgpu import attribution

        return attribution.pods_from_kube()

    def jobs(self, config: HostConfig) -> Callable[[str], tuple[int, int]]:
        if self.cluster_jobs is not None:
            query = self.cluster_jobs
        else:
            from deskgpu import skyapi

            query = skyapi.cluster_jobs
        return lambda name: query(name, config)


@dataclass
class ReapResult:
    """Everything a reap run knew, decided and did."""

    run_id: str
    dry_run: bool
    evidence: Evidence
    decisions: list[Decision]
    outcomes: list[act.Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    evidence_file: str | None = None

    @property
    def zombies(self) -> list[Decision]:
        return [d for d in self.decisions if d.action.is_zombie]

    @property
    def failures(self) -> list[act.Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_status(self) -> ExitStatus:
        if self.failures:
            return ExitStatus.OUTSIDE_FAILURE
        if self.dry_run and self.zombies:
            return ExitStatus.FOUND
        return ExitStatus.OK

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for d in self.decisions:
            counts[d.action.value] = counts.get(d.action.value, 0) + 1
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "collected_at": iso(self.evidence.collected_at),
            "evidence_source": self.evidence.source,
            "evidence_file": self.evidence_file,
            "notes": list(self.evidence.notes) + self.notes,
            "counts": counts,
            "decisions": [d.to_dict() for d in self.decisions],
            "outcomes": [o.to_dict() for o in self.outcomes],
            "exit_status": int(self.exit_status),
        }


def new_run_id(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.getpid()}"


def replay(path: Path, settings: ReapSettings) -> ReapResult:
    """Re-decide a recorded evidence document as of when it was collected; no live calls."""
    evidence = audit.read_evidence(path)
    decisions = decide(evidence, settings)
    return ReapResult(new_run_id(time.time()), True, evidence, decisions)


def collect(config: HostConfig, settings: ReapSettings, live: Live, notes: list[str]) -> Evidence:
    """Live evidence: the history when `observe` keeps it fresh, else a short live sampling."""
    snap = live.take(config)
    view = gather.live_view(snap, live.pod_index(), live.proc_root, live.cgroup_root)
    now = snap.taken_at
    host = config.box_name or socket.gethostname()
    fresh = False
    path = settings.history_file
    if path.exists():
        with open_history(path, create=False) as history:
            latest = history.latest()
            fresh = latest is not None and now - latest <= settings.max_sample_gap_s
            if fresh:
                if _writable(path):  # the readings of this very moment count too
                    history.append(now, [s.sample() for s in view.sessions])
                evidence = gather.build_evidence(view, history, settings, now, host=host)
            elif latest is not None:
                notes.append(
                    f"the history's last observation is {format_duration(now - latest)} old"
                )
    if not fresh:
        evidence = _sample_live(config, settings, live, view, snap, host, notes)
    return gather.check_jobs(evidence, settings, live.jobs(config))


def _sample_live(
    config: HostConfig,
    settings: ReapSettings,
    live: Live,
    first_view: gather.LiveView,
    first: Snapshot,
    host: str,
    notes: list[str],
) -> Evidence:
    """No usable history: sample the GPUs for `live_window` (SkyPilot asked only once)."""
    window = format_duration(settings.live_window_s)
    note = (
        f"no recent observation history at {settings.history_file}: sampled live for {window}; "
        "evidence is short, so no session can be proven idle (enable the deskgpu-observe timer)"
    )
    notes.append(note)
    with open_history(":memory:") as history:
        history.append(first.taken_at, [s.sample() for s in first_view.sessions])
        end = first.taken_at + settings.live_window_s
        view = first_view
        while live.clock() + settings.live_interval_s <= end:
            live.sleep(settings.live_interval_s)
            snap = live.take(replace(config))
            view = gather.live_view(snap, live.pod_index(), live.proc_root, live.cgroup_root)
            history.append(snap.taken_at, [s.sample() for s in view.sessions])
        now = live.clock()
        return gather.build_evidence(
            view, history, settings, now, host=host, source="live", notes=[note]
        )


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def reap(
    config: HostConfig,
    settings: ReapSettings,
    *,
    yes: bool,
    kill_unmanaged: bool = False,
    actor: act.Actor | None = None,
    live: Live | None = None,
    record: Path | None = None,
) -> ReapResult:
    """One reap run. Dry run unless `yes`; with `yes`, runs serialize on the lock."""
    live = live or Live()
    actor = actor or act.current_actor()
    log = audit.AuditLog(settings.audit_file)
    if yes:
        log.check_writable()  # never act without a record of why
    guard = (
        audit.run_lock(settings.lock_file, settings.lock_timeout_s)
        if yes
        else contextlib.nullcontext()
    )
    with guard:
        notes: list[str] = []
        evidence = collect(config, settings, live, notes)
        if record is not None:
            audit.write_evidence(record, evidence)
        decisions = decide(evidence, settings)
        result = ReapResult(
            new_run_id(evidence.collected_at), not yes, evidence, decisions, notes=notes
        )
        auditing = _audit_start(result, log, settings, actor, required=yes)
        if yes:
            _act(result, config, settings, actor, kill_unmanaged, live, log if auditing else None)
        return result


def _audit_start(
    result: ReapResult,
    log: audit.AuditLog,
    settings: ReapSettings,
    actor: act.Actor,
    required: bool,
) -> bool:
    try:
        if not required:
            log.check_writable()
        if any(d.action is not Action.KEEP for d in result.decisions) or not result.dry_run:
            result.evidence_file = str(
                audit.save_evidence(settings.evidence_dir, result.run_id, result.evidence)
            )
        sessions = {s.cluster: s for s in result.evidence.sessions}
        for d in result.decisions:
            log.append(
                {
                    "ts": iso(result.evidence.collected_at),
                    "run_id": result.run_id,
                    "event": "decision",
                    "actor": actor.user,
                    "dry_run": result.dry_run,
                    **d.to_dict(),
                    "evidence": _evidence_summary(sessions.get(d.subject)),
                    "evidence_file": result.evidence_file,
                }
            )
    except OutsideError as exc:
        if required:
            raise
        result.notes.append(f"dry run not audited: {exc}")
        return False
    return True


def _evidence_summary(session: Session | None) -> dict[str, Any] | None:
    """The facts a decision rests on, small enough for one log line (samples: in the file)."""
    if session is None:
        return None
    d = session.to_dict()
    gpu, act_rows = d.pop("gpu_samples"), d.pop("activity_samples")
    d["samples"] = {
        "gpu_rows": len(gpu),
        "first": gpu[0][0] if gpu else None,
        "last": gpu[-1][0] if gpu else None,
        "max_util_pct": max((r[2] for r in gpu if r[2] is not None), default=None),
        "ssh_observations": sum(1 for r in act_rows if r[1]),
    }
    return d


@contextlib.contextmanager
def _history_or_none(path: Path) -> Iterator[History | None]:
    try:
        with open_history(path) as history:
            yield history
    except OutsideError:
        yield None


def _act(
    result: ReapResult,
    config: HostConfig,
    settings: ReapSettings,
    actor: act.Actor,
    kill_unmanaged: bool,
    live: Live,
    log: audit.AuditLog | None,
) -> None:
    sessions = {s.cluster: s for s in result.evidence.sessions}
    with _history_or_none(settings.history_file) as history:
        for d in result.decisions:
            outcome: act.Outcome | None = None
            if d.action is Action.REPORT_UNMANAGED:
                if kill_unmanaged:
                    outcome = act.kill_unmanaged(d, actor, settings.kill_timeout_s, live.proc_root)
            elif d.action in (Action.WARN, Action.REAP) and not act.may_act_on(
                actor, d.owner, config.admin_group
            ):
                outcome = act.Outcome(
                    d.subject, "skipped", True, f"owned by {d.owner}: needs root or the admin group"
                )
            elif d.action is Action.WARN:
                if d.warned_at is None:
                    session = sessions.get(d.subject)
                    created = session.created_at if session else None
                    outcome = give_notice(
                        d,
                        config,
                        settings,
                        history,
                        created,
                        result.evidence.collected_at,
                        result.evidence.host,
                    )
            elif d.action is Action.REAP:
                outcome = act.teardown(d, config, live.down)
                if outcome.ok and history is not None:
                    history.clear_notice(d.subject)
            if outcome is None:
                continue
            result.outcomes.append(outcome)
            if log is not None:
                log.append(
                    {
                        "ts": iso(live.clock()),
                        "run_id": result.run_id,
                        "event": "action",
                        "actor": actor.user,
                        "action": d.action.value,
                        "owner": d.owner,
                        **outcome.to_dict(),
                        "evidence_file": result.evidence_file,
                    }
                )


def give_notice(
    decision: Decision,
    config: HostConfig,
    settings: ReapSettings,
    history: History | None,
    created_at: float | None,
    now: float,
    host: str,
) -> act.Outcome:
    """Record the first notice (the grace clock starts) and run the notify hook."""
    if history is None:
        return act.Outcome(
            decision.subject, "failed", False, "cannot record the notice: no history"
        )
    after = now + settings.grace_s
    warned = replace(decision, reap_after=after)
    message = act.notice_text(warned, host, config.checkpoint_root)
    history.record_notice(Notice(decision.subject, decision.owner, created_at, now, after, message))
    error = act.notify(
        settings.notify_command,
        {
            "cluster": decision.subject,
            "owner": decision.owner,
            "reap_after": iso(after) or "",
            "host": host,
            "message": message,
        },
        settings.notify_timeout_s,
    )
    text = f"notice recorded; torn down after {iso(after)} if still idle"
    if error:
        return act.Outcome(decision.subject, "warned", True, f"{text} ({error})")
    return act.Outcome(decision.subject, "warned", True, text)


@dataclass
class ObserveResult:
    at: float
    sessions: int
    gpus: int
    unmanaged: int
    warned: list[str] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "sessions": self.sessions,
            "gpus": self.gpus,
            "unmanaged": self.unmanaged,
            "warned": self.warned,
            "cleared": self.cleared,
            "notes": self.notes,
        }


def observe(config: HostConfig, settings: ReapSettings, live: Live | None = None) -> ObserveResult:
    """One observation into the history; then first notices for sessions that just qualified."""
    live = live or Live()
    snap = live.take(config)
    view = gather.live_view(snap, live.pod_index(), live.proc_root, live.cgroup_root)
    now = snap.taken_at
    result = ObserveResult(now, len(view.sessions), len(snap.nvml.gpus), len(view.unmanaged))
    result.notes.extend(view.notes)
    with open_history(settings.history_file) as history:
        history.append(now, [s.sample() for s in view.sessions])
        history.prune(now - settings.retention_s)
        live_names = {s.cluster for s in view.sessions}
        for n in history.notices():
            if n.cluster not in live_names:
                history.clear_notice(n.cluster)  # gone: torn down, or ended on its own
        if not settings.warn_on_observe:
            return result
        try:
            with audit.run_lock(settings.lock_file, 0):
                _observe_notices(config, settings, live, view, history, now, result)
        except OutsideError as exc:
            result.notes.append(f"notices skipped this time: {exc}")
    return result


def _observe_notices(
    config: HostConfig,
    settings: ReapSettings,
    live: Live,
    view: gather.LiveView,
    history: History,
    now: float,
    result: ObserveResult,
) -> None:
    host = config.box_name or socket.gethostname()
    evidence = gather.build_evidence(view, history, settings, now, host=host)
    evidence = gather.check_jobs(evidence, settings, live.jobs(config))
    log = audit.AuditLog(settings.audit_file)
    sessions = {s.cluster: s for s in evidence.sessions}
    for d in decide(evidence, settings):
        session = sessions.get(d.subject)
        if session is None:
            continue
        if d.action is Action.WARN and d.warned_at is None:
            outcome = give_notice(d, config, settings, history, session.created_at, now, host)
            result.warned.append(d.subject)
        elif not d.action.is_zombie and session.warned_at is not None:
            history.clear_notice(d.subject)  # in use again: the next idle stretch starts over
            result.cleared.append(d.subject)
            outcome = act.Outcome(d.subject, "notice-cleared", True, d.summary)
        else:
            continue
        log.append(
            {
                "ts": iso(now),
                "run_id": f"observe-{new_run_id(now)}",
                "event": "action",
                "actor": "observe",
                "action": d.action.value,
                "owner": d.owner,
                **outcome.to_dict(),
                "reasons": list(d.reasons),
                "evidence": _evidence_summary(session),
            }
        )
