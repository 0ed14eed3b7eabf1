"""`deskgpu reap` as a library call returning a result object, and what it shares with
`deskgpu observe` (reap/observe.py): the live box, notices and their recovery.

reap:    [lock] -> evidence (recorded file | live snapshot + history | live sampling)
         -> decide -> (--yes) audit every decision -> notices, teardowns, kills -> result
         A dry run writes nothing: no history rows, no audit lines, no evidence files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deskgpu import identity
from deskgpu.config import SYSTEM_CONFIG, HostConfig
from deskgpu.config.reap import ReapSettings
from deskgpu.errors import DeskgpuError, ExitStatus, OutsideError, UsageError
from deskgpu.frontends import likely_orphans
from deskgpu.reap import act, gather
from deskgpu.reap.evidence import Evidence, Session, iso
from deskgpu.reap.rule import Action, Decision, decide, unmatched_protected
from deskgpu.snapshot import SOURCE_PROMETHEUS, Snapshot
from deskgpu.state import audit
from deskgpu.state.history import History, Notice, SessionSample, history_copy, open_history
from deskgpu.units import format_duration


@dataclass
class Live:
    """How reap and observe reach the box; tests swap these for recorded data."""

    snapshot: Callable[[HostConfig], Snapshot] | None = None
    pods: Callable[[], Any] | None = None
    cluster_jobs: Callable[[str, HostConfig], tuple[int, int]] | None = None
    down: Callable[[str, HostConfig], None] | None = None
    gpu_util: Callable[[], dict[int, float | None]] | None = None  # GPU index -> util %
    proc_root: Path = gather.PROC
    cgroup_root: Path = gather.CGROUP
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep

    def take(self, config: HostConfig) -> Snapshot:
        if self.snapshot is not None:
            return self.snapshot(config)
        from deskgpu import queue as survey

        # GPUs first: without a driver there is nothing to decide, so SkyPilot is not asked
        # (no `import sky`, no API server timeout) and `gather.live_view` says so at once.
        return survey.take(config, require_gpus=True)

    def utilization(self, config: HostConfig) -> dict[int, float | None]:
        """Each GPU's utilization now: one NVML read (the check just before a teardown)."""
        if self.gpu_util is not None:
            return self.gpu_util()
        if self.snapshot is not None:
            gpus = self.snapshot(config).nvml.gpus
        else:
            from deskgpu import nvml

            gpus = nvml.read().gpus
        return {
            g.index: None if g.utilization_gpu_pct is None else float(g.utilization_gpu_pct)
            for g in gpus
        }

    def pod_index(self) -> Any:
        if self.pods is not None:
            return self.pods()
        from deskgpu import attribution

        return attribution.pods_from_kube()

    def jobs(self, config: HostConfig) -> Callable[[str], tuple[int, int]]:
        if self.cluster_jobs is not None:
            query = self.cluster_jobs
        else:
            from deskgpu.skypilot import sdk as skyapi

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
    def actionable(self) -> list[Decision]:
        """The zombies this caller's `--yes` would act on (others' are `refused`)."""
        return [d for d in self.decisions if d.actionable]

    @property
    def would_skip(self) -> list[Decision]:
        return [d for d in self.decisions if d.action.is_zombie and d.refused is not None]

    @property
    def failures(self) -> list[act.Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_status(self) -> ExitStatus:
        if self.failures:
            return ExitStatus.OUTSIDE_FAILURE
        if self.dry_run and self.actionable:
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
            "would_skip": len(self.would_skip),
            "decisions": [d.to_dict() for d in self.decisions],
            "outcomes": [o.to_dict() for o in self.outcomes],
            "exit_status": int(self.exit_status),
        }


def new_run_id(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.getpid()}"


def replay(
    path: Path,
    settings: ReapSettings,
    *,
    config: HostConfig | None = None,
    actor: identity.Actor | None = None,
    as_admin: bool = False,
) -> ReapResult:
    """Re-decide a recorded evidence document as of when it was collected; no live calls.
    Like a dry run, it shows what this caller's `--yes` would have done."""
    config = config or HostConfig()
    actor = actor or identity.current_actor()
    view = viewer(actor, config, as_admin)
    evidence = audit.read_evidence(path)
    decisions = judge(decide(evidence, settings), view)
    notes = unmatched_protected(evidence, settings.protected)
    return ReapResult(new_run_id(time.time()), True, evidence, decisions, notes=notes)


