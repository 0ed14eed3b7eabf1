"""reap's window over every node, from Prometheus' range queries, as observations.

On one box, `deskgpu observe` writes an observation every few minutes: each session's GPUs
(utilization, VRAM), its SSH/IDE connections and its pod's CPU time. Over Prometheus, each
node's observe exports that last part in its textfile (`deskgpu_observe_timestamp_seconds`,
`deskgpu_session_ssh_connections`, `deskgpu_session_cpu_seconds_total`, all from one file, so
one scrape carries one observation), and dcgm-exporter the GPUs. `replay` turns a node's
distinct observations (the textfile's timestamps) into the very rows its local observe would
have written (each GPU read at the first scrape that carried the observation) and appends
them to a `History`: the zombie rule then reads them as it reads a box's own history, and
decides alike. Nothing is made up: a GPU without a reading at an observation is a None
(unknown) row, a session without an exported SSH count has unknown SSH, and an observation
no scrape carried is a gap.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from deskgpu.config.reap import ReapSettings
from deskgpu.config.telemetry import DCGM_JOB, NODE_EXPORTER_JOB, NODE_LABEL, Telemetry
from deskgpu.state.history import History, SessionSample
from deskgpu.telemetry.gpus import (
    CPU_METRIC,
    FB_USED,
    OBSERVED_METRIC,
    POD_CLUSTER_LABELS,
    SSH_METRIC,
    UTIL,
)
from deskgpu.telemetry.promapi import Prometheus, Series

MAX_POINTS = 10_000  # Prometheus refuses a range query of more than 11,000 points per series


@dataclass
class Wanted:
    """One session to replay: its name, its name on cloud (the pod label), its node and
    the GPU indices it holds there now."""

    cluster: str
    on_cloud: str
    node: str
    gpus: Sequence[int]
    offset: int = 0  # added to its GPUs' indices in the rows (the report numbers a cluster's)


@dataclass
class _Observation:
    # The first query step that carried it, on Prometheus' clock (its GPUs are read there,
    # and it is recorded there), not the time the node stamped it: a node whose clock is off
    # cannot move its readings out of the window or next to another node's.
    at: float
    ssh: dict[str, int] = field(default_factory=dict)  # on_cloud -> connections
    cpu: dict[str, float] = field(default_factory=dict)  # on_cloud -> CPU seconds


MIN_STEP_S = 60.0  # a fifth of observe's period: each observation is read within a minute


def step_for(since: float, until: float, tele: Telemetry) -> float:
    """The query step: a minute (or the scrape interval, if longer), coarser where the window
    needs it. Finer would find each observation's scrape sooner, at many times the points."""
    return max(tele.scrape_interval_s, MIN_STEP_S, math.ceil((until - since) / MAX_POINTS))


def replay(
    prom: Prometheus,
    wanted: Iterable[Wanted],
    since: float,
    until: float,
    tele: Telemetry,
    history: History,
    *,
    grid_s: float | None = None,
) -> list[str]:
    """Append every node's observations of `wanted` sessions in [since, until] to `history`.

    With `grid_s` (the report: GPU-hours, no SSH or CPU), every node is read at the same
    instants, every `grid_s`, and a session has a row only where dcgm-exporter had its pod
    on the GPU: a GPU is counted for the time it was held, and a node nothing was read from
    is a gap, never a guess."""
    by_node: dict[str, list[Wanted]] = defaultdict(list)
    for w in wanted:
        by_node[w.node].append(w)
    step = grid_s or step_for(since, until, tele)
    notes: list[str] = []
    if grid_s is not None:
        _replay_grid(prom, by_node, since, until, step, history)
        return notes
    for node, sessions in sorted(by_node.items()):
        observations = _observations(prom, node, sessions, since, until, step)
        if not observations:
            notes.append(
                f"{node}: no observation of its sessions in Prometheus since "
                f"{_hours(until - since)} ago (is deskgpu observe --textfile running there?)"
            )
            continue
        gpu = _gpu_points(prom, node, sessions, since, until, step)
        for obs in observations:
            samples = []
            for w in sessions:
                rows = []
                for index in w.gpus:
                    util, vram = gpu.get((w.on_cloud, index, obs.at), (None, None))
                    rows.append((index, util, vram))
                ssh = obs.ssh.get(w.on_cloud)
                samples.append(SessionSample(w.cluster, tuple(rows), ssh, obs.cpu.get(w.on_cloud)))
            history.append(obs.at, samples)
    return notes


def _replay_grid(
    prom: Prometheus,
    by_node: dict[str, list[Wanted]],
    since: float,
    until: float,
    step: float,
    history: History,
) -> None:
    rows: dict[float, list[SessionSample]] = defaultdict(list)
    for node, sessions in sorted(by_node.items()):
        points = _gpu_points(prom, node, sessions, since, until, step)
        held: dict[tuple[float, str], list[tuple[int, float | None, float | None]]] = defaultdict(
            list
        )
        for (on_cloud, index, t), (util, vram) in points.items():
            held[(round(t, 3), on_cloud)].append((index, util, vram))
        names = {w.on_cloud: w for w in sessions}
        for (t, on_cloud), gpus in held.items():
            w = names[on_cloud]
            shifted = tuple(sorted((i + w.offset, u, v) for i, u, v in gpus))
            rows[t].append(SessionSample(w.cluster, shifted, None, None))
    # An instant is an observation where Prometheus read some node's GPUs: before it was
    # scraping, or while nothing answered, is a gap, never free GPUs.
    read = {
        round(t, 3)
        for s in prom.query_range(f'count({UTIL}{{job="{DCGM_JOB}"}})', since, until, step)
        for t, v in s.points
        if v > 0
    }
    for t in sorted(read | set(rows)):
        history.append(t, rows.get(t, []))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.0f} h"


