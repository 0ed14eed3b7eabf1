"""The plain data behind `deskgpu queue` (and `deskgpu reap`): GPUs, who holds them, SkyPilot.

A `Snapshot` is what one look at the box saw. Live readers (`nvml`, `attribution`,
`skypilot.sdk`) fill it; `--record` writes `to_dict()`, `--snapshot` and the tests read it back
through `from_dict()`, so a recorded snapshot and a live one are the same object.

GPU readings are named after `nvidia-smi --query-gpu=` fields, units in the name. A reading
the GPU does not support is `None` (rendered `N/A`). No I/O and no foreign imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1
DOCUMENT_KIND = "deskgpu.queue/snapshot"

# deskgpu's states, whatever SkyPilot calls them (see `skyapi.job_state`/`cluster_state`).
QUEUED = "Queued"
STARTING = "Starting"
RUNNING = "Running"
DONE = "Done"
FAILED = "Failed"
CANCELLED = "Cancelled"
STOPPED = "Stopped"
STATES = (QUEUED, STARTING, RUNNING, DONE, FAILED, CANCELLED, STOPPED)
ACTIVE_STATES = (QUEUED, STARTING, RUNNING)

# Who holds a GPU process.
HOLDER_SKYPILOT = "skypilot"  # in a SkyPilot pod; user/cluster/job known as far as labels say
HOLDER_UNMANAGED = "unmanaged"  # a host process outside any SkyPilot pod
HOLDER_HIDDEN = "hidden"  # deskgpu could not see enough to say (permissions, namespaces)

# Throttle reasons kept (nvidia-smi `clocks_event_reasons.*`), coarse on purpose.
THROTTLE_THERMAL = "thermal"  # sw_thermal_slowdown | hw_thermal_slowdown
THROTTLE_POWER = "power"  # sw_power_cap | hw_power_brake_slowdown
THROTTLE_HW_SLOWDOWN = "hw_slowdown"  # hw_slowdown


class SnapshotFormatError(ValueError):
    """A recorded snapshot that this deskgpu cannot read."""


@dataclass
class Holder:
    """Who a GPU process belongs to, as far as this look could tell."""

    kind: str  # HOLDER_*
    user: str | None = None  # the researcher (deskgpu.io/user, skypilot-user) or Unix user
    cluster: str | None = None  # SkyPilot cluster name as `sky status` shows it
    cluster_name_on_cloud: str | None = None  # `skypilot-cluster` pod label
    job: str | None = None  # deskgpu job name (deskgpu.io/job)
    job_kind: str | None = None  # "batch" | "interactive" (deskgpu.io/kind)
    managed_job_id: int | None = None
    pod_uid: str | None = None
    pod_name: str | None = None
    namespace: str | None = None
    unix_user: str | None = None  # owner of /proc/<pid> (in a pod: usually root)
    command: str | None = None  # /proc/<pid>/cmdline, when readable
    note: str | None = None  # what is hidden, and why

    @property
    def label(self) -> str:
        """`alice/bert-finetune`, `unmanaged bob (python)`, `hidden`."""
        if self.kind == HOLDER_UNMANAGED:
            if self.unix_user is None and self.pod_name:  # a pod's allocation, no process
                return f"pod {self.namespace or '?'}/{self.pod_name}"
            who = self.unix_user or "?"
            cmd = _short_command(self.command)
            return f"unmanaged {who}" + (f" ({cmd})" if cmd else "")
        if self.kind == HOLDER_SKYPILOT:
            what = self.job or self.cluster or self.cluster_name_on_cloud or "pod"
            return f"{self.user or '?'}/{what}"
        if self.pod_uid:
            return f"hidden (pod {self.pod_uid[:8]})"
        return "hidden"


@dataclass
class GpuProcess:
    """One process on one GPU (`nvidia-smi --query-compute-apps=pid,used_memory`)."""

    # As NVML reports it: a host PID. None: a pod's processes together, as dcgm-exporter
    # reports a GPU's pod (Prometheus telemetry: no PIDs, only the pod and the GPU's VRAM).
    pid: int | None
    used_memory_mib: float | None = None  # None: not reported (e.g. MIG, Windows WDDM)
    type: str = "compute"  # "compute" | "graphics"
    holder: Holder | None = None


@dataclass
class Gpu:
    """One GPU, readings named like `nvidia-smi --query-gpu=` fields."""

    index: int  # on its node
    uuid: str | None = None
    name: str | None = None
    lost: bool = False  # fell off the bus / GPU is lost: no readings at all
    error: str | None = None  # why readings are missing
    memory_used_mib: float | None = None  # memory.used
    memory_total_mib: float | None = None  # memory.total
    utilization_gpu_pct: int | None = None  # utilization.gpu
    temperature_c: int | None = None  # temperature.gpu
    power_draw_w: float | None = None  # power.draw
    power_limit_w: float | None = None  # power.limit
    throttle_reasons: list[str] | None = None  # THROTTLE_*; None: not supported
    persistence_mode: bool | None = None  # persistence_mode
    mig_mode: bool | None = None  # mig.mode.current
    processes: list[GpuProcess] = field(default_factory=list)
    # The pod the device plugin allocated this GPU to (see `AllocationView`); None: none
    # known. Held even with no process on it: the scheduler gives it to nobody else.
    allocated_to: Holder | None = None
    # Added in schema 1 without a bump: the node it is on (Prometheus telemetry); None: the
    # host the snapshot was taken on (one box, NVML).
    node: str | None = None
    # Its node's exporter stopped answering: nothing about it is known now (never free,
    # never idle); `error` says since when and why.
    stale: bool = False

    @property
    def where(self) -> str:
        """`GPU 3`, or `lab-h100-2 GPU 3` on a cluster."""
        return f"{self.node} GPU {self.index}" if self.node else f"GPU {self.index}"

    @property
    def holders(self) -> list[Holder]:
        seen: dict[str, Holder] = {}
        for proc in self.processes:
            if proc.holder is not None:
                seen.setdefault(proc.holder.label, proc.holder)
        return list(seen.values())

    @property
    def is_free(self) -> bool:
        """No process on it, allocated to no pod, and not lost. Memory a driver context
        holds is not a user; a GPU allocated to an idle pod is held at 0 MiB."""
        return not self.lost and not self.stale and not self.processes and self.allocated_to is None

    @property
    def allocated_idle(self) -> bool:
        """Allocated to a pod through the device plugin, with no process on it."""
        return (
            not self.lost
            and not self.stale
            and not self.processes
            and self.allocated_to is not None
        )


NODE_FRESH = "fresh"  # its exporter answered within `telemetry.stale_after`
NODE_STALE = "stale"  # it did once; its last readings are older, or its exporter is down
NODE_MISSING = "missing"  # a node of `nodes:` Prometheus has never had a reading from


@dataclass
class NodeReading:
    """How one node's GPUs were read (Prometheus telemetry)."""

    name: str
    state: str  # NODE_*
    seen_at: float | None = None  # its newest GPU reading, unix seconds
    note: str | None = None  # why stale or missing, in the exporter's words
    # deskgpu's textfile on the node (host processes outside pods, SSH/CPU per session):
    # NODE_*, None where not asked.
    processes: str | None = None
    processes_note: str | None = None


