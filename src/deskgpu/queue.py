"""One look at the box for `deskgpu queue`: GPUs first, SkyPilot alongside, joined into a Snapshot.

The GPU half (NVML + /proc + kube pods) takes well under a second; the SkyPilot half is a
plain-HTTP request to the API server's guard (`skyapi.fetch_queue`, no `import sky`; SkyPilot's
own two requests where the guard cannot answer) that a busy server may answer slowly. So
SkyPilot runs in a daemon thread from the start, `on_gpus` is called as soon as the GPU half
is known (the CLI paints it), and a SkyPilot that does not answer in time becomes a one-line
error, never a hang or a crash.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deskgpu import attribution, frontends
from deskgpu.config import HostConfig
from deskgpu.config.telemetry import PROMETHEUS
from deskgpu.config.telemetry import source as telemetry_source
from deskgpu.deadline import Deadline, abandon
from deskgpu.errors import DeskgpuError, UsageError
from deskgpu.recorded import read_document
from deskgpu.snapshot import (
    ACTIVE_STATES,
    QUEUED,
    SOURCE_PROMETHEUS,
    AllocationView,
    Cluster,
    NvmlView,
    ReapNotice,
    SessionUse,
    SkyView,
    Snapshot,
    SnapshotFormatError,
    current_notices,
    is_zombie_suspect,
    session_use,
)

SKY_TIMEOUT_S = 30.0
# The live fetch ends at the deadline on its own; this covers turning its answer into data.
_JOIN_SLACK_S = 0.5


@dataclass
class Sources:
    """Where each half comes from; tests and `bench/` swap these, the CLI uses the defaults."""

    read_nvml: Callable[[], NvmlView] | None = None
    # Every node's GPUs from Prometheus (`telemetry:` in the host config); None: the live read.
    read_prometheus: Callable[[HostConfig], NvmlView] | None = None
    fetch_sky: Callable[[HostConfig], SkyView] | None = None
    fetch_pods: Callable[[], attribution.PodIndex] | None = None
    # GPU allocation (the kubelet's pod-resources socket under `kubelet_root`, else the
    # pods' environments under `proc_root`); replaced only to inject a failure.
    read_allocation: Callable[[Snapshot, attribution.PodIndex], AllocationView] | None = None
    read_notices: Callable[[HostConfig], list[ReapNotice]] | None = None
    proc_root: Path = attribution.PROC
    kubelet_root: Path = attribution.KUBELET


def take(
    config: HostConfig,
    sources: Sources | None = None,
    on_gpus: Callable[[Snapshot], None] | None = None,
    sky_timeout_s: float = SKY_TIMEOUT_S,
    require_gpus: bool = False,
    deadline: Deadline | None = None,
) -> Snapshot:
    """Look at the box once. Never raises for an outside failure: it becomes data.

    SkyPilot's half is done by `deadline` (default: `sky_timeout_s` from now), or missing
    with a line that says so; the wait for it never outlasts the deadline.

    `require_gpus` (reap, observe: useless without GPU readings) reads the GPUs before
    SkyPilot is asked, and without them does not ask it at all: a host without a driver
    fails in a second, not after an `import sky` and an API server's timeout.
    """
    src = sources or Sources()
    deadline = deadline or Deadline.after(sky_timeout_s)
    fetch_sky = src.fetch_sky or functools.partial(_live_sky, deadline=deadline)
    sky_result: list[SkyView] = []
    worker = threading.Thread(
        target=lambda: sky_result.append(_safe_sky(fetch_sky, config)),
        name="deskgpu-sky",
        daemon=True,  # a hung API server must not keep the process alive
    )
    snap = Snapshot(
        taken_at=time.time(),
        host=socket.gethostname(),
        frontend_gives_up_after_s=config.frontend_gives_up_after_s,
    )
    if not require_gpus:
        worker.start()
    cluster_wide = telemetry_source(config.telemetry) == PROMETHEUS
    if cluster_wide:
        read = src.read_prometheus or functools.partial(_live_prometheus, deadline=deadline)
        snap.nvml = _safe_prometheus(read, config)
    else:
        snap.nvml = (src.read_nvml or _live_nvml)()
    if require_gpus:
        if not snap.nvml.available:
            snap.sky = SkyView(available=False, error="not asked: no GPU readings")
            return snap
        worker.start()
    if cluster_wide:  # holders and allocations are dcgm-exporter's pod labels
        from deskgpu.telemetry import gpus as telemetry_gpus

        snap.allocation = telemetry_gpus.allocation(snap.nvml)
    else:
        pods = attribution.PodIndex()
        if any(p.holder is None for gpu in snap.nvml.gpus for p in gpu.processes):
            pods = attribute_gpus(snap, src)
        if snap.nvml.available and snap.nvml.gpus:
            read_allocation(snap, src, pods)
    if on_gpus is not None:
        on_gpus(snap)
    snap.notices, snap.notices_error = _safe_notices(src.read_notices or _live_notices, config)

    worker.join(deadline.left() + _JOIN_SLACK_S)
    if sky_result:
        snap.sky = sky_result[0]
    else:
        abandon(worker)  # the process must not wait for it on the way out
        snap.sky = SkyView(
            available=False,
            error=f"SkyPilot API server did not answer within {deadline.budget_s:g} s",
        )
    attribution.link_skypilot(snap)
    return snap


def attribute_gpus(snap: Snapshot, src: Sources) -> attribution.PodIndex:
    pids = {
        p.pid
        for gpu in snap.nvml.gpus
        for p in gpu.processes
        if p.holder is None and p.pid is not None
    }
    infos = [attribution.read_proc(pid, src.proc_root) for pid in pids]
    if any(info.pod_uid for info in infos):
        pods = (src.fetch_pods or attribution.pods_from_kube)()
    else:
        pods = attribution.PodIndex()
    attribution.attribute(snap, pods, src.proc_root, src.kubelet_root)
    return pods


def read_allocation(snap: Snapshot, src: Sources, pods: attribution.PodIndex) -> None:
    """Which pod each GPU is allocated to; a failure to read is a note, never an error."""
    from deskgpu import allocation

    if src.read_allocation is not None:
        view = src.read_allocation(snap, pods)
    else:
        view = allocation.read(snap.nvml.gpus, pods, src.proc_root, src.kubelet_root)
    allocation.apply(snap, view, pods)
    if view.source is None and any(g.is_free for g in snap.nvml.gpus):
        snap.nvml.notes.append(
            f"GPU allocation unknown ({view.note or 'not readable'}): a GPU shown free may "
            "be allocated to an idle pod"
        )


def _live_prometheus(config: HostConfig, deadline: Deadline) -> NvmlView:
    from deskgpu.telemetry import gpus as telemetry_gpus
    from deskgpu.telemetry.promapi import Prometheus

    assert config.telemetry is not None
    return telemetry_gpus.read(config, Prometheus(config.telemetry.prometheus, deadline))


def _safe_prometheus(read: Callable[[HostConfig], NvmlView], config: HostConfig) -> NvmlView:
    """Prometheus unreadable is a GPU half that says why, as NVML's missing driver is."""
    try:
        return read(config)
    except DeskgpuError as exc:
        return NvmlView(available=False, error=" ".join(exc.lines()), source=SOURCE_PROMETHEUS)
    except Exception as exc:  # an answer no parser expected: the SkyPilot half still counts
        return NvmlView(
            available=False,
            error=f"Prometheus: {type(exc).__name__}: {exc}",
            source=SOURCE_PROMETHEUS,
        )


