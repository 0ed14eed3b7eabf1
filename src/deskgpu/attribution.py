"""Who holds a GPU process: host PID -> /proc/<pid>/cgroup -> k3s pod -> SkyPilot -> researcher.

NVML reports host PIDs; inside a pod they mean nothing, and gpustat/nvitop show
"No Such Process" or `root`. The pod UID is in the process's cgroup path (kubepods), the
pod's labels (`skypilot-cluster`, `skypilot-user`, `deskgpu.io/*`) come from the kube API
through `kubectl` (a Go binary: no 3 s `import kubernetes`), else the pod's name from the
kubelet's `etc-hosts` for it, and SkyPilot's cluster and job records fill in the rest.

Everything runs as a normal user: what cannot be read becomes a note saying what is
hidden, never an exception. `proc_root` and `kubelet_root` are parameters so tests build
real trees in tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deskgpu import hostio
from deskgpu.labels import LABEL_JOB, LABEL_KIND, LABEL_USER
from deskgpu.snapshot import (
    HOLDER_HIDDEN,
    HOLDER_SKYPILOT,
    HOLDER_UNMANAGED,
    Holder,
    Snapshot,
)

PROC = Path("/proc")
KUBELET = Path("/var/lib/kubelet")
LABEL_SKY_CLUSTER = "skypilot-cluster"
LABEL_SKY_USER = "skypilot-user"

# kubepods paths, cgroup v1 and v2, cgroupfs and systemd drivers:
#   /kubepods/besteffort/pod<uid>/<cid>
#   /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/
#       cri-containerd-<cid>.scope
_POD_UID = re.compile(
    r"kubepods.*?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_CONTAINER = re.compile(r"(?:docker|cri-containerd|containerd|crio|libpod)[-/:]([0-9a-f]{12,64})")
_POD_SUFFIX = re.compile(r"-(?:head|worker\d*)$")


@dataclass(frozen=True)
class PodInfo:
    """A pod as far as we could learn it."""

    uid: str
    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProcInfo:
    """What /proc says about one PID (any field may be unreadable: None)."""

    pid: int
    exists: bool
    pod_uid: str | None = None
    container_id: str | None = None
    unix_user: str | None = None
    command: str | None = None


@dataclass
class PodIndex:
    """Pod UID -> pod, and why it may be incomplete."""

    pods: dict[str, PodInfo] = field(default_factory=dict)
    note: str | None = None  # set when the kube API could not be asked


def pod_uid_from_cgroup(text: str) -> str | None:
    """The k8s pod UID in a /proc/<pid>/cgroup file, normalised to dashes."""
    for line in text.splitlines():
        match = _POD_UID.search(line)
        if match:
            return match.group(1).replace("_", "-")
    return None


def pod_processes(proc_root: Path = PROC) -> Iterator[tuple[Path, str, str]]:
    """`(/proc/<pid>, pod UID, cgroup text)` for every process in a Kubernetes pod.

    Listing `proc_root` failing raises `OSError` (the caller says what is then unknown); a
    process that vanished or is hidden is skipped.
    """
    entries = [p for p in proc_root.iterdir() if p.name.isdigit()]
    for entry in entries:
        try:
            text = (entry / "cgroup").read_text()
        except OSError:
            continue
        uid = pod_uid_from_cgroup(text)
        if uid is not None:
            yield entry, uid, text


def container_id_from_cgroup(text: str) -> str | None:
    for line in text.splitlines():
        match = _CONTAINER.search(line)
        if match:
            return match.group(1)
    return None


def in_container(proc_root: Path = PROC) -> bool:
    """Whether deskgpu itself runs in a container (then host PIDs are not in our /proc)."""
    try:
        text = (proc_root / "self" / "cgroup").read_text()
    except OSError:
        return False
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines == ["0::/"]:  # cgroup v2 with its own cgroup namespace
        return True
    return any(re.search(r"kubepods|docker|containerd|crio|libpod|lxc", line) for line in lines)


def read_proc(pid: int, proc_root: Path = PROC) -> ProcInfo:
    base = proc_root / str(pid)
    try:
        owner = base.stat().st_uid
    except FileNotFoundError:
        return ProcInfo(pid=pid, exists=False)
    except OSError:
        return ProcInfo(pid=pid, exists=True)
    cgroup = _read(base / "cgroup")
    cmdline = _read(base / "cmdline")
    command = None
    if cmdline:
        command = " ".join(part for part in cmdline.split("\0") if part)[:200] or None
    return ProcInfo(
        pid=pid,
        exists=True,
        pod_uid=pod_uid_from_cgroup(cgroup) if cgroup else None,
        container_id=container_id_from_cgroup(cgroup) if cgroup else None,
        unix_user=_user_name(owner),
        command=command,
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:  # vanished between stat and read, or no permission (hidepid, ptrace)
        return None


def _user_name(uid: int) -> str:
    return hostio.user_name(uid) or f"uid{uid}"


def holder_for(info: ProcInfo, pods: PodIndex, kubelet_root: Path = KUBELET) -> Holder:
    """One process -> its holder, saying what is hidden when something is."""
    if info.pod_uid is None:
        if info.container_id is not None:
            return Holder(
                kind=HOLDER_UNMANAGED,
                unix_user=info.unix_user,
                user=info.unix_user,
                command=info.command,
                note=f"in container {info.container_id[:12]} outside Kubernetes (docker run?)",
            )
        if info.command is None and info.unix_user is None:
            return Holder(kind=HOLDER_HIDDEN, note=f"PID {info.pid}: /proc entry not readable")
        return Holder(
            kind=HOLDER_UNMANAGED,
            user=info.unix_user,
            unix_user=info.unix_user,
            command=info.command,
        )
    pod = pods.pods.get(info.pod_uid) or pod_from_kubelet(info.pod_uid, kubelet_root)
    base = Holder(
        kind=HOLDER_SKYPILOT,
        pod_uid=info.pod_uid,
        unix_user=info.unix_user,
        command=info.command,
    )
    if pod is None:
        why = pods.note or "pod not found in the kube API"
        return replace(base, kind=HOLDER_HIDDEN, note=f"in pod {info.pod_uid[:8]}; {why}")
    labels = pod.labels
    on_cloud = labels.get(LABEL_SKY_CLUSTER)
    if on_cloud is None and pod.name and not labels:
        on_cloud = _POD_SUFFIX.sub("", pod.name)  # kubelet fallback: name only, no labels
    if on_cloud is None and labels:
        return replace(
            base,
            kind=HOLDER_UNMANAGED,
            user=info.unix_user,
            pod_name=pod.name,
            namespace=pod.namespace,
            note=f"pod {pod.namespace}/{pod.name} is not a SkyPilot pod",
        )
    return replace(
        base,
        user=labels.get(LABEL_USER) or labels.get(LABEL_SKY_USER),
        cluster_name_on_cloud=on_cloud,
        job=labels.get(LABEL_JOB),
        job_kind=labels.get(LABEL_KIND),
        pod_name=pod.name,
        namespace=pod.namespace,
        note=None if labels else "pod labels hidden (kube API unavailable); named from kubelet",
    )


def pod_from_kubelet(uid: str, kubelet_root: Path = KUBELET) -> PodInfo | None:
    """The pod's name from the hosts file the kubelet writes for it (often root-only)."""
    text = _read(kubelet_root / "pods" / uid / "etc-hosts")
    if not text:
        return None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for line in reversed(lines):  # the pod's own entry is last
        parts = line.split()
        if len(parts) >= 2 and parts[1] not in ("localhost", "ip6-localhost", "ip6-loopback"):
            return PodInfo(uid=uid, name=parts[1])
    return None


