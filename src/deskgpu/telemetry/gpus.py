"""One look at every node's GPUs through Prometheus, as the `NvmlView` NVML gives one box.

What Prometheus holds, and where deskgpu reads it:
- dcgm-exporter's series (job `dcgm-exporter`), one per GPU and field: `DCGM_FI_DEV_GPU_UTIL`
  (%), `DCGM_FI_DEV_FB_USED`/`FB_FREE` (MiB), `DCGM_FI_DEV_POWER_USAGE` (W),
  `DCGM_FI_DEV_GPU_TEMP` (C), labelled `gpu`, `UUID`, `modelName` and, for a GPU allocated to a
  pod, `pod`, `namespace`, `container` and the pod's own labels it was allowed to copy
  (`skypilot-cluster-name` -> `skypilot_cluster_name`: dcgm-exporter's SanitizeLabelName);
- deskgpu's textfile on each node (job `node-exporter`):
  `deskgpu_unmanaged_process_memory_used_bytes` per host process outside any pod,
  `deskgpu_observe_timestamp_seconds`;
- the `node` label the scrape config gives every target (`setup render` writes it from `nodes:`).

A pod's GPU has no PIDs here: its use is one `GpuProcess(pid=None)` holding the GPU's VRAM,
when it holds any. A node whose exporter stopped answering keeps its GPUs (as last seen within
`LISTED_FOR`) marked stale: never free, never idle, with the scrape's own error.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

from deskgpu.config import HostConfig
from deskgpu.config.telemetry import DCGM_JOB, NODE_EXPORTER_JOB, NODE_LABEL, Telemetry
from deskgpu.snapshot import (
    ALLOCATION_DCGM,
    HOLDER_SKYPILOT,
    HOLDER_UNMANAGED,
    NODE_FRESH,
    NODE_MISSING,
    NODE_STALE,
    SOURCE_PROMETHEUS,
    AllocationView,
    Gpu,
    GpuProcess,
    Holder,
    NodeReading,
    NvmlView,
    PodActivity,
    PodAllocation,
)
from deskgpu.telemetry.promapi import Prometheus, Series, Target

UTIL = "DCGM_FI_DEV_GPU_UTIL"
FB_USED = "DCGM_FI_DEV_FB_USED"
FB_FREE = "DCGM_FI_DEV_FB_FREE"
POWER = "DCGM_FI_DEV_POWER_USAGE"
TEMP = "DCGM_FI_DEV_GPU_TEMP"
FIELDS = (UTIL, FB_USED, FB_FREE, POWER, TEMP)
UNMANAGED_METRIC = "deskgpu_unmanaged_process_memory_used_bytes"
OBSERVED_METRIC = "deskgpu_observe_timestamp_seconds"
SSH_METRIC = "deskgpu_session_ssh_connections"
CPU_METRIC = "deskgpu_session_cpu_seconds_total"
# Pod labels dcgm-exporter copies (its allow-list, `setup render`'s values), as it spells
# them: SkyPilot 0.14 puts the cluster's name on cloud in both (the first is the new one).
POD_CLUSTER_LABELS = ("skypilot_cluster_name", "skypilot_cluster")
POD_USER_LABEL = "skypilot_user"
# deskgpu's own task labels (deskgpu.labels), which SkyPilot puts on the pod: the job's name
# and kind, and the researcher a trusted front end acted for.
POD_DESKGPU_LABELS = {"job": "deskgpu_io_job", "kind": "deskgpu_io_kind", "user": "deskgpu_io_user"}
POD_LABEL_ALLOWLIST = r"^(skypilot-(cluster|cluster-name|user)|deskgpu\.io/(user|job|kind))$"
# A GPU whose pod holds less VRAM than this has no process on it (a driver context alone
# holds hundreds of MiB; an untouched GPU reports 0 or a few MiB).
IN_USE_MIB = 16.0
# How long the GPUs of a node whose exporter stopped answering are still listed (stale).
LISTED_FOR = "1d"
_MIB = 1024 * 1024


def gpu_selector(job: str = DCGM_JOB) -> str:
    names = "|".join(FIELDS)
    return f'{{__name__=~"{names}",job="{job}"}}'


@dataclass
class _Reading:
    labels: dict[str, str]
    values: dict[str, float]
    sample_at: float | None = None  # newest sample of its utilization (None: stale-marked)


def read(config: HostConfig, prom: Prometheus | None = None, now: float | None = None) -> NvmlView:
    """Every node's GPUs now. Raises `OutsideError` when Prometheus cannot be read at all."""
    tele = config.telemetry
    assert tele is not None, "read() needs telemetry.prometheus"
    prom = prom or Prometheus(tele.prometheus)
    now = time.time() if now is None else now
    targets = prom.targets()
    last = prom.query(f"last_over_time({gpu_selector()}[{LISTED_FOR}])", at=now)
    stamps = prom.query(f'timestamp({UTIL}{{job="{DCGM_JOB}"}})', at=now)
    readings = _readings(last, stamps)
    view = NvmlView(available=True, source=SOURCE_PROMETHEUS)
    names = [n.name for n in config.nodes] + sorted(
        {r.labels.get(NODE_LABEL, "") for r in readings.values()}
        | {t.labels.get(NODE_LABEL, "") for t in targets}
    )
    order = list(dict.fromkeys(n for n in names if n))
    dcgm = {t.labels.get(NODE_LABEL, ""): t for t in targets if t.job == DCGM_JOB}
    textfile = {t.labels.get(NODE_LABEL, ""): t for t in targets if t.job == NODE_EXPORTER_JOB}
    by_node: dict[str, list[_Reading]] = defaultdict(list)
    for r in readings.values():
        by_node[r.labels.get(NODE_LABEL, "")].append(r)
    stale_seen = _stale_seen_at(prom, now) if _any_stale(by_node, dcgm, now, tele) else {}
    for name in order:
        node = _node_state(name, by_node.get(name, []), dcgm.get(name), now, tele, stale_seen)
        view.nodes.append(node)
        for r in sorted(by_node.get(name, []), key=lambda r: _index(r.labels)):
            view.gpus.append(_gpu(r, node))
    if "" in by_node:
        view.notes.append(
            f"{len(by_node[''])} GPU series carry no `{NODE_LABEL}` label: left out (every "
            "scrape target needs one; `deskgpu setup render` writes them)"
        )
    drivers = {r.labels.get("DCGM_FI_DRIVER_VERSION", "") for r in readings.values()} - {""}
    if len(drivers) == 1:
        view.driver_version = drivers.pop()
    elif drivers:
        view.notes.append(f"nodes run different NVIDIA drivers: {', '.join(sorted(drivers))}")
    _unmanaged(view, prom, now, config, textfile)
    if not view.gpus and not view.nodes:
        view.notes.append(
            f"Prometheus at {tele.prometheus} holds no dcgm-exporter series (job {DCGM_JOB!r}): "
            "is dcgm-exporter scraped? (`deskgpu doctor`)"
        )
    return view


