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
    HOLDER_HIDDEN,
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
    printable,
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
# How far ahead of this host a node's observe may stamp its textfile before its clock is
# taken as wrong (its readings then count as unknown).
CLOCK_SLACK_S = 60.0
# How long the GPUs of a node whose exporter stopped answering are still listed (stale).
LISTED_FOR = "1d"
_MIB = 1024 * 1024


def gpu_selector() -> str:
    names = "|".join(FIELDS)
    return f'{{__name__=~"{names}",job="{DCGM_JOB}"}}'


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
    current = prom.query(gpu_selector(), at=now)
    stamps = prom.query(f'timestamp({UTIL}{{job="{DCGM_JOB}"}})', at=now)
    readings = _readings(current, stamps)
    # GPUs no current series answers for (an exporter that stopped, a GPU that stopped
    # reporting): listed stale, with the labels of their newest series of the last day.
    listed = prom.query(f'last_over_time({UTIL}{{job="{DCGM_JOB}"}}[{LISTED_FOR}])', at=now)
    missing = [s for s in listed if _key(s) not in readings]
    last_seen = _last_seen(prom, now) if missing else {}
    for s in sorted(missing, key=lambda s: last_seen.get(_labelset(s), 0.0)):
        readings[_key(s)] = _Reading(_plain(s.labels), {})  # the newest, last, wins
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
    stale_seen: dict[str, float] = {}
    for labels, at in last_seen.items():
        node_name = dict(labels).get(NODE_LABEL, "")
        stale_seen[node_name] = max(stale_seen.get(node_name, 0.0), at)
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
    _unaccounted(view)
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


def _key(s: Series) -> tuple[str, str]:
    return (s.labels.get(NODE_LABEL, ""), s.labels.get("gpu", "?"))


def _plain(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k != "__name__"}


def _labelset(s: Series) -> frozenset[tuple[str, str]]:
    return frozenset(_plain(s.labels).items())


def _readings(current: list[Series], stamps: list[Series]) -> dict[tuple[str, str], _Reading]:
    """Each GPU's readings from its current series. Two label sets for one GPU (its pod
    changed within the lookback): the one with the newest utilization sample wins, and only
    its own fields are read, so a reading is never another holder's."""
    when = {_labelset(s): s.value for s in stamps}  # timestamp() drops the metric's name
    newest: dict[tuple[str, str], tuple[float, frozenset[tuple[str, str]]]] = {}
    for s in current:
        if s.labels.get("__name__") != UTIL:
            continue
        at = when.get(_labelset(s), -math.inf)
        key = _key(s)
        if key not in newest or at > newest[key][0]:
            newest[key] = (at, _labelset(s))
    out: dict[tuple[str, str], _Reading] = {}
    for key, (at, labelset) in newest.items():
        out[key] = _Reading(dict(labelset), {}, None if math.isinf(at) else at)
    for s in current:
        key = _key(s)
        if key in newest and _labelset(s) == newest[key][1]:
            out[key].values[s.labels.get("__name__", "")] = s.value
    return out


def _last_seen(prom: Prometheus, now: float) -> dict[frozenset[tuple[str, str]], float]:
    """Each GPU utilization series' newest sample over the listing window (a subquery: asked
    only when some GPU has no current series)."""
    query = f'max_over_time(timestamp({UTIL}{{job="{DCGM_JOB}"}})[{LISTED_FOR}:1m])'
    return {_labelset(s): s.value for s in prom.query(query, at=now)}


def _index(labels: dict[str, str]) -> int:
    try:
        return int(labels.get("gpu", "-1"))
    except ValueError:
        return -1


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
    return value if value is not None and math.isfinite(value) else None


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
        # Kept as its allocation: a session on it must read as on this node, unknown here
        # (never judged idle on its other nodes' readings alone); the GPU is never free.
        gpu.allocated_to = last
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
    if holder is not None and _in_use(gpu):
        gpu.processes.append(GpuProcess(pid=None, used_memory_mib=used, holder=holder))
    return gpu


def _in_use(gpu: Gpu) -> bool:
    """Something runs on it: VRAM beyond a driver's crumbs, or any utilization; unknown
    counts as in use."""
    used, util = gpu.memory_used_mib, gpu.utilization_gpu_pct
    return used is None or used >= IN_USE_MIB or util is None or util >= 1


def _unaccounted(view: NvmlView) -> None:
    """A GPU in use that no pod holds and no node's observe reported a process on is held
    by someone unknown: never free (NVML would have listed a process)."""
    states = {n.name: n for n in view.nodes}
    for gpu in view.gpus:
        if gpu.stale or gpu.lost or gpu.processes or gpu.allocated_to is not None:
            continue
        if not _in_use(gpu):
            continue
        node = states.get(gpu.node or "")
        textfile = node.processes if node is not None else None
        why = (
            "no pod holds it and its node's observe reported no process on it"
            if textfile == NODE_FRESH
            else f"no pod holds it, and host processes on {gpu.node} are unknown "
            f"({node.processes_note if node is not None else 'no textfile'})"
        )
        holder = Holder(kind=HOLDER_HIDDEN, note=f"in use: {why}")
        gpu.processes.append(
            GpuProcess(pid=None, used_memory_mib=gpu.memory_used_mib, holder=holder)
        )


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
        elif at - now > CLOCK_SLACK_S:  # a node whose clock is ahead: its times mean nothing
            node.processes = NODE_STALE
            node.processes_note = (
                f"its textfile is stamped {at - now:.0f} s in the future: {node.name}'s clock "
                "is ahead (`deskgpu doctor` on it)"
            )
        else:
            node.processes = NODE_FRESH
            fresh_nodes.add(node.name)
        if node.processes != NODE_FRESH:
            view.notes.append(
                f"{node.name}: host processes outside pods unknown ({node.processes_note})"
            )
    _activity(view, prom, now, fresh_nodes, observed)
    by_key = {(g.node, g.index): g for g in view.gpus}
    by_uuid = {(g.node, g.uuid): g for g in view.gpus if g.uuid}
    for s in prom.query(f'{UNMANAGED_METRIC}{{job="{NODE_EXPORTER_JOB}"}}', at=now):
        node_name = s.labels.get(NODE_LABEL, "")
        if node_name not in fresh_nodes:
            continue
        try:
            pid = int(s.labels.get("pid", ""))
            gpu = by_uuid.get((node_name, s.labels.get("uuid", ""))) or by_key.get(
                (node_name, int(s.labels.get("gpu", "-1")))
            )  # the UUID first: NVML's index and DCGM's GPU id need not agree
        except ValueError:
            continue
        if gpu is None or gpu.stale:
            continue
        vram = round(s.value / _MIB, 1) if math.isfinite(s.value) else None
        holder = Holder(
            kind=HOLDER_UNMANAGED,
            unix_user=printable(s.labels.get("user", "")) or None,
            command=printable(s.labels.get("command", "")) or None,
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
            if node not in fresh or not cluster:
                continue
            a = found.setdefault(
                (node, cluster), PodActivity(cluster, node, seen_at=observed.get(node))
            )
            if not math.isfinite(s.value) or s.value < 0:
                continue  # unknown: never zero
            if metric == SSH_METRIC:
                a.ssh_sessions = int(s.value)
            else:
                a.cpu_total_s = s.value
    view.activity = [found[k] for k in sorted(found)]
