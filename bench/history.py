"""observe, a reap dry run and report on a long history: 50 sessions x 8 and x 31 days.

The history is written as `observe` writes it (one observation every 5 minutes, a GPU row
and an activity row per session), then the three commands' cores run on it against a
simulated box of the same 50 sessions (the seam tests/test_reap_live.py uses: a recorded
snapshot, a /proc-like tree; no GPU needed). Medians of `--repeat` runs; observe's first
run after the build also prunes past the retention.

By default each session keeps a core busy and its SSH state is not read: the zombie rule's
walk back through the history ends at the newest observation. With `--idle` every session
sat idle all along (a quiet CPU, nobody attached over SSH, 0% GPU), so the walk goes back
to the history's start for each one: the most an observation can cost (observe's first run
then also gives each session its first notice).

    uv run python bench/history.py [--sessions 50] [--days 8 31] [--repeat 3] [--idle]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.config.reap import load_settings
from deskgpu.reap import observe, run
from deskgpu.reap.act import Actor
from deskgpu.snapshot import Snapshot
from deskgpu.state import usage as store
from deskgpu.state.history import SessionSample, open_history
from deskgpu.usage import report

STEP = 300
ROOT = Actor("root", 0, frozenset())
QUIET_CPU_S = 1000.0  # an idle pod's cumulative CPU seconds: it never moves


def pod_uid(k: int) -> str:
    return f"0a1b2c3d-0000-4000-8000-{k:012d}"


def snapshot(sessions: int, now: float, *, idle: bool = False) -> Snapshot:
    gpus, clusters = [], []
    for k in range(sessions):
        name = f"user{k}-dbg"
        gpus.append(
            {
                "index": k,
                "utilization_gpu_pct": 0,
                "memory_used_mib": 20000,
                "processes": [
                    {
                        "pid": 10000 + k,
                        "used_memory_mib": 20000,
                        "holder": {
                            "kind": "skypilot",
                            "user": f"user{k}",
                            "cluster": name,
                            "cluster_name_on_cloud": f"{name}-2ea4",
                            "job_kind": "interactive",
                            **({"pod_uid": pod_uid(k)} if idle else {}),
                        },
                    }
                ],
            }
        )
        clusters.append(
            {
                "name": name,
                "user": f"user{k}",
                "state": "Running",
                "sky_status": "UP",
                "launched_at": now - 40 * 86400,
                "interactive": True,
                "cluster_name_on_cloud": f"{name}-2ea4",
                "labels": {"deskgpu.io/user": f"user{k}", "deskgpu.io/kind": "interactive"},
            }
        )
    doc: dict[str, Any] = {
        "schema_version": 1,
        "taken_at": now,
        "nvml": {"available": True, "gpus": gpus},
        "sky": {"available": True, "clusters": clusters, "jobs": []},
    }
    return Snapshot.from_dict(json.loads(json.dumps(doc)))


def quiet_box(root: Path, sessions: int) -> None:
    """/proc and the pods' cgroups of idle sessions: a kernel waiting in each pod, nobody
    attached, the CPU counter still."""
    for k in range(sessions):
        pod_slice = f"kubepods-pod{pod_uid(k).replace('-', '_')}.slice"
        proc = root / "proc" / str(10000 + k)
        proc.mkdir(parents=True)
        (proc / "cgroup").write_text(f"0::/kubepods.slice/{pod_slice}/cri-containerd-ab12.scope\n")
        (proc / "cmdline").write_bytes(b"python\0-m\0ipykernel_launcher\0")
        (proc / "stat").write_text(f"{10000 + k} (python) S 1 {10000 + k} {10000 + k} 0 -1 0\n")
        cgroup = root / "cgroup" / "kubepods.slice" / pod_slice
        cgroup.mkdir(parents=True)
        (cgroup / "cpu.stat").write_text(f"usage_usec {int(QUIET_CPU_S * 1e6)}\n")


def build_history(path: Path, sessions: int, days: int, now: float, *, idle: bool) -> None:
    stamps = range(int(now) - days * 86400, int(now), STEP)
    with open_history(path) as h:
        store.ensure(h.db)
        for ts in stamps:
            cpu_s = QUIET_CPU_S if idle else float(ts - stamps[0])  # idle, or a core busy
            h.append(
                ts,
                [
                    SessionSample(f"user{k}-dbg", ((k, 0.0, 20000.0),), 0, cpu_s)
                    for k in range(sessions)
                ],
            )


def median_s(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(sessions: int, days: int, repeat: int, *, idle: bool = False) -> dict[str, Any]:
    now = 1_767_000_000.0
    with tempfile.TemporaryDirectory(prefix="deskgpu-bench-") as tmp:
        root = Path(tmp)
        config = HostConfig(
            state_dir=str(root / "state"),
            reap={"retention": f"{days}d", "min_age": "1h", "idle_window": "6h"},
        )
        settings = load_settings(config)
        t0 = time.perf_counter()
        build_history(settings.history_file, sessions, days, now, idle=idle)
        built = time.perf_counter() - t0
        if idle:
            quiet_box(root, sessions)
        clock = [now]
        snap_now = snapshot(sessions, now, idle=idle)

        def live() -> run.Live:
            clock[0] += STEP
            snap = Snapshot.from_dict({**snap_now.to_dict(), "taken_at": clock[0]})
            return run.Live(
                snapshot=lambda _c: snap,
                pods=lambda: None,
                cluster_jobs=lambda _n, _c: (0, 0),
                down=lambda _n, _c: None,
                proc_root=root / "proc",
                cgroup_root=root / "cgroup",
                clock=lambda: clock[0],
                sleep=lambda s: None,
            )

        size_mb = settings.history_file.stat().st_size / 1e6
        observe_s = median_s(lambda: observe.observe(config, settings, live()), repeat)
        reap_s = median_s(
            lambda: run.reap(config, settings, yes=False, actor=ROOT, live=live()), repeat
        )
        report_s = median_s(
            lambda: report.make(settings, since_s=days * 86400.0, now=clock[0]), repeat
        )
        return {
            "days": days,
            "sessions": sessions,
            "idle": idle,
            "history_mb": round(size_mb, 1),
            "build_s": round(built, 1),
            "observe_s": round(observe_s, 3),
            "reap_dry_run_s": round(reap_s, 3),
            "report_s": round(report_s, 3),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--days", type=int, nargs="+", default=[8, 31])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--idle", action="store_true", help="every session idle all along")
    args = parser.parse_args()
    for days in args.days:
        r = bench(args.sessions, days, args.repeat, idle=args.idle)
        idle = ", idle all along" if r["idle"] else ""
        print(
            f"{r['sessions']} sessions x {r['days']} days{idle} ({r['history_mb']} MB history): "
            f"observe {r['observe_s']:.3f} s, reap dry run {r['reap_dry_run_s']:.3f} s, "
            f"report {r['report_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