@dataclass
class PodActivity:
    """A session pod's SSH/IDE connections and CPU time, as its node's `deskgpu observe`
    exported them (Prometheus telemetry); None: not readable there."""

    cluster_name_on_cloud: str
    node: str
    ssh_sessions: int | None = None
    cpu_total_s: float | None = None
    seen_at: float | None = None  # when that node's observe read them


SOURCE_PROMETHEUS = "prometheus"  # NvmlView.source; None: NVML on the snapshot's host


@dataclass
class NvmlView:
    """The GPU half: what NVML (or Prometheus, over every node) said, or why nothing."""

    available: bool
    error: str | None = None  # "no NVIDIA driver", "NVML failed: ..."
    driver_version: str | None = None
    gpus: list[Gpu] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # skipped PIDs, hidden details
    # Added in schema 1 without a bump: where the GPUs were read (SOURCE_PROMETHEUS; None:
    # NVML, as in older recordings) and, from Prometheus, each node's state.
    source: str | None = None
    nodes: list[NodeReading] = field(default_factory=list)
    activity: list[PodActivity] = field(default_factory=list)


ALLOCATION_POD_RESOURCES = "pod-resources"  # the kubelet's pod-resources socket (List)
ALLOCATION_ENVIRON = "environ"  # NVIDIA_VISIBLE_DEVICES in /proc/<pid>/environ
ALLOCATION_DCGM = "dcgm-exporter"  # the pod labels dcgm-exporter puts on a GPU's series


@dataclass
class PodAllocation:
    """The GPUs the device plugin gave one pod (all its containers together).

    `devices` are the device IDs as allocated (GPU UUIDs; `GPU-…::N` for a time-sliced
    replica, `MIG-…` for a MIG slice); `gpus` the indices of those that are whole GPUs this
    snapshot's NVML lists; `unmapped` the rest (a MIG slice, a GPU NVML did not list).
    """

    pod_uid: str | None = None
    pod_name: str | None = None
    namespace: str | None = None
    cluster_name_on_cloud: str | None = None  # SkyPilot's pod label, or the pod's name
    gpus: list[int] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    node: str | None = None  # the node its GPUs are on (Prometheus telemetry); None: this host


