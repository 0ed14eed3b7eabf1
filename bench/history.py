"""observe, a reap dry run and report on a long history: 50 sessions x 8 and x 31 days.

The history is written as `observe` writes it (one observation every 5 minutes, a GPU row
and an activity row per session), then the three commands' cores run on it against a
simulated box of the same 50 sessions (the seam tests/test_reap_live.py uses: a recorded
snapshot, a /proc-like tree; no GPU needed). Medians of `--repeat` runs; observe's first
run after the build also prunes past the retention.

    uv run python bench/history.py [--sessions 50] [--days 8 31] [--repeat 3]
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
from deskgpu.reap import run
from deskgpu.reap.act import Actor
from deskgpu.snapshot import Snapshot
from deskgpu.state import usage as store
from deskgpu.state.history import SessionSample, open_history
from deskgpu.usage import report

STEP = 300
ROOT = Actor("root", 0, frozenset())


def snapshot(sessions: int, now: float) -> Snapshot:
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


def build_history(path: Path, sessions: int, days: int, now: float) -> None:
    stamps = range(int(now) - days * 86400, int(now), STEP)
    with open_history(path) as h:
        store.ensure(h.db)
        for ts in stamps:
            h.append(
                ts,
                [
                    SessionSample(f"user{k}-dbg", ((k, 0.0, 20000.0),), 0, float(ts - stamps[0]))
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


def bench(sessions: int, days: int, repeat: int) -> dict[str, float]:
    now = 1_767_000_000.0
    with tempfile.TemporaryDirectory(prefix="deskgpu-bench-") as tmp:
        root = Path(tmp)
        config = HostConfig(
            state_dir=str(root / "state"),
            reap={"retention": f"{days}d", "min_age": "1h", "idle_window": "6h"},
        )
        settings = load_settings(config)
        t0 = time.perf_counter()
        build_history(settings.history_file, sessions, days, now)
        built = time.perf_counter() - t0
        clock = [now]
        snap_now = snapshot(sessions, now)

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
        observe_s = median_s(lambda: run.observe(config, settings, live()), repeat)
        reap_s = median_s(
            lambda: run.reap(config, settings, yes=False, actor=ROOT, live=live()), repeat
        )
        report_s = median_s(
            lambda: report.make(settings, since_s=days * 86400.0, now=clock[0]), repeat
        )
        return {
            "days": days,
            "sessions": sessions,
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
    args = parser.parse_args()
    for days in args.days:
        r = bench(args.sessions, days, args.repeat)
        print(
            f"{r['sessions']} sessions x {r['days']} days ({r['history_mb']} MB history): "
            f"observe {r['observe_s']:.3f} s, reap dry run {r['reap_dry_run_s']:.3f} s, "
            f"report {r['report_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
