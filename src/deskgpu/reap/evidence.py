"""The evidence a reap decision is made from, and its JSON document (schema_version 1).

Plain data, no I/O. The same `from_dict` reads a recorded document (`reap --evidence`),
the test corpus and what `gather` builds from the live box, so a replay decides exactly
what the live run decided.

Times: scalar times are ISO 8601 UTC strings in the document and Unix seconds in memory;
samples are compact arrays whose first element is Unix seconds (a week of 5-minute samples
for 8 GPUs is 16,000 rows).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from deskgpu.typedload import shown

SCHEMA_VERSION = 1  # fields added since (allocated_gpus, ...) are additions: no field changed
KINDS = ("interactive", "batch")
ALLOCATION_SOURCES = ("pod-resources", "environ", "dcgm-exporter")  # snapshot.ALLOCATION_*
LABEL_KIND = "deskgpu.io/kind"  # deskgpu.labels.LABEL_KIND (this module imports nothing)
MAX_TS = 253402300799.0  # 9999-12-31T23:59:59Z: the last second `datetime` can print


class EvidenceError(ValueError):
    """An evidence document that does not follow the format."""


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    # Whole seconds as written; a fraction is kept (microseconds) so a document read back
    # decides exactly as before.
    moment = dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)
    spec = "seconds" if moment.microsecond == 0 else "microseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


def parse_ts(value: Any, where: str) -> float | None:
    """ISO 8601 (a naive time is UTC) or Unix seconds -> Unix seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise EvidenceError(f"{where}: expected a time, got {shown(value)}")
    if isinstance(value, (int, float)):
        ts = _finite(value, where)
        if 0 <= ts <= MAX_TS and ts != int(ts):
            # To the microsecond, as the document writes it back (`iso`): a read-back
            # document decides exactly as this one.
            ts = dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).timestamp()
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.timezone.utc)
            ts = parsed.timestamp()
        except (ValueError, OverflowError):
            raise EvidenceError(f"{where}: not an ISO 8601 time: {shown(value)}") from None
    else:
        raise EvidenceError(f"{where}: expected a time, got {shown(value)}")
    if not 0 <= ts <= MAX_TS:  # before 1970 or past year 9999: no reading was taken then
        raise EvidenceError(f"{where}: time out of range: {shown(value)}")
    return ts


def _finite(value: Any, where: str) -> float:
    try:
        number = float(value)
    except OverflowError:  # an integer too big for a float
        raise EvidenceError(f"{where}: number out of range: {shown(value)}") from None
    if not math.isfinite(number):  # NaN compares false with every threshold: it would look idle
        raise EvidenceError(f"{where}: expected a finite number, got {shown(value)}")
    return number


def _num(value: Any, where: str, *, negative: bool = False) -> float | None:
    """A reading: a finite number (>= 0 unless `negative`), or null for "unknown"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvidenceError(f"{where}: expected a number or null, got {shown(value)}")
    number = _finite(value, where)
    if number < 0 and not negative:
        raise EvidenceError(f"{where}: expected a number >= 0 or null, got {shown(value)}")
    return number


def _row_ts(value: Any, row: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvidenceError(f"{where}: ts is required Unix seconds, got {shown(row)}")
    ts = parse_ts(value, where)
    assert ts is not None  # a number, checked above
    return ts


def _index(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EvidenceError(f"{where}: expected an index >= 0, got {shown(value)}")
    return value


def _indices(value: Any, where: str, extra: str = "") -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in value
    ):
        raise EvidenceError(f"{where}: a list of GPU indices{' ' + extra if extra else ''}")
    return sorted(set(value))


def _compact(value: float | None) -> float | int | None:
    """Whole numbers as ints in the document: a third smaller, and easier to read."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else round(value, 2)


class GpuSample(NamedTuple):
    """One GPU as seen by one observation: `[ts, gpu, util_pct, vram_mib]`.

    `util_pct` is the whole GPU's `utilization.gpu`; `vram_mib` the memory this session's
    processes hold on it. None: the reading failed (it proves nothing). A tuple: SQLite's rows
    become samples without a Python call each (a month of history is a million of them).
    """

    ts: float
    gpu: int
    util_pct: float | None
    vram_mib: float | None

    def to_row(self) -> list[Any]:
        return [_compact(self.ts), self.gpu, _compact(self.util_pct), _compact(self.vram_mib)]

    @classmethod
    def from_row(cls, row: Any, where: str) -> GpuSample:
        if not isinstance(row, list) or len(row) != 4:
            raise EvidenceError(
                f"{where}: expected [ts, gpu, util_pct, vram_mib], got {shown(row)}"
            )
        ts = _row_ts(row[0], row, where)
        gpu = _index(row[1], where)
        return cls(ts, gpu, _num(row[2], where), _num(row[3], where))