def viewer(
    actor: identity.Actor, config: HostConfig, as_admin: bool
) -> Callable[[str], str | None]:
    """Whose permissions a run decides with: the caller's, or (`--as-admin`) an admin's."""
    if as_admin:
        if not identity.is_admin(actor, config):
            raise UsageError(
                f"--as-admin: {actor.user} is not root nor in admin_group "
                f"({config.admin_group or 'none set'}; it counts only from the root-owned "
                f"{SYSTEM_CONFIG})"
            )
        return lambda _owner: None
    return identity.refusals(actor, config)


def judge(decisions: list[Decision], refused: Callable[[str], str | None]) -> list[Decision]:
    """Mark the zombies this caller may not act on: `--yes` would skip them."""
    out = []
    for d in decisions:
        why = refused(d.owner) if d.action.is_zombie else None
        out.append(d if why is None else replace(d, refused=why))
    return out


def collect(
    config: HostConfig, settings: ReapSettings, live: Live, notes: list[str], *, write: bool
) -> tuple[Evidence, gather.LiveView]:
    """Live evidence: the history when `observe` keeps it fresh, else a short live sampling.

    The readings of this very moment count too: with `write` (a `--yes` run) they are
    appended to the history, else to a private copy of it. Returns the live view as well
    (its pods are checked again just before each teardown).
    """
    snap = live.take(config)
    view = gather.live_view(snap, live.pod_index(), live.proc_root, live.cgroup_root)
    now = snap.taken_at
    # Shown, never acted on: a session that waits for GPUs holds none, and is nobody's zombie.
    gives_up = config.frontend_gives_up_after_s
    notes += [o.note(gives_up) for o in likely_orphans(snap.sky.clusters, now, gives_up)]
    host = config.box_name or socket.gethostname()
    if snap.nvml.source == SOURCE_PROMETHEUS:
        evidence = _prometheus_evidence(config, settings, view, now, host)
        return gather.check_jobs(evidence, settings, live.jobs(config)), view
    fresh = False
    path = settings.history_file
    if path.exists():
        opened = (
            open_history(path, create=False) if write and _writable(path) else history_copy(path)
        )
        with opened as history:
            latest = history.latest()
            fresh = latest is not None and now - latest <= settings.max_sample_gap_s
            if fresh:
                history.append(now, [s.sample() for s in view.sessions])
                evidence = gather.build_evidence(view, history, settings, now, host=host)
            elif latest is not None:
                notes.append(
                    f"the history's last observation is {format_duration(now - latest)} old"
                )
    if not fresh:
        evidence, view = _sample_live(config, settings, live, view, snap, host, notes)
    return gather.check_jobs(evidence, settings, live.jobs(config)), view


def _prometheus_evidence(
    config: HostConfig, settings: ReapSettings, view: gather.LiveView, now: float, host: str
) -> Evidence:
    """Every node's sessions over reap's window, replayed from Prometheus as the observations
    each node's observe made; the notices are this host's history's."""
    from deskgpu.telemetry import history as replayed
    from deskgpu.telemetry.promapi import Prometheus

    tele = config.telemetry
    assert tele is not None
    since, until = replayed.window(settings, now)
    wanted = [
        replayed.Wanted(s.cluster, s.on_cloud, s.node, sorted(s.gpus))
        for s in view.sessions
        if s.node is not None and s.on_cloud and s.gpus
    ]
    with open_history(":memory:") as history:
        notes = replayed.replay(Prometheus(tele.prometheus), wanted, since, until, tele, history)
        # A GPU unknown right now (its node's exporter stopped) ends a session's idle stretch
        # now, as a failed reading in a box's own observation does; the others are judged on
        # their nodes' observations alone (no SSH or CPU reading is taken at this moment).
        unknown_now = [
            SessionSample(
                s.cluster, tuple((g, None, v) for g, (_, v) in s.gpus.items()), None, None
            )
            for s in view.sessions
            if s.node is not None and any(u is None for u, _ in s.gpus.values())
        ]
        if unknown_now:
            history.append(now, unknown_now)
        path = settings.history_file
        if path.exists():
            with history_copy(path) as kept:
                for notice in kept.notices():
                    history.record_notice(notice)
        notes.insert(0, f"GPU evidence: every node's, from Prometheus at {tele.prometheus}")
        return gather.build_evidence(
            view, history, settings, now, host=host, source="prometheus", notes=notes
        )