def _live_nvml() -> NvmlView:
    from deskgpu import nvml

    return nvml.read()


def _live_sky(config: HostConfig, deadline: Deadline) -> SkyView:
    from deskgpu.skypilot import sdk as skyapi

    view: SkyView = skyapi.fetch_queue(config, deadline=deadline)
    return view


def _live_notices(config: HostConfig) -> list[ReapNotice]:
    """The reap history's pending notices (stdlib sqlite3, read-only; no SkyPilot)."""
    from deskgpu.state.history import read_notices

    return [
        ReapNotice(
            cluster=n.cluster,
            owner=n.owner,
            warned_at=n.warned_at,
            reap_after=n.reap_after,
            message=n.message,
            created_at=n.created_at,
        )
        for n in read_notices(config.reap_settings.history_file)
    ]


def _safe_notices(
    read: Callable[[HostConfig], list[ReapNotice]], config: HostConfig
) -> tuple[list[ReapNotice], str | None]:
    """Notices are an extra: no history, or one this user may not read, is none (silently);
    a broken one, or a bad `reap:` config section, is none plus a note."""
    from deskgpu.state.history import HistoryDenied

    try:
        return read(config), None
    except HistoryDenied:
        return [], None
    except DeskgpuError as exc:
        return [], " ".join(exc.lines())
    except Exception as exc:  # an extra must never take the GPU and job tables down with it
        return [], f"{type(exc).__name__}: {exc}"