def allocation(view: NvmlView) -> AllocationView:
    """The pods each node's GPUs are allocated to, as dcgm-exporter labels them."""
    pods: dict[tuple[str | None, str | None, str | None], PodAllocation] = {}
    for gpu in view.gpus:
        h = gpu.allocated_to
        if h is None:
            continue
        key = (gpu.node, h.namespace, h.pod_name)
        pa = pods.setdefault(
            key,
            PodAllocation(
                pod_name=h.pod_name,
                namespace=h.namespace,
                cluster_name_on_cloud=h.cluster_name_on_cloud or h.pod_name,
                node=gpu.node,
            ),
        )
        pa.gpus.append(gpu.index)
        if gpu.uuid:
            pa.devices.append(gpu.uuid)
    return AllocationView(source=ALLOCATION_DCGM, pods=list(pods.values()))


def _readings(last: list[Series], stamps: list[Series]) -> dict[tuple[str, str], _Reading]:
    out: dict[tuple[str, str], _Reading] = {}
    for s in last:
        key = (s.labels.get(NODE_LABEL, ""), s.labels.get("gpu", "?"))
        name = s.labels.get("__name__", "")
        r = out.get(key)
        if r is None:
            labels = {k: v for k, v in s.labels.items() if k != "__name__"}
            r = out[key] = _Reading(labels, {})
        elif name == UTIL:  # the pod labels of the newest series win (a GPU changes hands)
            r.labels = {k: v for k, v in s.labels.items() if k != "__name__"}
        r.values[name] = s.value
    for s in stamps:
        key = (s.labels.get(NODE_LABEL, ""), s.labels.get("gpu", "?"))
        if key in out:
            at = out[key].sample_at
            out[key].sample_at = s.value if at is None else max(at, s.value)
    return out