class ActivitySample(NamedTuple):
    """What one observation saw besides the GPUs: `[ts, ssh_sessions, cpu_pct]`.

    `ssh_sessions` counts SSH/IDE connections into the pod (sshd per-connection processes,
    pty or not); `cpu_pct` is the pod's CPU use in percent of one core. None: unknown.
    """

    ts: float
    ssh_sessions: int | None
    cpu_pct: float | None

    def to_row(self) -> list[Any]:
        return [_compact(self.ts), self.ssh_sessions, _compact(self.cpu_pct)]

    @classmethod
    def from_row(cls, row: Any, where: str) -> ActivitySample:
        if not isinstance(row, list) or len(row) != 3:
            raise EvidenceError(f"{where}: expected [ts, ssh_sessions, cpu_pct], got {shown(row)}")
        ts = _row_ts(row[0], row, where)
        ssh = _num(row[1], where)
        return cls(ts, None if ssh is None else int(ssh), _num(row[2], where))


@dataclass(frozen=True)
class Session:
    """A SkyPilot cluster on the box: an interactive session or a batch job's cluster."""

    cluster: str
    owner: str
    kind: str  # "interactive" or "batch"
    created_at: float | None = None
    status: str = "UP"  # SkyPilot's cluster status
    labels: dict[str, str] = field(default_factory=dict)
    gpus: tuple[int, ...] = ()  # GPU indices its processes hold now
    # GPUs the device plugin allocated to its pods (held even at 0 MiB); None: unknown,
    # then only VRAM its processes hold counts. `allocation_source` says where it was read.
    allocated_gpus: tuple[int, ...] | None = None
    allocation_source: str | None = None
    gpus_earlier: tuple[int, ...] = ()  # GPUs its processes held before, not now (samples)
    vram_mib: float | None = None  # VRAM its processes hold now, all GPUs
    jobs_running: int | None = 0  # None: not checked (or SkyPilot did not answer)
    jobs_pending: int | None = 0
    ssh_attached: bool | None = None  # an SSH/IDE connection now; None: unknown
    last_activity_at: float | None = None  # last SSH/IDE/job activity SkyPilot or the host saw
    pod_present: bool = True  # False: SkyPilot still lists it, but its pod is gone
    warned_at: float | None = None  # first notice of the current idle stretch (history)
    gpu_samples: tuple[GpuSample, ...] = ()
    activity_samples: tuple[ActivitySample, ...] = ()
    # The node its GPUs are on (Prometheus telemetry); None: the host the evidence was
    # collected on. Written only when set: a one-box document is as before.
    node: str | None = None

    @property
    def where(self) -> str:
        """` on GPU 0,1`, ` on lab-2 GPU 0,1`, or nothing without GPUs."""
        if not self.gpus:
            return ""
        at = f" on {self.node}" if self.node else " on"
        return f"{at} GPU {','.join(map(str, self.gpus))}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"node": self.node} if self.node else {}),
            "cluster": self.cluster,
            "owner": self.owner,
            "kind": self.kind,
            "status": self.status,
            "created_at": iso(self.created_at),
            "labels": dict(self.labels),
            "gpus": list(self.gpus),
            "allocated_gpus": None if self.allocated_gpus is None else list(self.allocated_gpus),
            "allocation_source": self.allocation_source,
            "gpus_earlier": list(self.gpus_earlier),
            "vram_mib": _compact(self.vram_mib),
            "jobs_running": self.jobs_running,
            "jobs_pending": self.jobs_pending,
            "ssh_attached": self.ssh_attached,
            "last_activity_at": iso(self.last_activity_at),
            "pod_present": self.pod_present,
            "warned_at": iso(self.warned_at),
            "gpu_samples": [s.to_row() for s in self.gpu_samples],
            "activity_samples": [s.to_row() for s in self.activity_samples],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Session:
        if not isinstance(data, dict):
            raise EvidenceError(f"{where}: expected a mapping")
        for key in ("cluster", "owner", "kind"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise EvidenceError(f"{where}.{key}: required text")
        if data["kind"] not in KINDS:
            raise EvidenceError(
                f"{where}.kind: one of {', '.join(KINDS)}, got {shown(data['kind'])}"
            )
        labels = data.get("labels") or {}
        if not isinstance(labels, dict):
            raise EvidenceError(f"{where}.labels: expected a mapping")
        ssh = data.get("ssh_attached")
        if ssh is not None and not isinstance(ssh, bool):
            raise EvidenceError(f"{where}.ssh_attached: true, false or null")
        counts: dict[str, int | None] = {}
        for key in ("jobs_running", "jobs_pending"):
            value = data.get(key, 0)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise EvidenceError(f"{where}.{key}: a count or null, got {shown(value)}")
            counts[key] = value
        gpus = _indices(data.get("gpus") or [], f"{where}.gpus")
        allocated = data.get("allocated_gpus")
        if allocated is not None:
            allocated = _indices(allocated, f"{where}.allocated_gpus", "or null (unknown)")
        earlier = _indices(data.get("gpus_earlier") or [], f"{where}.gpus_earlier")
        source = data.get("allocation_source")
        if source is not None and source not in ALLOCATION_SOURCES:
            raise EvidenceError(
                f"{where}.allocation_source: one of {', '.join(ALLOCATION_SOURCES)} or null, "
                f"got {source!r}"
            )
        label = labels.get(LABEL_KIND)
        if label in KINDS and label != data["kind"]:
            raise EvidenceError(
                f"{where}.kind: {shown(data['kind'])}, but its label {LABEL_KIND} says {label!r}: "
                "the evidence contradicts itself"
            )
        present = data.get("pod_present", True)
        if not isinstance(present, bool):
            raise EvidenceError(f"{where}.pod_present: true or false")
        gpu_rows = data.get("gpu_samples") or []
        act_rows = data.get("activity_samples") or []
        if not isinstance(gpu_rows, list) or not isinstance(act_rows, list):
            raise EvidenceError(f"{where}: samples must be lists")
        samples = tuple(
            GpuSample.from_row(r, f"{where}.gpu_samples[{i}]") for i, r in enumerate(gpu_rows)
        )
        listed = {*gpus, *(allocated or ()), *earlier}
        if "gpus_earlier" not in data:
            # Written before the field existed: a sampled GPU the session no longer lists is
            # one it held earlier, as the formats doc promises (such documents replay).
            earlier = sorted({*earlier, *(g.gpu for g in samples if g.gpu not in listed)})
            listed |= set(earlier)
        stray = next((i for i, g in enumerate(samples) if g.gpu not in listed), None)
        if stray is not None:
            raise EvidenceError(
                f"{where}.gpu_samples[{stray}]: GPU {samples[stray].gpu} is not one the session "
                f"lists (gpus {gpus}, allocated_gpus {allocated}, gpus_earlier {earlier}): "
                "the evidence contradicts itself"
            )
        return cls(
            cluster=data["cluster"],
            owner=data["owner"],
            kind=data["kind"],
            created_at=parse_ts(data.get("created_at"), f"{where}.created_at"),
            status=str(data.get("status") or "UP"),
            labels={str(k): str(v) for k, v in labels.items()},
            gpus=tuple(gpus),
            allocated_gpus=None if allocated is None else tuple(allocated),
            allocation_source=source,
            gpus_earlier=tuple(earlier),
            vram_mib=_num(data.get("vram_mib"), f"{where}.vram_mib"),
            jobs_running=counts["jobs_running"],
            jobs_pending=counts["jobs_pending"],
            ssh_attached=ssh,
            last_activity_at=parse_ts(data.get("last_activity_at"), f"{where}.last_activity_at"),
            pod_present=present,
            warned_at=parse_ts(data.get("warned_at"), f"{where}.warned_at"),
            gpu_samples=samples,
            activity_samples=tuple(
                ActivitySample.from_row(r, f"{where}.activity_samples[{i}]")
                for i, r in enumerate(act_rows)
            ),
            node=_node(data.get("node"), f"{where}.node"),
        )


@dataclass(frozen=True)
class UnmanagedProcess:
    """A host process holding VRAM outside any SkyPilot pod.

    `uid` and `start_time` (/proc/<pid>/stat field 22, clock ticks after boot) identify the
    process itself, not just its PID: a PID reused by another process has another start time.
    """

    pid: int
    user: str
    command: str
    gpu: int
    vram_mib: float | None = None
    util_pct: float | None = None  # its GPU's utilization when seen
    process_type: str = "compute"  # NVML's: "compute" or "graphics" (a display server)
    uid: int | None = None
    start_time: int | None = None
    kernel_thread: bool = False
    # The node it runs on, seen through Prometheus; None: the host the evidence was
    # collected on, the only one whose processes reap may signal.
    node: str | None = None

    @property
    def subject(self) -> str:
        return f"pid:{self.pid}@{self.node}" if self.node else f"pid:{self.pid}"

    @property
    def where(self) -> str:
        return f"{self.node} GPU {self.gpu}" if self.node else f"GPU {self.gpu}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"node": self.node} if self.node else {}),
            "pid": self.pid,
            "user": self.user,
            "command": self.command,
            "gpu": self.gpu,
            "vram_mib": _compact(self.vram_mib),
            "util_pct": _compact(self.util_pct),
            "process_type": self.process_type,
            "uid": self.uid,
            "start_time": self.start_time,
            "kernel_thread": self.kernel_thread,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> UnmanagedProcess:
        if not isinstance(data, dict):
            raise EvidenceError(f"{where}: expected a mapping")
        kind = data.get("process_type", "compute")
        if kind not in ("compute", "graphics"):
            raise EvidenceError(f"{where}.process_type: compute or graphics, got {kind!r}")
        kthread = data.get("kernel_thread", False)
        if not isinstance(kthread, bool):
            raise EvidenceError(f"{where}.kernel_thread: true or false")
        optional = {
            key: None if data.get(key) is None else _index(data[key], f"{where}.{key}")
            for key in ("uid", "start_time")
        }
        return cls(
            pid=_index(data.get("pid"), f"{where}.pid"),
            user=str(data.get("user") or "?"),
            command=str(data.get("command") or "?"),
            gpu=_index(data.get("gpu"), f"{where}.gpu"),
            vram_mib=_num(data.get("vram_mib"), f"{where}.vram_mib"),
            util_pct=_num(data.get("util_pct"), f"{where}.util_pct"),
            process_type=kind,
            uid=optional["uid"],
            start_time=optional["start_time"],
            kernel_thread=kthread,
            node=_node(data.get("node"), f"{where}.node"),
        )


@dataclass(frozen=True)
class Evidence:
    """Everything one reap run knew, as of `collected_at`."""

    collected_at: float
    sessions: tuple[Session, ...] = ()
    unmanaged: tuple[UnmanagedProcess, ...] = ()
    host: str = "deskgpu"
    source: str = "history"  # "history", "live" (sampled just now: short) or "recorded"
    history_since: float | None = None  # the oldest observation the history holds
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "collected_at": iso(self.collected_at),
            "host": self.host,
            "source": self.source,
            "history_since": iso(self.history_since),
            "notes": list(self.notes),
            "sessions": [s.to_dict() for s in self.sessions],
            "unmanaged": [u.to_dict() for u in self.unmanaged],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Evidence:
        if not isinstance(data, dict):
            raise EvidenceError("evidence: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise EvidenceError(
                f"evidence: schema_version {shown(version)} is not supported (this deskgpu reads "
                f"{SCHEMA_VERSION})"
            )
        collected = parse_ts(data.get("collected_at"), "evidence.collected_at")
        if collected is None:
            raise EvidenceError("evidence.collected_at: required")
        sessions = data.get("sessions") or []
        unmanaged = data.get("unmanaged") or []
        notes = data.get("notes") or []
        if not isinstance(sessions, list) or not isinstance(unmanaged, list):
            raise EvidenceError("evidence: sessions and unmanaged must be lists")
        if not isinstance(notes, list):
            raise EvidenceError("evidence.notes: expected a list of lines")
        parsed = tuple(Session.from_dict(s, f"sessions[{i}]") for i, s in enumerate(sessions))
        first: dict[str, int] = {}
        for i, one in enumerate(parsed):
            if one.cluster in first:
                raise EvidenceError(
                    f"sessions[{i}].cluster: {one.cluster!r} is also sessions[{first[one.cluster]}]"
                    "'s: two sessions with one cluster name contradict each other"
                )
            first[one.cluster] = i
        return cls(
            collected_at=collected,
            sessions=parsed,
            unmanaged=tuple(
                UnmanagedProcess.from_dict(u, f"unmanaged[{i}]") for i, u in enumerate(unmanaged)
            ),
            host=str(data.get("host") or "deskgpu"),
            source=str(data.get("source") or "recorded"),
            history_since=parse_ts(data.get("history_since"), "evidence.history_since"),
            notes=tuple(str(n) for n in notes),
            schema_version=SCHEMA_VERSION,
        )


def _node(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise EvidenceError(f"{where}: a node name or null, got {shown(value)}")
    return value