def pods_from_json(doc: Mapping[str, Any]) -> dict[str, PodInfo]:
    """`kubectl get pods -o json` -> pod UID -> pod."""
    pods: dict[str, PodInfo] = {}
    for item in doc.get("items") or []:
        meta = item.get("metadata") or {}
        uid = meta.get("uid")
        if uid:
            pods[uid] = PodInfo(
                uid=uid,
                name=meta.get("name"),
                namespace=meta.get("namespace"),
                labels=dict(meta.get("labels") or {}),
            )
    return pods


def pods_from_kube(timeout_s: float = 3.0, kubectl: str | None = None) -> PodIndex:
    """Every pod on the box via `kubectl` (the user's kubeconfig), or a note saying why not."""
    exe = kubectl or shutil.which("kubectl")
    if exe is None:
        return PodIndex(note="pod owners hidden: kubectl not found")
    argv = [
        exe,
        "get",
        "pods",
        "--all-namespaces",
        "-o",
        "json",
        f"--request-timeout={timeout_s:g}s",
    ]
    result = hostio.run(argv, timeout_s + 2, env={**os.environ, "KUBECTL_COMMAND_HEADERS": "false"})
    if result.returncode is None:  # could not start, or killed at the timeout
        return PodIndex(note=f"pod owners hidden: {result.why()}")
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["no output"])[0][:160]
        return PodIndex(note=f"pod owners hidden: kubectl: {first}")
    try:
        return PodIndex(pods=pods_from_json(json.loads(result.stdout)))
    except (ValueError, AttributeError):
        return PodIndex(note="pod owners hidden: kubectl printed no JSON")


