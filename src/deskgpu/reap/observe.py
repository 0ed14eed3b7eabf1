"""`deskgpu observe` as a library call returning a result object.

observe: snapshot -> append to the history -> clear notices of sessions in use again
         -> (warn_on_observe) give first notices, each audited before it is given
The live box, notices and the recovery of a run cut short are reap's (reap/run.py).
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
from dataclasses import dataclass, field, replace
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.config.reap import ReapSettings
from deskgpu.errors import DeskgpuError, OutsideError
from deskgpu.reap import act, gather, run
from deskgpu.reap.evidence import Session, iso
from deskgpu.reap.rule import Action, Decision, decide
from deskgpu.reap.run import (
    complete_cut_short,
    end_stale_notice,
    evidence_summary,
    give_notice,
    new_run_id,
)
from deskgpu.snapshot import Snapshot
from deskgpu.state import audit
from deskgpu.state import usage as usage_store
from deskgpu.state.history import History, open_history


@dataclass
class ObserveResult:
    at: float
    sessions: int
    gpus: int
    unmanaged: int
    warned: list[str] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suspects: list[tuple[str, str]] = field(default_factory=list)  # zombies now: (cluster, owner)
    # Each session pod's SSH connections and CPU seconds: (name on cloud, ssh, cpu), None
    # unknown; `--textfile` exports them for a cluster's reap (deskgpu.telemetry.history).
    activity: list[tuple[str, int | None, float | None]] = field(default_factory=list)
    snapshot: Snapshot | None = None  # what it observed (for `observe --textfile`)
    # Faults that need the admin even under --quiet (exit 1); the observation itself is kept.
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "sessions": self.sessions,
            "gpus": self.gpus,
            "unmanaged": self.unmanaged,
            "warned": self.warned,
            "cleared": self.cleared,
            "notes": self.notes,
            "problems": self.problems,
        }


def observe(
    config: HostConfig, settings: ReapSettings, live: run.Live | None = None
) -> ObserveResult:
    """One observation into the history; then first notices for sessions that just qualified."""
    live = live or run.Live()  # looked up here: a test may give the box its own
    # Always this host's GPUs (NVML), even with `telemetry:`: observe is each node's own
    # collector (its history, its textfile); Prometheus is what reads them all.
    snap = live.take(replace(config, telemetry=None))
    view = gather.live_view(snap, live.pod_index(), live.proc_root, live.cgroup_root)
    now = snap.taken_at
    result = ObserveResult(now, len(view.sessions), len(snap.nvml.gpus), len(view.unmanaged))
    result.snapshot = snap
    result.activity = [
        (s.on_cloud, s.ssh_sessions, s.cpu_total_s) for s in view.sessions if s.on_cloud
    ]
    result.notes.extend(view.notes)
    with open_history(settings.history_file) as history:
        history.append(now, [s.sample() for s in view.sessions])
        usage_store.record(history.db, now, view.sessions, snap)  # owners, for `deskgpu report`
        history.prune(now - settings.retention_s)
        live_names = {s.cluster for s in view.sessions}
        for n in history.notices():
            if n.cluster not in live_names:
                history.clear_notice(n.cluster)  # gone: torn down, or ended on its own
        try:
            with audit.run_lock(settings.lock_file, 0):
                _observe_notices(config, settings, live, view, history, now, result)
        except audit.LockBusy as exc:  # a reap run is at it: the next observation gives them
            result.notes.append(f"notices skipped this time: {exc}")
        except OutsideError as exc:  # a broken lock: notices would never be given
            result.problems.append(f"notices cannot be given: {exc}")
    return result


def _observe_notices(
    config: HostConfig,
    settings: ReapSettings,
    live: run.Live,
    view: gather.LiveView,
    history: History,
    now: float,
    result: ObserveResult,
) -> None:
    """Clear the notices of sessions in use again; give first notices (warn_on_observe).

    Clearing does not depend on warn_on_observe: a notice whose session was used again
    must never be what a later reap counts. Each notice is audited before it is given; no
    audit record, no notice.
    """
    host = config.box_name or socket.gethostname()
    # No evidence document is written here: the history answers for the samples (a month of
    # them is not read every 5 minutes), and an audit line's summary reads its session's.
    evidence = gather.build_evidence(view, history, settings, now, host=host, samples=False)
    samples = gather.history_samples(history, evidence, settings)
    evidence = gather.check_jobs(evidence, settings, live.jobs(config), samples)
    log = audit.AuditLog(settings.audit_file)
    run_id = f"observe-{new_run_id(now)}"
    sessions = {s.cluster: s for s in evidence.sessions}
    newest = audit.newest_actions(settings.audit_file)
    complete_cut_short(history, newest, log, run_id, "observe", now)

    def record(d: Decision, outcome: act.Outcome, session: Session) -> None:
        log.append(
            {
                "ts": iso(now),
                "run_id": run_id,
                "event": "action",
                "actor": "observe",
                "action": d.action.value,
                "owner": d.owner,
                **outcome.to_dict(),
                "session_created_at": iso(session.created_at),
                "reasons": list(d.reasons),
                "evidence": evidence_summary(samples[session.cluster].with_samples(session)),
            }
        )

    def clear(d: Decision, session: Session) -> None:
        """A notice that no longer counts: its line first, then the history forgets it (a
        kill between the two leaves the notice, and the next run clears it again). Cleared
        even when the line cannot be written: a reap must never count it."""
        with contextlib.suppress(OutsideError):
            record(d, act.Outcome(d.subject, audit.CLEARED, True, d.summary), session)
        history.clear_notice(d.subject)
        result.cleared.append(d.subject)

    for d in decide(evidence, settings, samples=samples):
        if d.action.is_zombie:
            result.suspects.append((d.subject, d.owner))
        session = sessions.get(d.subject)
        if session is None or not (d.action is Action.WARN and d.warned_at is None):
            if session is not None and session.warned_at is not None and not d.action.is_zombie:
                clear(d, session)  # in use again: the next stretch starts over
            continue
        if not settings.warn_on_observe:
            if session.warned_at is not None:  # stale: it predates the current idle stretch
                clear(d, session)
            continue
        try:
            failed = end_stale_notice(d, session, history, record)
        except OutsideError as exc:
            result.notes.append(f"{d.subject}: no notice given: {exc}")
            continue
        if failed is not None:
            result.notes.append(f"{d.subject}: {failed.message}")
            with contextlib.suppress(OutsideError):
                record(d, failed, session)
            continue
        if audit.cut_short(newest, d.subject, iso(session.created_at)):
            result.notes.append(f"{d.subject}: giving the notice a run cut short never gave")
        else:
            try:
                record(
                    d,
                    act.Outcome(d.subject, audit.INTENT, True, "giving the first notice"),
                    session,
                )
            except OutsideError as exc:
                result.notes.append(f"{d.subject}: no notice given: {exc}")
                continue
        try:
            outcome = give_notice(d, config, settings, history, session.created_at, now, host)
        except (DeskgpuError, OSError, sqlite3.Error) as exc:
            outcome = act.Outcome(d.subject, "failed", False, f"notice: {exc}")
        if outcome.ok:
            result.warned.append(d.subject)
            try:
                record(d, outcome, session)  # the notice's own line: what reports count
            except OutsideError as exc:  # its intent line stands; the next run completes it
                result.notes.append(f"{d.subject}: notice given, its audit line not: {exc}")
        else:
            result.notes.append(f"{d.subject}: {outcome.message}")
            with contextlib.suppress(OutsideError):
                record(d, outcome, session)