@dataclass
class AllocationView:
    """Which pods hold which GPUs through the device plugin, apart from their processes.

    `source` is where it was read (ALLOCATION_*), None when it could not be (`note` says
    why; reading either source needs root). Only pods listed in `pods` are known: a pod
    not listed has an unknown allocation, never "none".
    """

    source: str | None = None
    note: str | None = None
    pods: list[PodAllocation] = field(default_factory=list)


@dataclass
class Job:
    """A SkyPilot managed job (deskgpu's batch jobs)."""

    id: int
    name: str | None = None
    user: str | None = None
    state: str = QUEUED  # deskgpu state (STATES)
    sky_status: str | None = None  # SkyPilot's own status, e.g. STARTING
    reason: str | None = None  # why Queued/Failed, in SkyPilot's words
    queue_position: int | None = None  # 1 = next, among Queued jobs (where known)
    gpus: str | None = None  # "A6000:2"
    submitted_at: float | None = None  # unix seconds
    started_at: float | None = None
    ended_at: float | None = None
    cluster_name_on_cloud: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Cluster:
    """A SkyPilot cluster that is not a managed job's: an interactive session or a plain launch."""

    name: str
    user: str | None = None
    state: str = RUNNING
    sky_status: str | None = None  # INIT / UP / STOPPED
    reason: str | None = None
    gpus: str | None = None
    launched_at: float | None = None
    idle_since: float | None = None  # unix seconds; None: SkyPilot did not say
    autostop_min: int | None = None  # None: no autostop
    to_down: bool = False  # autostop tears it down (always, on Kubernetes)
    interactive: bool = True  # deskgpu.io/kind=interactive, or any non-deskgpu cluster
    cluster_name_on_cloud: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class SkyView:
    """The SkyPilot half: all users' managed jobs and clusters, or why it is missing."""

    available: bool
    endpoint: str | None = None
    error: str | None = None
    jobs: list[Job] = field(default_factory=list)
    clusters: list[Cluster] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Added in schema 1 without a bump: how the half was read (VIA_GUARD: one request to the
    # guard's queue endpoint; VIA_SKYPILOT: SkyPilot's own /status and /jobs/queue/v2), and
    # why not through the guard when it was not (an older guard, a capped answer, ...).
    via: str | None = None
    fallback: str | None = None


VIA_GUARD = "guard"
VIA_SKYPILOT = "skypilot"


@dataclass
class ReapNotice:
    """A notice `deskgpu reap`/`observe` gave a session's owner (from the reap history)."""

    cluster: str  # the session as reap names it: a cluster, or a managed job's name on cloud
    owner: str
    warned_at: float  # unix seconds; the grace period runs from here
    reap_after: float  # torn down after this if still idle
    message: str = ""  # what the owner was told
    created_at: float | None = None  # the session it was given to (a reborn name has none)


@dataclass
class Snapshot:
    """One look at the box."""

    taken_at: float  # unix seconds; ages on screen are relative to this, not to "now"
    host: str | None = None
    nvml: NvmlView = field(default_factory=lambda: NvmlView(available=False))
    sky: SkyView = field(default_factory=lambda: SkyView(available=False))
    schema_version: int = SCHEMA_VERSION
    # Added in schema 1 without a bump: older recordings read back with no notices.
    notices: list[ReapNotice] = field(default_factory=list)
    notices_error: str | None = None  # why the reap history could not be read
    # Added in schema 1 without a bump: older recordings read back with allocation unknown.
    allocation: AllocationView = field(default_factory=AllocationView)
    # Added in schema 1 without a bump: the host config's `frontend_gives_up_after` when this
    # was taken (a front end's session Queued longer is a likely orphan; deskgpu.frontends).
    frontend_gives_up_after_s: float = 240.0

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": DOCUMENT_KIND, "schema_version": self.schema_version}
        doc.update(_dump(self))
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Snapshot:
        """Read a recorded snapshot (or `queue --json` output). Unknown keys are ignored."""
        if not isinstance(doc, dict):
            raise SnapshotFormatError("a snapshot is a JSON object")
        from deskgpu.typedload import shown

        version = doc.get("schema_version")
        kind = doc.get("kind")
        if isinstance(kind, str) and kind != DOCUMENT_KIND:
            raise SnapshotFormatError(
                f"this is a {shown(kind)} document, not a queue snapshot "
                "(`deskgpu queue --record FILE` writes one)"
            )
        if version != SCHEMA_VERSION:
            raise SnapshotFormatError(
                f"snapshot schema_version {shown(version)} is not {SCHEMA_VERSION}: "
                "record it again with this deskgpu"
            )
        if "taken_at" not in doc:
            raise SnapshotFormatError("snapshot has no taken_at")
        from deskgpu import typedload

        doc = {
            **doc,
            "nvml": doc.get("nvml") or {"available": False},
            "sky": doc.get("sky") or {"available": False},
            "notices": doc.get("notices") or [],
            "allocation": doc.get("allocation") or {},
        }
        try:  # every field checked against its type: `"12"` for a number is named, not a crash
            return typedload.load(Snapshot, doc, "")
        except typedload.TypedLoadError as exc:
            raise SnapshotFormatError(str(exc)) from None


def _dump(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _dump(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list):
        return [_dump(item) for item in obj]
    if isinstance(obj, dict):
        return {str(k): _dump(v) for k, v in obj.items()}
    return obj


def _short_command(command: str | None) -> str | None:
    if not command or not command.split():
        return None
    first = command.split()[0]
    return printable(first.rsplit("/", 1)[-1])[:24]


def printable(text: str) -> str:
    """`text` without control characters: a program's name or a label reaches a terminal."""
    return "".join(c for c in text if c.isprintable())


@dataclass(frozen=True)
class SessionUse:
    """What a cluster holds on the GPUs right now: its processes' GPUs and VRAM, and the
    GPUs the device plugin allocated to its pod (held even at 0 MiB)."""

    gpu_indexes: tuple[int, ...]  # GPUs its processes use
    used_memory_mib: float
    max_utilization_gpu_pct: int | None  # None: no reading on any of its GPUs
    allocated_gpu_indexes: tuple[int, ...] = ()
    nodes: tuple[str, ...] = ()  # the nodes those GPUs are on (Prometheus telemetry)

    @property
    def held_indexes(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.gpu_indexes) | set(self.allocated_gpu_indexes)))