def attribute(
    snapshot: Snapshot,
    pods: PodIndex,
    proc_root: Path = PROC,
    kubelet_root: Path = KUBELET,
) -> None:
    """Fill in each GPU process's holder, in place; skip PIDs that vanished (with a note).

    A PID missing from our /proc is a process that exited since NVML looked, unless
    deskgpu runs in a container: then NVML's host PIDs are in another PID namespace and
    the process is kept as hidden.
    """
    contained = in_container(proc_root)
    cache: dict[int, ProcInfo] = {}
    vanished: set[int] = set()
    for gpu in snapshot.nvml.gpus:
        kept = []
        for proc in gpu.processes:
            pid = proc.pid
            if proc.holder is not None or pid is None:  # attributed (replayed, or a pod's)
                kept.append(proc)
                continue
            info = cache.get(pid) or cache.setdefault(pid, read_proc(pid, proc_root))
            if not info.exists:
                if not contained:
                    vanished.add(pid)
                    continue
                proc.holder = Holder(
                    kind=HOLDER_HIDDEN,
                    note=f"PID {proc.pid} is in another PID namespace: run deskgpu on the host",
                )
            else:
                proc.holder = holder_for(info, pods, kubelet_root)
            kept.append(proc)
        gpu.processes = kept
    if vanished:
        pids = ", ".join(str(p) for p in sorted(vanished))
        snapshot.nvml.notes.append(f"skipped PID(s) {pids}: exited while being read")
    if pods.note and any(
        p.holder is not None and p.holder.pod_uid for g in snapshot.nvml.gpus for p in g.processes
    ):
        snapshot.nvml.notes.append(pods.note)


def link_skypilot(snapshot: Snapshot) -> None:
    """Fill holders' cluster, user and managed job from SkyPilot's records, in place."""
    clusters = {
        c.cluster_name_on_cloud: c for c in snapshot.sky.clusters if c.cluster_name_on_cloud
    }
    jobs = {j.cluster_name_on_cloud: j for j in snapshot.sky.jobs if j.cluster_name_on_cloud}
    for holder in _holders(snapshot.nvml.gpus):
        on_cloud = holder.cluster_name_on_cloud
        if holder.kind != HOLDER_SKYPILOT or not on_cloud:
            continue
        cluster = clusters.get(on_cloud)
        if cluster is not None:
            holder.cluster = holder.cluster or cluster.name
            holder.user = holder.user or cluster.user
            holder.job = holder.job or cluster.labels.get(LABEL_JOB)
            holder.job_kind = holder.job_kind or cluster.labels.get(LABEL_KIND)
        job = jobs.get(on_cloud)
        if job is not None:
            holder.managed_job_id = job.id
            holder.user = holder.user or job.user
            holder.job = holder.job or job.labels.get(LABEL_JOB) or job.name
            holder.job_kind = holder.job_kind or job.labels.get(LABEL_KIND) or "batch"


def _holders(gpus: Iterable[Any]) -> Iterable[Holder]:
    for gpu in gpus:
        if gpu.allocated_to is not None:
            yield gpu.allocated_to
        for proc in gpu.processes:
            if proc.holder is not None:
                yield proc.holder