def _safe_sky(fetch: Callable[[HostConfig], SkyView], config: HostConfig) -> SkyView:
    try:
        return fetch(config)
    except Exception as exc:  # the thread must hand back data, not die silently
        return SkyView(available=False, error=f"SkyPilot failed: {type(exc).__name__}: {exc}")


def load(path: Path) -> Snapshot:
    """A recorded snapshot (`--record` or `--json` output); a bad file is a usage error."""
    try:
        return Snapshot.from_dict(read_document(path, "snapshot"))
    except SnapshotFormatError as exc:
        raise UsageError(f"{path}: {exc}") from None


def for_user(snap: Snapshot, user: str) -> Snapshot:
    """Only `user`'s jobs and sessions; every GPU stays (free GPUs are everyone's business)."""
    sky = replace(
        snap.sky,
        jobs=[j for j in snap.sky.jobs if j.user == user],
        clusters=[c for c in snap.sky.clusters if c.user == user],
    )
    return replace(snap, sky=sky, notices=[n for n in snap.notices if n.owner == user])


@dataclass(frozen=True)
class SessionRow:
    cluster: Cluster
    use: SessionUse
    zombie_suspect: bool


@dataclass
class Summary:
    """The facts behind the one-line summary (and `summary` in the JSON document)."""

    gpus_total: int | None
    gpus_free: int | None
    gpus_lost: int
    queued: int | None  # None: SkyPilot did not answer, so the queue is unknown
    running: int | None
    zombie_suspects: list[str] = field(default_factory=list)
    reap_notices: list[str] = field(default_factory=list)  # sessions warned by reap
    gpus_allocated_idle: int = 0  # held through the device plugin, no process on them
    # Sessions a front end launched: {cluster, user, via, frontend_job, likely_orphan}.
    frontend_sessions: list[dict[str, Any]] = field(default_factory=list)
    likely_orphans: list[str] = field(default_factory=list)

    def line(self) -> str:
        parts = []
        if self.gpus_total is None:
            parts.append("GPUs unknown")
        else:
            parts.append(f"{self.gpus_free} of {self.gpus_total} GPUs free")
            if self.gpus_allocated_idle:
                parts.append(f"{self.gpus_allocated_idle} allocated, idle")
            if self.gpus_lost:
                parts.append(f"{self.gpus_lost} lost")
        if self.queued is None:
            parts.append("queue unknown")
        else:
            parts.append(f"{self.queued} queued")
            n = len(self.zombie_suspects)
            parts.append(f"{n} zombie suspect{'' if n == 1 else 's'}")
        if self.reap_notices:
            n = len(self.reap_notices)
            parts.append(f"{n} reap notice{'' if n == 1 else 's'}")
        if self.likely_orphans:
            n = len(self.likely_orphans)
            parts.append(f"{n} likely orphan{'' if n == 1 else 's'}")
        return " · ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "gpus_total": self.gpus_total,
            "gpus_free": self.gpus_free,
            "gpus_lost": self.gpus_lost,
            "gpus_allocated_idle": self.gpus_allocated_idle,
            "queued": self.queued,
            "running": self.running,
            "zombie_suspects": list(self.zombie_suspects),
            "reap_notices": list(self.reap_notices),
            "frontend_sessions": [dict(f) for f in self.frontend_sessions],
            "likely_orphans": list(self.likely_orphans),
            "line": self.line(),
        }