def _sample_live(
    config: HostConfig,
    settings: ReapSettings,
    live: Live,
    first_view: gather.LiveView,
    first: Snapshot,
    host: str,
    notes: list[str],
) -> tuple[Evidence, gather.LiveView]:
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
        evidence = gather.build_evidence(
            view, history, settings, now, host=host, source="live", notes=[note]
        )
        return evidence, view


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def reap(
    config: HostConfig,
    settings: ReapSettings,
    *,
    yes: bool,
    kill_unmanaged: bool = False,
    actor: identity.Actor | None = None,
    live: Live | None = None,
    record: Path | None = None,
    as_admin: bool = False,
) -> ReapResult:
    """One reap run. Dry run unless `yes`; with `yes`, runs serialize on the lock. Either
    way the decisions say what this caller may not act on (`as_admin`: an admin's view,
    dry runs only)."""
    live = live or Live()
    actor = actor or identity.current_actor()
    if as_admin and yes:
        raise UsageError("--as-admin shows an admin's view in a dry run; --yes acts as you")
    view = viewer(actor, config, as_admin)
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
        evidence, live_view = collect(config, settings, live, notes, write=yes)
        if record is not None:
            audit.write_evidence(record, evidence)
        decisions = judge(decide(evidence, settings), view)
        notes += unmatched_protected(evidence, settings.protected)
        result = ReapResult(
            new_run_id(evidence.collected_at), not yes, evidence, decisions, notes=notes
        )
        if yes:  # a dry run writes nothing: no audit lines, no evidence file
            _audit_start(result, log, settings, actor)
            pods = {s.cluster: set(s.pod_uids) for s in live_view.sessions}
            _act(result, config, settings, actor, kill_unmanaged, live, log, pods)
            log.append(_run_record(result, actor, live.clock()))
        return result


def _run_record(result: ReapResult, actor: identity.Actor, now: float) -> dict[str, Any]:
    """The line a `reap --yes` run ends with, zombies or not: `deskgpu doctor` reads it as the
    proof that the weekly reap runs (operations.reap_ran)."""
    summary = result.to_dict()
    return {
        "ts": iso(now),
        "run_id": result.run_id,
        "event": audit.RUN_EVENT,
        "actor": actor.user,
        "dry_run": False,
        "sessions": len(result.evidence.sessions),
        "counts": summary["counts"],
        "failures": len(result.failures),
        "evidence_source": result.evidence.source,
        "evidence_file": result.evidence_file,
    }


def _audit_start(
    result: ReapResult, log: audit.AuditLog, settings: ReapSettings, actor: identity.Actor
) -> None:
    """Save the evidence and one line per decision, before anything is done."""
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
                "evidence": evidence_summary(sessions.get(d.subject)),
                "evidence_file": result.evidence_file,
            }
        )


def evidence_summary(session: Session | None) -> dict[str, Any] | None:
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