def _index(labels: dict[str, str]) -> int:
    try:
        return int(labels.get("gpu", "-1"))
    except ValueError:
        return -1


def _any_stale(
    by_node: dict[str, list[_Reading]], dcgm: dict[str, Target], now: float, tele: Telemetry
) -> bool:
    for name, readings in by_node.items():
        target = dcgm.get(name)
        if target is not None and target.health != "up":
            return True
        if any(r.sample_at is None or now - r.sample_at > tele.stale_after_s for r in readings):
            return True
    return False


def _stale_seen_at(prom: Prometheus, now: float) -> dict[str, float]:
    """Each node's newest GPU sample over the listing window (a subquery: asked only when
    some node is stale)."""
    query = (
        f"max by ({NODE_LABEL}) (max_over_time(timestamp({UTIL}"
        f'{{job="{DCGM_JOB}"}})[{LISTED_FOR}:1m]))'
    )
    return {s.labels.get(NODE_LABEL, ""): s.value for s in prom.query(query, at=now)}


def _node_state(
    name: str,
    readings: list[_Reading],
    target: Target | None,
    now: float,
    tele: Telemetry,
    stale_seen: dict[str, float],
) -> NodeReading:
    stamps = [r.sample_at for r in readings if r.sample_at is not None]
    seen = max(stamps) if stamps else stale_seen.get(name)
    if target is None and not readings:
        return NodeReading(
            name,
            NODE_MISSING,
            note=f"no dcgm-exporter target has node={name!r} (`deskgpu doctor` on the server)",
        )
    if not readings:
        why = target.last_error if target is not None and target.last_error else "no GPU series"
        return NodeReading(name, NODE_MISSING, note=f"dcgm-exporter: {why}")
    down = target is not None and target.health != "up"
    old = seen is None or now - seen > tele.stale_after_s
    if down or old or len(stamps) < len(readings):
        if down and target is not None:
            why = target.last_error or f"scrape target {target.health}"
        elif old:
            why = "no new reading" if seen is None else f"newest reading {now - seen:.0f} s old"
        else:
            why = "some GPUs stopped reporting"
        return NodeReading(name, NODE_STALE, seen_at=seen, note=f"dcgm-exporter: {why}")
    return NodeReading(name, NODE_FRESH, seen_at=seen)


def _number(values: dict[str, float], name: str) -> float | None:
    value = values.get(name)
    return None if value is None or math.isnan(value) else value


def _holder(labels: dict[str, str]) -> Holder | None:
    pod = labels.get("pod")
    if not pod:
        return None
    on_cloud = next((labels[k] for k in POD_CLUSTER_LABELS if labels.get(k)), None)
    user = labels.get(POD_DESKGPU_LABELS["user"]) or labels.get(POD_USER_LABEL) or None
    if on_cloud or user:
        return Holder(
            kind=HOLDER_SKYPILOT,
            user=user,
            cluster_name_on_cloud=on_cloud,
            job=labels.get(POD_DESKGPU_LABELS["job"]) or None,
            job_kind=labels.get(POD_DESKGPU_LABELS["kind"]) or None,
            pod_name=pod,
            namespace=labels.get("namespace") or None,
        )
    return Holder(kind=HOLDER_UNMANAGED, pod_name=pod, namespace=labels.get("namespace") or None)