def sessions(snap: Snapshot) -> list[SessionRow]:
    rows = []
    for cluster in snap.sky.clusters:
        use = session_use(snap, cluster)
        rows.append(SessionRow(cluster, use, is_zombie_suspect(cluster, use, snap.taken_at)))
    return rows


def summarize(snap: Snapshot) -> Summary:
    gpus = snap.nvml.gpus
    known = snap.nvml.available
    queued = [j for j in snap.sky.jobs if j.state == QUEUED]
    queued_clusters = [c for c in snap.sky.clusters if c.state == QUEUED]
    going = tuple(state for state in ACTIVE_STATES if state != QUEUED)
    return Summary(
        gpus_total=len(gpus) if known else None,
        gpus_free=sum(1 for g in gpus if g.is_free) if known else None,
        gpus_lost=sum(1 for g in gpus if g.lost),
        gpus_allocated_idle=sum(1 for g in gpus if g.allocated_idle),
        queued=len(queued) + len(queued_clusters) if snap.sky.available else None,
        running=sum(1 for j in snap.sky.jobs if j.state in going)
        + sum(1 for c in snap.sky.clusters if c.state in going)
        if snap.sky.available
        else None,
        zombie_suspects=[row.cluster.name for row in sessions(snap) if row.zombie_suspect],
        reap_notices=[n.cluster for n in current_notices(snap)],
        frontend_sessions=frontend_sessions(snap),
        likely_orphans=[o.cluster for o in orphans(snap)],
    )


def orphans(snap: Snapshot) -> list[frontends.Orphan]:
    return frontends.likely_orphans(
        snap.sky.clusters, snap.taken_at, snap.frontend_gives_up_after_s
    )


def frontend_sessions(snap: Snapshot) -> list[dict[str, Any]]:
    orphaned = {o.cluster for o in orphans(snap)}
    out = []
    for c in snap.sky.clusters:
        where = frontends.via(c.labels)
        if where is not None:
            out.append(
                {
                    "cluster": c.name,
                    "user": c.user,
                    "via": where.account,
                    "frontend_job": where.job,
                    "state": c.state,
                    "likely_orphan": c.name in orphaned,
                }
            )
    return out


def document(snap: Snapshot) -> dict[str, Any]:
    """The `--json` document: the snapshot (readable back by `--snapshot`) plus its summary."""
    doc = snap.to_dict()
    doc["summary"] = summarize(snap).as_dict()
    return doc


def gpu_problems(snap: Snapshot) -> list[str]:
    """One line per problem of the GPU half (missing, or partial), for stderr."""
    lines = [] if snap.nvml.available else [f"GPUs: {snap.nvml.error or 'unavailable'}"]
    return lines + [f"GPUs: {note}" for note in snap.nvml.notes]


def sky_problems(snap: Snapshot) -> list[str]:
    lines = [] if snap.sky.available else [f"SkyPilot: {snap.sky.error or 'unavailable'}"]
    return lines + [f"SkyPilot: {note}" for note in snap.sky.notes]


def how_read(snap: Snapshot) -> str | None:
    """How the SkyPilot half was read, as one line (`queue --verbose`); None: not read."""
    from deskgpu.snapshot import VIA_GUARD, VIA_SKYPILOT

    if snap.sky.via == VIA_GUARD:
        return "SkyPilot: read in one request, from the guard's queue endpoint"
    if snap.sky.via == VIA_SKYPILOT:
        why = f" ({snap.sky.fallback})" if snap.sky.fallback else ""
        return f"SkyPilot: read with SkyPilot's own /status and /jobs/queue/v2{why}"
    return None


def notice_problems(snap: Snapshot) -> list[str]:
    return [f"reap notices: {snap.notices_error}"] if snap.notices_error else []


def problems(snap: Snapshot) -> list[str]:
    return gpu_problems(snap) + sky_problems(snap) + notice_problems(snap)


def both_missing(snap: Snapshot) -> bool:
    return not snap.nvml.available and not snap.sky.available