def session_use(snapshot: Snapshot, cluster: Cluster) -> SessionUse:
    """Join a cluster with the GPU processes attributed to it (by name on cloud, else name)
    and the GPUs allocated to its pod."""
    indexes: list[int] = []
    allocated: list[int] = []
    used = 0.0
    utils: list[int] = []
    nodes: list[str] = []
    for gpu in snapshot.nvml.gpus:
        mine = [p for p in gpu.processes if _holds(p.holder, cluster)]
        if _holds(gpu.allocated_to, cluster):
            allocated.append(gpu.index)
        elif not mine:
            continue
        if gpu.node is not None and gpu.node not in nodes:
            nodes.append(gpu.node)
        if mine:
            indexes.append(gpu.index)
            used += sum(p.used_memory_mib or 0.0 for p in mine)
        if gpu.utilization_gpu_pct is not None:
            utils.append(gpu.utilization_gpu_pct)
    return SessionUse(
        tuple(indexes), used, max(utils) if utils else None, tuple(allocated), tuple(nodes)
    )


def _holds(holder: Holder | None, cluster: Cluster) -> bool:
    if holder is None or holder.kind != HOLDER_SKYPILOT:
        return False
    if holder.cluster_name_on_cloud and cluster.cluster_name_on_cloud:
        return holder.cluster_name_on_cloud == cluster.cluster_name_on_cloud
    return holder.cluster is not None and holder.cluster == cluster.name


def is_zombie_suspect(
    cluster: Cluster, use: SessionUse, now: float, min_idle_s: float = 1800.0
) -> bool:
    """A display hint, not the reap rule: an interactive session, up, idle, holding GPUs (VRAM,
    or an allocation through the device plugin) at 0%.

    Idle is SkyPilot's idle time when known, else the session's age (one look cannot see
    a window of utilization; `deskgpu reap` decides on evidence over hours).
    """
    if not cluster.interactive or cluster.state != RUNNING:
        return False
    holding = use.used_memory_mib > 0 or bool(use.allocated_gpu_indexes)
    if not holding or use.max_utilization_gpu_pct != 0:
        return False
    since = cluster.idle_since if cluster.idle_since is not None else cluster.launched_at
    return since is not None and now - since >= min_idle_s


def session_name(job: Job) -> str:
    """What `deskgpu reap` calls a managed job's session (its notices carry this name)."""
    return job.cluster_name_on_cloud or f"managed-job-{job.id}"


def current_notices(snapshot: Snapshot) -> list[ReapNotice]:
    """The notices that still concern a session this snapshot shows.

    Without a SkyPilot view every notice stands. With one, a notice whose session is gone
    (torn down, ended; `observe` clears it next time) or was relaunched under the same name
    (another `launched_at`) is left out, as reap itself would.
    """
    if not snapshot.sky.available:
        return list(snapshot.notices)
    launched = {c.name: c.launched_at for c in snapshot.sky.clusters}
    launched.update(
        (session_name(j), j.started_at or j.submitted_at)
        for j in snapshot.sky.jobs
        if j.state in (RUNNING, STARTING)
    )
    kept = []
    for notice in snapshot.notices:
        if notice.cluster not in launched:
            continue
        since = launched[notice.cluster]
        reborn = (
            since is not None
            and notice.created_at is not None
            and abs(since - notice.created_at) > 1  # the slack of `History.notice`
        )
        if not reborn:
            kept.append(notice)
    return kept
