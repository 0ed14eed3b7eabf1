"""Which GPUs each pod was allocated, apart from which ones its processes use.

The NVIDIA device plugin hands a pod whole GPUs: the scheduler gives them to nobody else
while the pod lives, whether or not a process ever touches them (a `sleep infinity` debug
pod, a notebook that never imported CUDA). Two places say which:

- the kubelet's pod-resources API (`<kubelet>/pod-resources/kubelet.sock`, `List`): every
  pod on the node with its containers' device IDs. Authoritative; root only.
- `NVIDIA_VISIBLE_DEVICES` in `/proc/<pid>/environ` of a pod's processes, where the device
  plugin (`envvar` strategy, its default) writes the GPUs' UUIDs. Root only too.

The socket is asked first; if it cannot be, each pod's environment is read. What neither
says stays unknown (never "no GPUs"). `proc_root` and `kubelet_root` are parameters so
tests build real trees, and serve a real socket, in tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from deskgpu import podresources
from deskgpu.attribution import (
    KUBELET,
    LABEL_SKY_CLUSTER,
    LABEL_SKY_USER,
    PROC,
    PodIndex,
    container_id_from_cgroup,
    pod_from_kubelet,
    pod_processes,
)
from deskgpu.labels import LABEL_JOB, LABEL_KIND, LABEL_USER
from deskgpu.snapshot import (
    ALLOCATION_ENVIRON,
    ALLOCATION_POD_RESOURCES,
    HOLDER_SKYPILOT,
    HOLDER_UNMANAGED,
    AllocationView,
    Gpu,
    Holder,
    PodAllocation,
    Snapshot,
)

GPU_RESOURCE = "nvidia.com/"  # nvidia.com/gpu, nvidia.com/gpu.shared, nvidia.com/mig-1g.10gb
ENV_KEY = b"NVIDIA_VISIBLE_DEVICES="
_SKY_POD = re.compile(r"^(?P<cluster>.+)-(?:head|worker\d*)$")
# Values that name no device-plugin allocation: the image's own default (`all`: the CUDA
# images set it) and the plugin's volume-mounts strategy (a directory, not a list).
_NOT_A_LIST = ("all",)
_NONE = ("", "none", "void")


def socket_path(kubelet_root: Path = KUBELET) -> Path:
    return kubelet_root / "pod-resources" / "kubelet.sock"


def read(
    gpus: list[Gpu],
    pods: PodIndex,
    proc_root: Path = PROC,
    kubelet_root: Path = KUBELET,
    timeout_s: float = 3.0,
) -> AllocationView:
    """The socket if it answers, else the pods' environments; the note says what failed."""
    socket = socket_path(kubelet_root)
    try:
        listed = podresources.list_devices(socket, timeout_s)
    except podresources.PodResourcesError as exc:
        view = from_environ(gpus, pods, proc_root, kubelet_root)
        why = f"pod-resources: {exc}"
        view.note = f"{why}; {view.note}" if view.note else why
        return view
    return from_pod_resources(listed, gpus, pods)


def _index_of(gpus: Iterable[Gpu]) -> dict[str, int]:
    out = {}
    for gpu in gpus:
        if gpu.uuid:
            out[gpu.uuid] = gpu.index
        out[str(gpu.index)] = gpu.index  # NVIDIA_VISIBLE_DEVICES may list indices
    return out


def _map(pa: PodAllocation, devices: Iterable[str], index: dict[str, int]) -> None:
    for device in devices:
        if device in pa.devices:
            continue
        pa.devices.append(device)
        whole = device.split("::", 1)[0]  # `GPU-…::2`: replica 2 of a time-sliced GPU
        if whole in index:
            if index[whole] not in pa.gpus:
                pa.gpus.append(index[whole])
        else:
            pa.unmapped.append(device)
    pa.gpus.sort()


def _cluster_of(name: str | None, labels: dict[str, str]) -> str | None:
    if LABEL_SKY_CLUSTER in labels:
        return labels[LABEL_SKY_CLUSTER]
    if labels or not name:  # labelled, but not by SkyPilot: not a SkyPilot pod
        return None
    match = _SKY_POD.match(name)
    return match["cluster"] if match else None


def from_pod_resources(
    listed: list[podresources.ContainerDevices], gpus: list[Gpu], pods: PodIndex
) -> AllocationView:
    index = _index_of(gpus)
    by_name = {(p.namespace, p.name): p for p in pods.pods.values()}
    out: dict[tuple[str, str], PodAllocation] = {}
    for entry in listed:
        key = (entry.namespace, entry.pod)
        pa = out.get(key)
        if pa is None:
            known = by_name.get(key)
            labels = known.labels if known else {}
            pa = out[key] = PodAllocation(
                pod_uid=known.uid if known else None,
                pod_name=entry.pod,
                namespace=entry.namespace,
                cluster_name_on_cloud=_cluster_of(entry.pod, labels),
            )
        if entry.resource_name.startswith(GPU_RESOURCE):
            _map(pa, entry.device_ids, index)
    return AllocationView(ALLOCATION_POD_RESOURCES, None, list(out.values()))


