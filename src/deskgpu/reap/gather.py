"""Evidence from the live box: a `Snapshot` (GPUs, holders, SkyPilot) + /proc + the history.

The snapshot (queue's `survey.take`) says which processes hold which GPU for which
cluster. What reap adds, per session pod: SSH/IDE connections (sshd's per-connection
processes `sshd: user@pts/N` / `user@notty`, or any process with a terminal) and the pod's
cumulative CPU time from its cgroup; both read from the host's /proc and /sys/fs/cgroup,
which needs root for other users' pods. Unreadable means None ("unknown"), never idle.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import TypeVar

from deskgpu.attribution import LABEL_SKY_CLUSTER, PodIndex, pod_processes
from deskgpu.config.reap import ReapSettings
from deskgpu.errors import OutsideError
from deskgpu.labels import LABEL_USER
from deskgpu.reap.evidence import ActivitySample, Evidence, GpuSample, Session, UnmanagedProcess
from deskgpu.reap.history_samples import HistorySamples
from deskgpu.reap.idle import SessionSamples
from deskgpu.reap.rule import decide_session
from deskgpu.snapshot import (
    ALLOCATION_ENVIRON,
    ALLOCATION_POD_RESOURCES,
    HOLDER_SKYPILOT,
    HOLDER_UNMANAGED,
    RUNNING,
    SOURCE_PROMETHEUS,
    STARTING,
    Snapshot,
)
from deskgpu.state.history import History, SessionSample

PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")
_Sample = TypeVar("_Sample", GpuSample, ActivitySample)
_SSHD_CONN = re.compile(r"^sshd(?:-session)?: \S+@(?:pts/\d+|notty)")


@dataclass
class LiveSession:
    """One session as seen now, before the history is added."""

    cluster: str
    owner: str
    kind: str
    created_at: float | None
    status: str
    labels: dict[str, str]
    on_cloud: str | None
    jobs_running: int | None = None
    jobs_pending: int | None = None
    pod_uids: set[str] = field(default_factory=set)
    pod_present: bool = True
    gpus: dict[int, tuple[float | None, float]] = field(default_factory=dict)  # util, VRAM
    used: set[int] = field(default_factory=set)  # GPUs its processes are on
    allocated: set[int] | None = None  # through the device plugin; None: unknown
    allocation_source: str | None = None
    ssh_sessions: int | None = None
    cpu_total_s: float | None = None
    # The nodes its GPUs are on (Prometheus telemetry; empty: this host). GPUs are told
    # apart by index on one node: a session on several is never judged idle (`spans_nodes`).
    nodes: set[str] = field(default_factory=set)

    @property
    def vram_mib(self) -> float:
        return sum(v for _, v in self.gpus.values())

    @property
    def node(self) -> str | None:
        return next(iter(self.nodes)) if len(self.nodes) == 1 else None

    @property
    def spans_nodes(self) -> bool:
        return len(self.nodes) > 1

    def on_node(self, node: str | None) -> None:
        if node is not None:
            self.nodes.add(node)

    def sample(self) -> SessionSample:
        # One index on two nodes is two GPUs: no reading of a session on several proves idle.
        unknown = self.spans_nodes
        rows = tuple((g, None if unknown else u, v) for g, (u, v) in sorted(self.gpus.items()))
        return SessionSample(self.cluster, rows, self.ssh_sessions, self.cpu_total_s)


@dataclass
class LiveView:
    sessions: list[LiveSession]
    unmanaged: list[UnmanagedProcess]
    notes: list[str]


def live_view(
    snap: Snapshot,
    pods: PodIndex | None = None,
    proc_root: Path = PROC,
    cgroup_root: Path = CGROUP,
) -> LiveView:
    """Sessions (interactive clusters and running managed jobs), their GPUs, pods and activity."""
    notes = [f"GPUs: {n}" for n in snap.nvml.notes] + [f"SkyPilot: {n}" for n in snap.sky.notes]
    if not snap.nvml.available:
        raise OutsideError(f"no GPU readings: {snap.nvml.error or 'NVML unavailable'}")
    if not snap.sky.available:
        raise OutsideError(f"no SkyPilot view: {snap.sky.error or 'API server unavailable'}")
    by_cloud: dict[str, LiveSession] = {}
    sessions: list[LiveSession] = []
    for c in snap.sky.clusters:
        s = LiveSession(
            cluster=c.name,
            owner=c.labels.get(LABEL_USER) or c.user or "?",
            kind="interactive" if c.interactive else "batch",
            created_at=c.launched_at,
            status=c.sky_status or c.state,
            labels=dict(c.labels),
            on_cloud=c.cluster_name_on_cloud,
        )
        sessions.append(s)
        if c.cluster_name_on_cloud:
            by_cloud[c.cluster_name_on_cloud] = s
    for j in snap.sky.jobs:
        if j.state not in (RUNNING, STARTING):
            continue
        name = j.cluster_name_on_cloud or f"managed-job-{j.id}"
        if any(s.cluster == name for s in sessions):  # one name, two records: never guess
            notes.append(f"managed job {j.id} is named {name} like a cluster: left out")
            continue
        s = LiveSession(
            cluster=name,
            owner=j.labels.get(LABEL_USER) or j.user or "?",
            kind="batch",
            created_at=j.started_at or j.submitted_at,
            status=j.sky_status or j.state,
            labels=dict(j.labels),
            on_cloud=j.cluster_name_on_cloud,
            jobs_running=1 if j.state == RUNNING else 0,
            jobs_pending=0 if j.state == RUNNING else 1,
        )
        sessions.append(s)
        if j.cluster_name_on_cloud:
            by_cloud[j.cluster_name_on_cloud] = s
    by_name = {s.cluster: s for s in sessions}
    unmanaged: list[UnmanagedProcess] = []
    for gpu in snap.nvml.gpus:
        for proc in gpu.processes:
            h = proc.holder
            if h is None:
                continue
            if h.kind == HOLDER_UNMANAGED:
                if proc.pid is None:  # a pod that is not SkyPilot's: not a session, no PID
                    notes.append(f"{gpu.where}: held by {h.label}, which SkyPilot does not list")
                    continue
                if gpu.node is None:
                    uid, started, kthread = _proc_identity(proc_root, proc.pid)
                else:  # seen through Prometheus: its /proc is that node's, not ours
                    uid, started, kthread = None, None, False
                unmanaged.append(
                    UnmanagedProcess(
                        node=gpu.node,
                        pid=proc.pid,
                        user=h.unix_user or "?",
                        command=h.command or "?",
                        gpu=gpu.index,
                        vram_mib=proc.used_memory_mib,
                        util_pct=gpu.utilization_gpu_pct,
                        process_type="graphics" if proc.type == "graphics" else "compute",
                        uid=uid,
                        start_time=started,
                        kernel_thread=kthread,
                    )
                )
                continue
            if h.kind != HOLDER_SKYPILOT:
                continue
            owner = by_cloud.get(h.cluster_name_on_cloud or "") or by_name.get(h.cluster or "")
            if owner is None:
                who = f"PID {proc.pid}" if proc.pid is not None else f"pod {h.pod_name}"
                notes.append(f"{gpu.where}: {who} is in a pod SkyPilot does not list")
                continue
            owner.on_node(gpu.node)
            util = None if gpu.utilization_gpu_pct is None else float(gpu.utilization_gpu_pct)
            _, held = owner.gpus.get(gpu.index, (util, 0.0))
            owner.gpus[gpu.index] = (util, held + (proc.used_memory_mib or 0.0))
            owner.used.add(gpu.index)
            if h.pod_uid:
                owner.pod_uids.add(h.pod_uid)
    notes += _allocations(snap, sessions, by_cloud)
    if pods is not None and pods.note is None:
        for s in sessions:
            found = {
                uid for uid, p in pods.pods.items() if p.labels.get(LABEL_SKY_CLUSTER) == s.on_cloud
            }
            s.pod_uids |= found
            s.pod_present = bool(s.pod_uids) or s.on_cloud is None
    local = [s for s in sessions if not s.nodes]
    if snap.nvml.source == SOURCE_PROMETHEUS:
        notes += _exported_activity(snap, [s for s in sessions if s.nodes])
    else:
        local = sessions
    notes += _read_activity(local, proc_root, cgroup_root)
    return LiveView(sessions, unmanaged, notes)


def _exported_activity(snap: Snapshot, sessions: list[LiveSession]) -> list[str]:
    """SSH and CPU of sessions on the cluster's nodes, as each node's observe exported them
    (its own /proc; this host cannot read another's). Not exported: unknown, never idle."""
    found = {(a.node, a.cluster_name_on_cloud): a for a in snap.nvml.activity}
    notes = []
    for s in sessions:  # a session on several nodes is never judged: its SSH stays unknown
        seen = None if s.spans_nodes else found.get((s.node or "", s.on_cloud or ""))
        if seen is None:
            where = ", ".join(sorted(s.nodes))
            notes.append(f"{s.cluster}: no SSH/CPU reading from {where}'s observe: unknown")
            continue
        s.ssh_sessions, s.cpu_total_s = seen.ssh_sessions, seen.cpu_total_s
    return notes


ALLOCATION_SOURCES = {
    ALLOCATION_POD_RESOURCES: "the kubelet's pod-resources API (List)",
    ALLOCATION_ENVIRON: "NVIDIA_VISIBLE_DEVICES in /proc/<pid>/environ of the pods' processes",
}


def _allocations(
    snap: Snapshot, sessions: list[LiveSession], by_cloud: dict[str, LiveSession]
) -> list[str]:
    """Each session's allocated GPUs (and a 0 MiB row for each one its processes are not
    on: the history must show those GPUs idle too); notes say where they were read."""
    view = snap.allocation
    if view.source is None:
        why = view.note or "not read"
        return [
            f"GPU allocation unknown ({why}): sessions are judged on the VRAM their processes "
            "hold (min_vram_mib)"
        ]
    notes = [f"GPU allocation: from {ALLOCATION_SOURCES.get(view.source, view.source)}"]
    util = {
        (g.node, g.index): None if g.utilization_gpu_pct is None else float(g.utilization_gpu_pct)
        for g in snap.nvml.gpus
    }
    unsure: set[str] = set()
    for pa in view.pods:
        owner = by_cloud.get(pa.cluster_name_on_cloud or "")
        if owner is None and pa.pod_uid:
            owner = next((s for s in sessions if pa.pod_uid in s.pod_uids), None)
        if owner is None:
            continue
        if pa.unmapped:
            unsure.add(owner.cluster)
            notes.append(
                f"{owner.cluster}: allocated device(s) {', '.join(pa.unmapped)} are no whole GPU "
                "NVML lists (MIG?): its allocation is not used as evidence"
            )
        owner.allocated = (owner.allocated or set()) | set(pa.gpus)
        owner.allocation_source = view.source
        owner.on_node(pa.node)
        if pa.pod_uid:
            owner.pod_uids.add(pa.pod_uid)
    for s in sessions:
        if s.cluster in unsure:
            s.allocated, s.allocation_source = None, None
        if s.spans_nodes:
            notes.append(
                f"{s.cluster} holds GPUs on {len(s.nodes)} nodes ({', '.join(sorted(s.nodes))}): "
                "reap judges a session on one node only, so it is kept"
            )
        for index in sorted(s.allocated or ()):
            s.gpus.setdefault(index, (util.get((s.node, index)), 0.0))
    return notes


PF_KTHREAD = 0x00200000  # /proc/<pid>/stat `flags`: a kernel thread


def _proc_identity(proc_root: Path, pid: int) -> tuple[int | None, int | None, bool]:
    """(owner uid, start time in clock ticks, kernel thread?) of a host PID; None: unreadable."""
    base = proc_root / str(pid)
    try:
        uid: int | None = base.stat().st_uid
    except OSError:
        uid = None
    try:
        fields = (base / "stat").read_text().rsplit(")", 1)[-1].split()
        return uid, int(fields[19]), bool(int(fields[6]) & PF_KTHREAD)
    except (OSError, IndexError, ValueError):
        return uid, None, False


def attached_now(pod_uids: Iterable[str], proc_root: Path = PROC) -> int | None:
    """SSH/IDE connections into these pods right now (the check just before a teardown).

    The same reading as an observation's; None when no process of the pods is readable.
    """
    probe = LiveSession("", "", "interactive", None, "", {}, None, pod_uids=set(pod_uids))
    _read_activity([probe], proc_root, CGROUP, cpu=False)
    return probe.ssh_sessions


def _read_activity(
    sessions: list[LiveSession], proc_root: Path, cgroup_root: Path, *, cpu: bool = True
) -> list[str]:
    """SSH connections and cumulative CPU per pod, from one pass over /proc; notes on gaps."""
    wanted = {uid: s for s in sessions for uid in s.pod_uids}
    notes: list[str] = []
    if not wanted:
        return notes
    ssh: dict[str, int] = dict.fromkeys(wanted, 0)
    tty: set[str] = set()
    cgroup_of: dict[str, str] = {}
    readable: set[str] = set()
    try:
        processes = list(pod_processes(proc_root))
    except OSError as exc:
        return [f"cannot list {proc_root} ({exc.strerror or exc}): SSH and CPU use unknown"]
    for entry, uid, text in processes:
        if uid not in wanted:
            continue
        cgroup_of.setdefault(uid, text)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        readable.add(uid)
        if _SSHD_CONN.match(cmdline):
            ssh[uid] += 1
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 4 and fields[4] not in ("0", "-1"):  # tty_nr
            tty.add(uid)
    for s in sessions:
        uids = [u for u in s.pod_uids if u in readable]
        if not uids:
            if s.pod_uids and cpu:
                notes.append(f"{s.cluster}: no process of its pod is readable: SSH and CPU unknown")
            continue
        count = sum(ssh[u] for u in uids)
        s.ssh_sessions = count if count or not any(u in tty for u in uids) else 1
        if not cpu:
            continue
        totals = [_pod_cpu_s(cgroup_of[u], u, cgroup_root) for u in uids if u in cgroup_of]
        s.cpu_total_s = None if not totals or None in totals else sum(t or 0.0 for t in totals)
        if s.cpu_total_s is None:
            notes.append(
                f"{s.cluster}: the pod's CPU use is unreadable under {cgroup_root}: "
                "CPU unknown (it never counts as idle; `reap.cpu_busy_pct: null` ignores CPU)"
            )
    return notes


def _pod_cpu_s(cgroup_text: str, uid: str, cgroup_root: Path) -> float | None:
    """Cumulative CPU seconds of the pod's cgroup (v2 `cpu.stat`, else v1 `cpuacct.usage`)."""
    token = uid.replace("-", "_")
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        segments = path.strip("/").split("/")
        cut = next((i for i, seg in enumerate(segments) if uid in seg or token in seg), None)
        if cut is None:
            continue
        pod_path = "/".join(segments[: cut + 1])
        try:
            if hierarchy == "0" and controllers == "":
                text = (cgroup_root / pod_path / "cpu.stat").read_text()
                for stat_line in text.splitlines():
                    if stat_line.startswith("usage_usec "):
                        return int(stat_line.split()[1]) / 1e6
            elif "cpuacct" in controllers.split(","):
                usage = (cgroup_root / controllers / pod_path / "cpuacct.usage").read_text()
                return int(usage.strip()) / 1e9
        except (OSError, ValueError):
            continue
    return None


def build_evidence(
    view: LiveView,
    history: History,
    settings: ReapSettings,
    now: float,
    *,
    host: str,
    source: str = "history",
    notes: Iterable[str] = (),
    samples: bool = True,
) -> Evidence:
    """Live sessions + their history samples + notices -> an evidence document.

    Without `samples` the sessions hold none (nor `gpus_earlier`): the rule then asks
    `history_samples` about them, and only a document with them is ever written."""
    since = now - settings.retention_s
    read = history.samples([s.cluster for s in view.sessions], since) if samples else {}
    sessions = []
    for s in view.sessions:
        gpu_rows, act_rows = read.get(s.cluster, ([], []))
        floor = s.created_at if s.created_at is not None else since
        notice = history.notice(s.cluster, s.created_at)
        rows = _from(gpu_rows, floor)
        listed = s.used | (s.allocated or set())
        earlier = tuple(sorted({g.gpu for g in rows} - listed))
        sessions.append(
            Session(
                cluster=s.cluster,
                owner=s.owner,
                kind=s.kind,
                created_at=s.created_at,
                status=s.status,
                labels=s.labels,
                gpus=tuple(sorted(s.used)),
                allocated_gpus=None if s.allocated is None else tuple(sorted(s.allocated)),
                allocation_source=s.allocation_source,
                gpus_earlier=earlier,
                vram_mib=s.vram_mib,
                jobs_running=s.jobs_running,
                jobs_pending=s.jobs_pending,
                ssh_attached=None if s.ssh_sessions is None else s.ssh_sessions > 0,
                pod_present=s.pod_present,
                node=s.node,
                warned_at=notice.warned_at if notice else None,
                gpu_samples=rows,
                activity_samples=_from(act_rows, floor),
            )
        )
    return Evidence(
        collected_at=now,
        sessions=tuple(sessions),
        unmanaged=tuple(view.unmanaged),
        host=host,
        source=source,
        history_since=history.since(),
        notes=tuple(list(view.notes) + list(notes)),
    )


def _from(samples: list[_Sample], floor: float) -> tuple[_Sample, ...]:
    """The samples (oldest first, as the history reads them) from `floor` on."""
    return tuple(samples[bisect_left(samples, floor, key=itemgetter(0)) :])


def history_samples(
    history: History, evidence: Evidence, settings: ReapSettings
) -> dict[str, HistorySamples]:
    """What the rule asks of each session's samples, answered by the history: for evidence
    built without them (`build_evidence(samples=False)`), while `history` is open."""
    since = evidence.collected_at - settings.retention_s
    return {s.cluster: HistorySamples(history, s, since) for s in evidence.sessions}


def check_jobs(
    evidence: Evidence,
    settings: ReapSettings,
    query: Callable[[str], tuple[int, int]],
    samples: Mapping[str, SessionSamples] | None = None,
) -> Evidence:
    """Ask SkyPilot for the job queue of each interactive session that would otherwise be a
    zombie (one request each: only candidates pay). A failed query leaves the count unknown,
    which keeps the session. `samples`: as `rule.decide` takes them."""
    sessions = []
    notes = list(evidence.notes)
    found = samples or {}
    for s in evidence.sessions:
        if s.kind == "interactive" and s.jobs_running is None:
            assumed = replace(s, jobs_running=0, jobs_pending=0)
            at = evidence.collected_at
            if decide_session(assumed, settings, at, found.get(s.cluster)).action.is_zombie:
                try:
                    running, pending = query(s.cluster)
                    s = replace(s, jobs_running=running, jobs_pending=pending)
                except OutsideError as exc:
                    notes.append(str(exc))
        sessions.append(s)
    return replace(evidence, sessions=tuple(sessions), notes=tuple(notes))