def _gpu(r: _Reading, node: NodeReading) -> Gpu:
    labels = r.labels
    gpu = Gpu(
        index=_index(labels),
        uuid=labels.get("UUID") or labels.get("uuid") or None,
        name=labels.get("modelName") or None,
        node=node.name,
    )
    fresh = node.state == NODE_FRESH and r.sample_at is not None
    if not fresh:
        gpu.stale = True
        last = _holder(labels)
        held = f"; last seen allocated to {last.label}" if last is not None else ""
        gpu.error = f"{node.name}: {node.note or 'stale'}{held}"
        return gpu
    used = _number(r.values, FB_USED)
    free = _number(r.values, FB_FREE)
    util = _number(r.values, UTIL)
    temp = _number(r.values, TEMP)
    gpu.memory_used_mib = used
    gpu.memory_total_mib = None if used is None or free is None else used + free
    gpu.utilization_gpu_pct = None if util is None else round(util)
    gpu.temperature_c = None if temp is None else round(temp)
    gpu.power_draw_w = _number(r.values, POWER)
    holder = _holder(labels)
    gpu.allocated_to = holder
    if holder is not None and (used is None or used >= IN_USE_MIB):
        gpu.processes.append(GpuProcess(pid=None, used_memory_mib=used, holder=holder))
    return gpu


def _unmanaged(
    view: NvmlView,
    prom: Prometheus,
    now: float,
    config: HostConfig,
    targets: dict[str, Target],
) -> None:
    """Host processes outside any pod, from each node's deskgpu textfile, and how fresh it is."""
    observed = {
        s.labels.get(NODE_LABEL, ""): s.value
        for s in prom.query(f'{OBSERVED_METRIC}{{job="{NODE_EXPORTER_JOB}"}}', at=now)
    }
    bound = config.reap_settings.max_sample_gap_s
    fresh_nodes: set[str] = set()
    for node in view.nodes:
        target = targets.get(node.name)
        at = observed.get(node.name)
        if at is None:
            why = (
                target.last_error
                if target is not None and target.last_error
                else "no deskgpu_observe_timestamp_seconds (is the observe timer writing "
                "--textfile on this node?)"
            )
            node.processes, node.processes_note = NODE_MISSING, why
        elif now - at > bound:
            node.processes = NODE_STALE
            node.processes_note = f"deskgpu observe last wrote its textfile {now - at:.0f} s ago"
        else:
            node.processes = NODE_FRESH
            fresh_nodes.add(node.name)
        if node.processes != NODE_FRESH:
            view.notes.append(
                f"{node.name}: host processes outside pods unknown ({node.processes_note})"
            )
    _activity(view, prom, now, fresh_nodes, observed)
    by_key = {(g.node, g.index): g for g in view.gpus}
    for s in prom.query(f'{UNMANAGED_METRIC}{{job="{NODE_EXPORTER_JOB}"}}', at=now):
        node_name = s.labels.get(NODE_LABEL, "")
        if node_name not in fresh_nodes:
            continue
        try:
            gpu = by_key.get((node_name, int(s.labels.get("gpu", "-1"))))
            pid = int(s.labels.get("pid", ""))
        except ValueError:
            continue
        if gpu is None or gpu.stale:
            continue
        vram = None if math.isnan(s.value) else round(s.value / _MIB, 1)
        holder = Holder(
            kind=HOLDER_UNMANAGED,
            unix_user=s.labels.get("user") or None,
            command=s.labels.get("command") or None,
        )
        gpu.processes.append(GpuProcess(pid=pid, used_memory_mib=vram, holder=holder))


def _activity(
    view: NvmlView, prom: Prometheus, now: float, fresh: set[str], observed: dict[str, float]
) -> None:
    """Each session pod's SSH connections and CPU time from its node's textfile (fresh only:
    a stale textfile proves nothing, and a missing series is unknown, never zero)."""
    found: dict[tuple[str, str], PodActivity] = {}
    for metric in (SSH_METRIC, CPU_METRIC):
        for s in prom.query(f'{metric}{{job="{NODE_EXPORTER_JOB}"}}', at=now):
            node, cluster = s.labels.get(NODE_LABEL, ""), s.labels.get("cluster", "")
            if node not in fresh or not cluster or math.isnan(s.value):
                continue
            a = found.setdefault(
                (node, cluster), PodActivity(cluster, node, seen_at=observed.get(node))
            )
            if metric == SSH_METRIC:
                a.ssh_sessions = int(s.value)
            else:
                a.cpu_total_s = s.value
    view.activity = [found[k] for k in sorted(found)]