@dataclass
class _Pod:
    containers: dict[str, list[Path]] = field(default_factory=dict)  # container -> its PIDs


def from_environ(
    gpus: list[Gpu], pods: PodIndex, proc_root: Path = PROC, kubelet_root: Path = KUBELET
) -> AllocationView:
    """One pass over /proc: each pod's containers, one readable environment each.

    A pod counts as known only when every container seen was read: the GPU container may
    be the one this user cannot read.
    """
    index = _index_of(gpus)
    found: dict[str, _Pod] = {}
    try:
        processes = list(pod_processes(proc_root))
    except OSError as exc:
        return AllocationView(note=f"cannot list {proc_root} ({exc.strerror or exc})")
    for entry, uid, text in processes:
        container = container_id_from_cgroup(text) or "?"
        found.setdefault(uid, _Pod()).containers.setdefault(container, []).append(entry)
    out: list[PodAllocation] = []
    unreadable: list[str] = []
    odd: list[str] = []
    for uid, pod in sorted(found.items()):
        known = pods.pods.get(uid) or pod_from_kubelet(uid, kubelet_root)
        name = known.name if known else None
        pa = PodAllocation(
            pod_uid=uid,
            pod_name=name,
            namespace=known.namespace if known else None,
            cluster_name_on_cloud=_cluster_of(name, known.labels if known else {}),
        )
        complete = True
        for pids in pod.containers.values():
            value = _visible_devices(pids)
            if value is None:
                complete = False
                unreadable.append(name or uid[:8])
                break
            if value.lower() in _NONE or value == "-":
                continue
            if value.lower() in _NOT_A_LIST or value.startswith("/"):
                complete = False
                odd.append(f"{name or uid[:8]} ({value})")
                break
            _map(pa, (v.strip() for v in value.split(",") if v.strip()), index)
        if complete:
            out.append(pa)
    notes = []
    if unreadable:
        notes.append(
            f"environment of pod(s) {', '.join(sorted(set(unreadable)))} not readable "
            "(needs root): their GPU allocation is unknown"
        )
    if odd:
        notes.append(
            f"NVIDIA_VISIBLE_DEVICES names no device list in pod(s) {', '.join(odd)}: "
            "allocation unknown"
        )
    if not found:
        if (proc_root / "1").exists():  # every PID is visible (no hidepid): no pod runs
            return AllocationView(ALLOCATION_ENVIRON, None, [])
        notes.append(f"no pod processes visible under {proc_root} (hidepid?)")
    return AllocationView(ALLOCATION_ENVIRON if out else None, "; ".join(notes) or None, out)


def _visible_devices(pids: list[Path]) -> str | None:
    """NVIDIA_VISIBLE_DEVICES of the first readable process ("-": not set); None: none read."""
    for base in pids:
        try:
            raw = (base / "environ").read_bytes()
        except OSError:
            continue
        for item in raw.split(b"\0"):
            if item.startswith(ENV_KEY):
                return item[len(ENV_KEY) :].decode(errors="replace").strip()
        return "-"
    return None


def holder(pa: PodAllocation, pods: PodIndex) -> Holder:
    known = pods.pods.get(pa.pod_uid or "")
    labels = known.labels if known else {}
    if pa.cluster_name_on_cloud is None:
        return Holder(
            kind=HOLDER_UNMANAGED,
            pod_uid=pa.pod_uid,
            pod_name=pa.pod_name,
            namespace=pa.namespace,
            note=f"allocated to pod {pa.namespace or '?'}/{pa.pod_name or pa.pod_uid}, "
            "not a SkyPilot pod",
        )
    return Holder(
        kind=HOLDER_SKYPILOT,
        user=labels.get(LABEL_USER) or labels.get(LABEL_SKY_USER),
        cluster_name_on_cloud=pa.cluster_name_on_cloud,
        job=labels.get(LABEL_JOB),
        job_kind=labels.get(LABEL_KIND),
        pod_uid=pa.pod_uid,
        pod_name=pa.pod_name,
        namespace=pa.namespace,
    )


def apply(snapshot: Snapshot, view: AllocationView, pods: PodIndex) -> None:
    """Record the view in the snapshot and mark each allocated GPU with its pod, in place."""
    snapshot.allocation = view
    by_index = {g.index: g for g in snapshot.nvml.gpus}
    shared: set[int] = set()
    for pa in view.pods:
        for index in pa.gpus:
            gpu = by_index.get(index)
            if gpu is None:
                continue
            if gpu.allocated_to is not None:
                shared.add(index)  # time-sliced: several pods on one GPU; the first is shown
                continue
            gpu.allocated_to = holder(pa, pods)
    if shared:
        which = ",".join(map(str, sorted(shared)))
        snapshot.nvml.notes.append(f"GPU {which} allocated to several pods (time-slicing)")