def _act(
    result: ReapResult,
    config: HostConfig,
    settings: ReapSettings,
    actor: identity.Actor,
    kill_unmanaged: bool,
    live: Live,
    log: audit.AuditLog,
    pods: dict[str, set[str]],
) -> None:
    """Every action; one that fails is audited as `failed` and the others still run."""
    sessions = {s.cluster: s for s in result.evidence.sessions}
    with contextlib.ExitStack() as stack:
        history: History | None = None
        try:
            history = stack.enter_context(open_history(settings.history_file))
        except OutsideError as exc:
            result.notes.append(f"notices cannot be recorded: {exc}")
        newest = audit.newest_actions(settings.audit_file)
        if history is not None:
            complete_cut_short(history, newest, log, result.run_id, actor.user, live.clock())

        def line(d: Decision, outcome: act.Outcome, session: Session | None) -> dict[str, Any]:
            return {
                "ts": iso(live.clock()),
                "run_id": result.run_id,
                "event": "action",
                "actor": actor.user,
                "action": d.action.value,
                "owner": d.owner,
                **outcome.to_dict(),
                "session_created_at": iso(session.created_at) if session else None,
                "evidence_file": result.evidence_file,
            }

        def write(d: Decision, outcome: act.Outcome, session: Session | None) -> None:
            log.append(line(d, outcome, session))

        for d in result.decisions:
            session = sessions.get(d.subject)
            if _gives_notice(d):
                created = iso(session.created_at) if session else None
                failed = end_stale_notice(d, session, history, write)
                if failed is not None:
                    result.outcomes.append(failed)
                    log.append(line(d, failed, session))
                    continue
                if not audit.cut_short(newest, d.subject, created):
                    # The notice's line comes first (no notice without one); its intent is
                    # not a notice: the `warned` line after it is.
                    intent = act.Outcome(d.subject, audit.INTENT, True, "giving the first notice")
                    log.append(line(d, intent, session))
            elif d.action is Action.REAP and d.refused is None:
                # A teardown's line comes first too: a run killed between `sky down` and its
                # `torn-down` line still leaves a record that it was about to act.
                intent = act.Outcome(d.subject, audit.TEARDOWN_INTENT, True, "tearing it down")
                log.append(line(d, intent, session))
            try:
                outcome = _act_one(
                    d, result, config, settings, actor, kill_unmanaged, live, history,
                    sessions.get(d.subject), pods.get(d.subject, set()),
                )  # fmt: skip
            except (DeskgpuError, OSError, sqlite3.Error) as exc:
                outcome = act.Outcome(d.subject, "failed", False, f"{d.action.value}: {exc}")
            if outcome is None:
                continue
            result.outcomes.append(outcome)
            # A failure here ends the run: reap never acts without a record.
            log.append(line(d, outcome, session))


def complete_cut_short(
    history: History,
    newest: dict[str, dict[str, Any]],
    log: audit.AuditLog,
    run_id: str,
    actor: str,
    now: float,
) -> None:
    """A notice the history holds whose newest audit line is still its intent (the run was
    cut short after recording it): write the `warned` line it never got, once.

    The notice is that intent's own: a notice that stopped counting is cleared before a
    fresh notice's intent is written (`end_stale_notice`), never left beside it."""
    for n in history.notices():
        if not audit.cut_short(newest, n.cluster, iso(n.created_at)):
            continue
        record = {
            "ts": iso(now),
            "run_id": run_id,
            "event": "action",
            "actor": actor,
            "action": Action.WARN.value,
            "owner": n.owner,
            **act.Outcome(
                n.cluster,
                "warned",
                True,
                f"notice recorded at {iso(n.warned_at)} by a run cut short",
            ).to_dict(),
            "session_created_at": iso(n.created_at),
        }
        with contextlib.suppress(OutsideError):
            log.append(record)
            newest[n.cluster] = record


def end_stale_notice(
    d: Decision,
    session: Session | None,
    history: History | None,
    write: Callable[[Decision, act.Outcome, Session], None],
) -> act.Outcome | None:
    """End a notice that no longer counts (stale: older than the idle stretch) before a fresh
    notice's intent line: its `notice-cleared` line, then the history forgets it.

    Two notices of one session always have a line between them that ends the first, and an
    intent never stands beside an older notice: a run cut short after the intent is never
    taken for having recorded that one (`complete_cut_short` counted it again, issue 26).
    A kill between the line and the clearing leaves the notice; the next run ends it again.
    A `write` that raises `OutsideError` gives no fresh notice; a history that cannot forget
    the notice is a `failed` outcome, returned, and no fresh notice either.
    """
    if session is None or session.warned_at is None or history is None:
        return None
    message = f"the notice of {iso(session.warned_at)} no longer counts: a fresh notice follows"
    write(d, act.Outcome(d.subject, audit.CLEARED, True, message), session)
    try:
        history.clear_notice(d.subject)
    except sqlite3.Error as exc:
        return act.Outcome(d.subject, "failed", False, f"cannot clear its stale notice: {exc}")
    return None