def _observations(
    prom: Prometheus,
    node: str,
    sessions: list[Wanted],
    since: float,
    until: float,
    step: float,
) -> list[_Observation]:
    where = f'job="{NODE_EXPORTER_JOB}",{NODE_LABEL}="{_quote(node)}"'
    clusters = "|".join(_regex(w.on_cloud) for w in sessions)
    stamps = prom.query_range(f"{OBSERVED_METRIC}{{{where}}}", since, until, step)
    by_step: dict[float, float] = {}
    for s in stamps:
        for t, v in s.points:
            if math.isfinite(v):
                by_step[t] = v
    stamped: set[float] = set()  # the node's own times, each one observation
    carried: dict[float, _Observation] = {}  # by the step that first carried it
    for t in sorted(by_step):
        if by_step[t] not in stamped:
            stamped.add(by_step[t])
            carried[t] = _Observation(t)
    for metric, into in ((SSH_METRIC, "ssh"), (CPU_METRIC, "cpu")):
        query = f'{metric}{{{where},cluster=~"{clusters}"}}'
        for s in prom.query_range(query, since, until, step):
            cluster = s.labels.get("cluster", "")
            for t, v in s.points:
                obs = carried.get(t)
                if obs is None or not math.isfinite(v) or v < 0:
                    continue
                if into == "ssh":
                    obs.ssh[cluster] = int(v)
                else:
                    obs.cpu[cluster] = v
    return [carried[t] for t in sorted(carried)]  # steps of [since, until] by the query


def _gpu_points(
    prom: Prometheus,
    node: str,
    sessions: list[Wanted],
    since: float,
    until: float,
    step: float,
) -> dict[tuple[str, int, float], tuple[float | None, float | None]]:
    """(on_cloud, GPU index, step) -> (utilization %, VRAM MiB) of its pod's GPUs."""
    where = f'job="{DCGM_JOB}",{NODE_LABEL}="{_quote(node)}",pod!=""'
    wanted = {w.on_cloud for w in sessions}
    util: dict[tuple[str, int, float], float] = {}
    vram: dict[tuple[str, int, float], float] = {}
    for metric, into in ((UTIL, util), (FB_USED, vram)):
        for s in prom.query_range(f"{metric}{{{where}}}", since, until, step):
            on_cloud = _on_cloud(s)
            if on_cloud not in wanted:
                continue
            try:
                index = int(s.labels.get("gpu", ""))
            except ValueError:
                continue
            for t, v in s.points:
                if math.isfinite(v):
                    into[(on_cloud, index, t)] = v
    return {k: (util.get(k), vram.get(k)) for k in set(util) | set(vram)}


def _on_cloud(s: Series) -> str:
    return next((s.labels[k] for k in POD_CLUSTER_LABELS if s.labels.get(k)), "")


def _quote(value: str) -> str:
    """`value` inside a PromQL double-quoted string (Go's escapes)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_REGEX_SPECIAL = frozenset(".^$*+?()[]{}|\\")


def _regex(value: str) -> str:
    """A regex matching exactly `value`, inside a PromQL double-quoted string."""
    return _quote("".join(f"\\{c}" if c in _REGEX_SPECIAL else c for c in value))


def window(settings: ReapSettings, now: float) -> tuple[float, float]:
    """What reap asks Prometheus for: its retention back from now."""
    return now - settings.retention_s, now


@dataclass(frozen=True)
class Seen:
    """A pod that held GPUs in a window, as dcgm-exporter labelled its series."""

    on_cloud: str
    node: str
    gpus: tuple[int, ...]
    owner: str
    job: str
    kind: str


def sessions_seen(prom: Prometheus, since: float, until: float) -> list[Seen]:
    """Every SkyPilot pod that held a GPU of any node in [since, until]."""
    from deskgpu.telemetry.gpus import POD_DESKGPU_LABELS, POD_USER_LABEL

    window = max(1, math.ceil(until - since))
    query = f'last_over_time({UTIL}{{job="{DCGM_JOB}",pod!=""}}[{window}s])'
    found: dict[tuple[str, str], tuple[set[int], dict[str, str]]] = {}
    for s in prom.query(query, at=until):
        on_cloud = _on_cloud(s)
        node = s.labels.get(NODE_LABEL, "")
        if not on_cloud or not node:
            continue
        try:
            index = int(s.labels.get("gpu", ""))
        except ValueError:
            continue
        gpus, labels = found.setdefault((node, on_cloud), (set(), {}))
        gpus.add(index)
        labels.update(s.labels)
    out = []
    for (node, on_cloud), (gpus, labels) in sorted(found.items()):
        owner = labels.get(POD_DESKGPU_LABELS["user"]) or labels.get(POD_USER_LABEL) or "?"
        job = labels.get(POD_DESKGPU_LABELS["job"]) or on_cloud
        kind = labels.get(POD_DESKGPU_LABELS["kind"]) or "?"
        out.append(Seen(on_cloud, node, tuple(sorted(gpus)), owner, job, kind))
    return out
