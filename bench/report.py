"""Time of `deskgpu report`: 8 GPUs x a week of 5-minute observations x 50 sessions.

The history is written through observe's own write path (`History.append` and
`usage.store.record`) into a temporary SQLite file: 8 GPUs always held, 50 sessions taking
turns on them (busy in the daytime, held idle at night, some idle all along), one 3-hour
gap when observe did not run. Timed: `report.build` over the file (read, attribute, cells,
gaps, audit log) and the HTML page. Compared with: one SQL `GROUP BY` over the same rows,
the `sacct`-like raw sum that assumes every row is exactly 5 minutes (no gaps, no hours,
no owners): the floor any report of this history pays to read it. Its totals must agree
with ours outside the gap, which the bench checks.

    uv run python bench/report.py [--sessions 50] [--days 7] [--gpus 8]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from deskgpu.state import usage as store
from deskgpu.state.history import SessionSample, open_history
from deskgpu.usage import html, report

STEP = 300
NOW = 1_732_590_000
THRESHOLD = 5.0


def build_history(path: Path, sessions: int, days: int, gpus: int) -> int:
    n = days * 86400 // STEP
    start = NOW - n * STEP
    per_gpu = max(1, -(-sessions // gpus))
    span = n // per_gpu + 1
    gap = range(n // 2, n // 2 + 3 * 3600 // STEP)  # observe down for 3 hours
    snap = SimpleNamespace(
        nvml=SimpleNamespace(gpus=[None] * gpus), sky=SimpleNamespace(available=False)
    )
    rows = 0
    with open_history(path) as history:
        for i in range(n + 1):
            if i in gap:
                continue
            ts = start + i * STEP
            hour = (ts // 3600) % 24
            samples, infos = [], []
            for g in range(gpus):
                k = min(per_gpu - 1, i // span) * gpus + g  # the session on GPU g now
                if k >= sessions:
                    continue
                lazy = k % 5 == 0  # a fifth of the sessions never compute
                util = 0 if lazy or hour < 8 else 60 + (k % 30)
                cluster = f"user{k % 13}-job{k}"
                samples.append(SessionSample(cluster, ((g, util, 20000.0 + k),), 0, None))
                infos.append(
                    SimpleNamespace(
                        cluster=cluster,
                        created_at=start + (k // gpus) * span * STEP,
                        labels={"deskgpu.io/user": f"user{k % 13}", "deskgpu.io/job": f"job{k}"},
                        owner=f"user{k % 13}",
                        kind="interactive" if k % 2 else "batch",
                    )
                )
                rows += 1
            history.append(ts, samples)
            store.record(history.db, ts, infos, snap)
    return rows


def raw_sum(db: sqlite3.Connection) -> tuple[float, float, float]:
    """The naive baseline: every row is one 5-minute interval, summed by SQL."""
    row = db.execute(
        "SELECT COUNT(*), SUM(util >= ?), SUM(util < ?) FROM gpu_samples", (THRESHOLD, THRESHOLD)
    ).fetchone()
    return row[0] * STEP / 3600, row[1] * STEP / 3600, row[2] * STEP / 3600


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.sqlite"
        t0 = time.perf_counter()
        rows = build_history(path, args.sessions, args.days, args.gpus)
        size = path.stat().st_size / 1e6
        print(
            f"history: {args.gpus} GPUs x {args.days} d of {STEP // 60}-min observations x "
            f"{args.sessions} sessions = {rows:,} GPU rows ({size:.1f} MB), written in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        since, until = NOW - args.days * 86400, NOW + STEP  # the last one counts 5 min too
        times, page_times, raw_times = [], [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            with report.open_readonly(path) as db:
                r = report.build(
                    db, since=since, until=until, threshold_pct=THRESHOLD, max_gap_s=1200
                )
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            page = html.page(r)
            page_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            with report.open_readonly(path) as db:
                naive = raw_sum(db)
            raw_times.append(time.perf_counter() - t)
        d = r.to_dict()["box"]
        print(
            f"report.build(): best {min(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms "
            f"over {args.repeat} runs; {len(r.users)} users, {len(r.sessions)} sessions, "
            f"{r.hours} hours x {r.gpus} GPUs"
        )
        print(
            f"  box: {d['gpu_hours_allocated']} GPU-h allocated = {d['gpu_hours_busy']} busy + "
            f"{d['gpu_hours_idle']} idle; gaps {[(g['from'], g['hours']) for g in d['gaps']]}; "
            f"worst cell imbalance {r.max_imbalance_s():.2e} s"
        )
        print(f"  HTML page: {len(page) / 1e3:.0f} kB in best {min(page_times) * 1000:.0f} ms")
        print(
            f"  baseline (one SQL GROUP BY, rows x 5 min): best {min(raw_times) * 1000:.0f} ms, "
            f"{naive[0]:.2f} GPU-h = {naive[1]:.2f} busy + {naive[2]:.2f} idle; the report "
            f"costs {min(times) / min(raw_times):.1f}x it"
        )
        agree = abs(naive[0] - r.box.allocated_s / 3600) < 0.01
        print(f"  allocated GPU-h agree with the baseline (no gap inside a row): {agree}")
        ratio = 1.0 / max(times)
        verdict = "under it" if ratio >= 1 else "OVER it (a loaded machine, or a regression)"
        print(f"  budget 1 s: the worst run is {ratio:.1f}x the budget's pace, {verdict}")


if __name__ == "__main__":
    main()