def _gives_notice(d: Decision) -> bool:
    """A first notice this run will try to give (what `_act_one` hands to `give_notice`)."""
    return d.action is Action.WARN and d.refused is None and d.warned_at is None


def _act_one(
    d: Decision,
    result: ReapResult,
    config: HostConfig,
    settings: ReapSettings,
    actor: identity.Actor,
    kill_unmanaged: bool,
    live: Live,
    history: History | None,
    session: Session | None,
    pod_uids: set[str],
) -> act.Outcome | None:
    if d.action is Action.REPORT_UNMANAGED:
        if kill_unmanaged:
            return act.kill_unmanaged(d, actor, settings.kill_timeout_s, live.proc_root)
        return None
    if d.action not in (Action.WARN, Action.REAP):
        return None
    if d.refused is not None:  # judged once, by `judge`, for the dry run and for --yes alike
        return act.Outcome(d.subject, "skipped", True, d.refused)
    if d.action is Action.WARN:
        if d.warned_at is not None:
            return None  # warned before; its grace period is still running
        created = session.created_at if session else None
        return give_notice(
            d, config, settings, history, created, result.evidence.collected_at,
            result.evidence.host,
        )  # fmt: skip
    back = owner_back(d, config, settings, live, pod_uids)
    if back is not None:
        return act.Outcome(d.subject, "skipped", True, f"not torn down: {back}")
    outcome = act.teardown(d, config, live.down)
    if outcome.ok and history is not None:
        history.clear_notice(d.subject)
    return outcome


def owner_back(
    d: Decision, config: HostConfig, settings: ReapSettings, live: Live, pod_uids: set[str]
) -> str | None:
    """Read the session's live signals once more, just before `sky down`.

    The evidence can be minutes old by the third teardown of a run: an owner who attached
    or started GPU work meanwhile keeps the session. Unknown counts as back.

    A session judged over Prometheus (`d.node`) cannot be checked so from here: its pod's
    processes are another host's, and a node's exported SSH count is minutes old.
    """
    if d.node is not None:
        return (
            f"it runs on {d.node}, whose SSH/IDE state and GPUs this host cannot read just "
            f"before a teardown: on {d.node}, `DESKGPU_TELEMETRY=nvml deskgpu reap --yes` "
            "checks and tears it down"
        )
    ssh = gather.attached_now(pod_uids, live.proc_root)
    if ssh is None:
        return "its SSH/IDE state cannot be read now"
    if ssh > 0:
        return "an SSH/IDE session attached just now"
    util = live.utilization(config)
    for gpu in d.held_gpus:  # its processes' GPUs and those allocated to it
        now = util.get(gpu)
        if now is None:
            return f"GPU {gpu} cannot be read now"
        if now >= settings.util_threshold_pct:
            return f"{now:.0f}% GPU on GPU {gpu} just now"
    return None


def give_notice(
    decision: Decision,
    config: HostConfig,
    settings: ReapSettings,
    history: History | None,
    created_at: float | None,
    now: float,
    host: str,
) -> act.Outcome:
    """Run the notify hook, then record the first notice (the grace clock starts).

    A hook that fails or times out records nothing: the owner may not have been told, so
    the grace period does not start; the outcome is `failed` and the next run tries again.
    """
    if history is None:
        return act.Outcome(
            decision.subject, "failed", False, "cannot record the notice: no history"
        )
    after = now + settings.grace_s
    warned = replace(decision, reap_after=after)
    message = act.notice_text(warned, host, config.checkpoint_root)
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
    if error:
        return act.Outcome(
            decision.subject, "failed", False, f"{error}; no notice recorded, grace not started"
        )
    history.record_notice(Notice(decision.subject, decision.owner, created_at, now, after, message))
    text = f"notice recorded; torn down after {iso(after)} if still idle"
    return act.Outcome(decision.subject, "warned", True, text)
