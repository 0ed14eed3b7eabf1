"""`deskgpu observe --textfile DIR`: the observation as a Prometheus textfile.

node_exporter's textfile collector reads `DIR/*.prom`; the file is replaced atomically
(written beside it, then renamed), so a scrape never sees half of it. Names follow
Prometheus conventions: base units (bytes, seconds), ratios 0..1, `_info` for labels.
Per GPU: its holders (user, job, cluster), utilization, VRAM per holder and how long it
has been held below the reap threshold; per session: zombie suspects; per notice: the
time reap may tear it down.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deskgpu.errors import OutsideError, UsageError
from deskgpu.telemetry.gpus import CPU_METRIC, OBSERVED_METRIC, SSH_METRIC, UNMANAGED_METRIC

FILENAME = "deskgpu.prom"
MIB = 1024 * 1024


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        if value != value:  # NaN: Prometheus' text format spells it so
            number = "NaN"
        else:
            number = repr(float(value)) if value != int(value) else str(int(value))
        self.lines.append(f"{name}{{{inner}}} {number}" if inner else f"{name} {number}")


Key = tuple[str, str, str, str, str]  # kind, user, job, cluster, cluster name on cloud


def _holders(gpu: Any) -> dict[Key, float]:
    """Holder -> MiB its processes hold on this GPU (0: allocated only)."""
    out: dict[Key, float] = defaultdict(float)
    for proc in gpu.processes:
        h = proc.holder
        if h is None or h.kind not in ("skypilot", "unmanaged"):
            continue
        if h.kind == "unmanaged":
            key: Key = ("unmanaged", h.unix_user or "?", "", "", "")
        else:
            key = _sky_key(h)
        out[key] += proc.used_memory_mib or 0.0
    a = gpu.allocated_to
    if a is not None:
        out[_sky_key(a)] += 0.0
    return dict(out)


def _sky_key(h: Any) -> Key:
    cluster = h.cluster or h.cluster_name_on_cloud or ""
    return ("skypilot", h.user or "?", h.job or cluster, cluster, h.cluster_name_on_cloud or "")


def idle_since(
    db: sqlite3.Connection, clusters: Iterable[str], now: float, threshold: float, max_gap: float
) -> dict[tuple[str, int], float]:
    """(cluster, GPU) -> seconds it has been held below `threshold` up to its newest sample
    (0 when busy now); a gap in the history or an unreadable utilization ends the run."""
    wanted = sorted(set(clusters))
    if not wanted:
        return {}
    marks = ",".join("?" * len(wanted))
    rows = db.execute(
        f"SELECT cluster, gpu, ts, util FROM gpu_samples WHERE cluster IN ({marks}) "  # noqa: S608 - placeholders only
        "AND ts <= ? ORDER BY cluster, gpu, ts DESC",
        (*wanted, int(now)),
    ).fetchall()
    out: dict[tuple[str, int], float] = {}
    state: dict[tuple[str, int], tuple[float, float, bool]] = {}  # newest, oldest idle, open
    for cluster, gpu, ts, util in rows:
        key = (cluster, gpu)
        if key not in state:
            if util is None or util >= threshold:
                state[key] = (ts, ts, False)
                out[key] = 0.0
                continue
            state[key] = (ts, ts, True)
            out[key] = 0.0
            continue
        newest, oldest, open_ = state[key]
        if not open_:
            continue
        if util is None or util >= threshold or oldest - ts > max_gap:
            state[key] = (newest, oldest, False)
            continue
        state[key] = (newest, ts, True)
        out[key] = float(newest - ts)
    return out


def render(
    snap: Any,
    suspects: Iterable[tuple[str, str]],
    notices: Iterable[Any],
    idle: dict[tuple[str, int], float],
    activity: Iterable[tuple[str, int | None, float | None]] = (),
) -> str:
    """The textfile of one observation (`Snapshot`, zombie suspects, pending notices)."""
    o = _Out()
    o.family(OBSERVED_METRIC, "gauge", "When deskgpu observe last ran.")
    o.sample(OBSERVED_METRIC, {}, snap.taken_at)
    gpus = [g for g in snap.nvml.gpus if not g.lost]
    holders = {g.index: _holders(g) for g in gpus}

    def main_holder(index: int) -> tuple[str, str]:
        hs = holders.get(index) or {}
        if not hs:
            return "", ""
        (_, user, job, _, _), _ = max(hs.items(), key=lambda kv: (kv[1], kv[0]))
        return user, job

    o.family("deskgpu_gpu_info", "gauge", "One series per GPU: its model and UUID.")
    for g in gpus:
        o.sample(
            "deskgpu_gpu_info", {"gpu": str(g.index), "uuid": g.uuid or "", "name": g.name or ""}, 1
        )
    o.family(
        "deskgpu_gpu_holder_info",
        "gauge",
        "Who holds each GPU (processes' VRAM or a device-plugin allocation); kind: "
        "skypilot or unmanaged.",
    )
    for g in gpus:
        for kind, user, job, cluster, _ in sorted(holders[g.index]):
            o.sample(
                "deskgpu_gpu_holder_info",
                {"gpu": str(g.index), "user": user, "job": job, "cluster": cluster, "kind": kind},
                1,
            )
    o.family(
        "deskgpu_gpu_utilization_ratio",
        "gauge",
        "utilization.gpu as 0..1, labelled with the GPU's main holder (empty: free).",
    )
    for g in gpus:
        if g.utilization_gpu_pct is None:
            continue
        user, job = main_holder(g.index)
        o.sample(
            "deskgpu_gpu_utilization_ratio",
            {"gpu": str(g.index), "user": user, "job": job},
            g.utilization_gpu_pct / 100.0,
        )
    o.family(
        "deskgpu_gpu_memory_used_bytes", "gauge", "VRAM each holder's processes use on the GPU."
    )
    for g in gpus:
        for (_, user, job, _, _), mib in sorted(holders[g.index].items()):
            o.sample(
                "deskgpu_gpu_memory_used_bytes",
                {"gpu": str(g.index), "user": user, "job": job},
                round(mib * MIB),
            )
    o.family("deskgpu_gpu_memory_total_bytes", "gauge", "memory.total of the GPU.")
    for g in gpus:
        if g.memory_total_mib is not None:
            total = round(g.memory_total_mib * MIB)
            o.sample("deskgpu_gpu_memory_total_bytes", {"gpu": str(g.index)}, total)
    o.family(
        "deskgpu_gpu_allocated_idle_seconds",
        "gauge",
        "How long the GPU has been held by this session below reap.util_threshold_pct "
        "(from the history; 0: busy now).",
    )
    for g in gpus:
        for kind, user, job, cluster, on_cloud in sorted(holders[g.index]):
            seconds = idle.get((cluster, g.index), idle.get((on_cloud, g.index)))
            if kind != "skypilot" or seconds is None:
                continue
            o.sample(
                "deskgpu_gpu_allocated_idle_seconds",
                {"gpu": str(g.index), "user": user, "job": job, "cluster": cluster},
                seconds,
            )
    o.family(
        "deskgpu_zombie_suspect",
        "gauge",
        "1 for each session the zombie rule would warn or reap now.",
    )
    for cluster, owner in sorted(set(suspects)):
        o.sample("deskgpu_zombie_suspect", {"cluster": cluster, "user": owner}, 1)
    o.family(
        "deskgpu_reap_notice_deadline_timestamp_seconds",
        "gauge",
        "Pending reap notices: when the session may be torn down if still idle.",
    )
    for n in sorted(notices, key=lambda n: n.cluster):
        o.sample(
            "deskgpu_reap_notice_deadline_timestamp_seconds",
            {"cluster": n.cluster, "user": n.owner},
            n.reap_after,
        )
    _cluster_families(o, gpus, activity)
    return "\n".join(o.lines) + "\n"


def _cluster_families(
    o: _Out, gpus: list[Any], activity: Iterable[tuple[str, int | None, float | None]]
) -> None:
    """What a cluster's Prometheus cannot get from dcgm-exporter (deskgpu.telemetry): host
    processes outside any pod, and each session pod's SSH connections and CPU time, under the
    names `telemetry.gpus` reads them by."""
    o.family(
        UNMANAGED_METRIC,
        "gauge",
        "VRAM a host process outside any pod holds on a GPU (pid, Unix user, command).",
    )
    for g in gpus:
        for proc in g.processes:
            h = proc.holder
            if h is None or h.kind != "unmanaged" or proc.pid is None or h.unix_user is None:
                continue
            labels = {
                "gpu": str(g.index),
                "uuid": g.uuid or "",
                "pid": str(proc.pid),
                "user": h.unix_user,
                # The program's name only: a command line can carry a token, and whoever may
                # query Prometheus would read it (the queue shows no more either).
                "command": program_name(h.command),
            }
            mib = proc.used_memory_mib
            o.sample(
                UNMANAGED_METRIC,
                labels,
                float("nan") if mib is None else round(mib * MIB),
            )
    rows = sorted(activity, key=lambda r: r[0])
    o.family(
        SSH_METRIC,
        "gauge",
        "SSH/IDE connections into a session's pod (cluster: its name on cloud); absent: unknown.",
    )
    for cluster, ssh, _ in rows:
        if ssh is not None:
            o.sample(SSH_METRIC, {"cluster": cluster}, ssh)
    o.family(
        CPU_METRIC,
        "counter",
        "CPU time of a session's pod (its cgroup); absent: unknown.",
    )
    for cluster, _, cpu in rows:
        if cpu is not None:
            o.sample(CPU_METRIC, {"cluster": cluster}, cpu)


def write(directory: Path, text: str) -> Path:
    """Replace `directory/deskgpu.prom` atomically, as `--record` writes: a directory that is
    not one, or a `deskgpu.prom` that is a FIFO, a device or a symlink, is a usage error
    (exit 2), never replaced; a write that fails on the way is an `OutsideError`."""
    from deskgpu.recorded import check_writable_target

    target = directory / FILENAME
    if not directory.is_dir():
        raise UsageError(f"--textfile {directory}: not a directory")
    check_writable_target(target, "--textfile")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".deskgpu.", suffix=".prom.tmp", dir=directory)
    except OSError as exc:
        raise UsageError(
            f"--textfile {directory}: cannot write there ({exc.strerror or exc})"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        Path(tmp).chmod(0o644)
        Path(tmp).replace(target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutsideError(f"--textfile {target}: {exc.strerror or exc}") from None
    return target


def observe_textfile(directory: Path, result: Any, settings: Any) -> Path:
    """The textfile of an `ObserveResult`, reading the history it just appended to."""
    from deskgpu.state.history import open_history

    snap = result.snapshot
    clusters: set[str] = set()
    for g in snap.nvml.gpus:
        for _, _, _, cluster, on_cloud in _holders(g):
            clusters |= {cluster, on_cloud} - {""}
    with open_history(settings.history_file, create=False) as history:
        idle = idle_since(
            history.db,
            clusters,
            snap.taken_at,
            settings.util_threshold_pct,
            settings.max_sample_gap_s,
        )
        notices = history.notices()
    return write(directory, render(snap, result.suspects, notices, idle, result.activity))


def program_name(command: str | None) -> str:
    """`/usr/bin/python3 train.py --token=...` -> `python3`."""
    from deskgpu.snapshot import printable

    if not command or not command.split():
        return ""
    return printable(command.split()[0].rsplit("/", 1)[-1])[:64]
