"""Decision time of the zombie rule: 1,000 sessions over 8 GPUs, a week of 5-minute samples.

Worst case on purpose: every session idle for the whole week (the rule walks every
observation back to the start of the history), ~2M GPU rows and ~2M activity rows. Every
interactive session is allocated its GPU through the device plugin (allocation evidence),
so the allocation branch of the rule is timed too.

    uv run python bench/reap.py [--sessions 1000] [--days 7]
"""

from __future__ import annotations

import argparse
import time

from deskgpu.config.reap import ReapSettings
from deskgpu.reap.evidence import ActivitySample, Evidence, GpuSample, Session
from deskgpu.reap.rule import decide

STEP = 300


def build(sessions: int, days: int, now: float) -> Evidence:
    n = days * 86400 // STEP
    stamps = [now - i * STEP for i in range(n, -1, -1)]
    out = []
    for k in range(sessions):
        gpu = k % 8
        out.append(
            Session(
                cluster=f"user{k}-dbg",
                owner=f"user{k}",
                kind="interactive" if k % 4 else "batch",
                created_at=now - days * 86400 - 60,
                gpus=(gpu,),
                allocated_gpus=(gpu,) if k % 4 else None,
                allocation_source="pod-resources" if k % 4 else None,
                vram_mib=24000.0,
                jobs_running=0 if k % 4 else 1,
                jobs_pending=0,
                ssh_attached=False,
                warned_at=now - 2 * 86400 if k % 2 else None,
                gpu_samples=tuple(GpuSample(ts, gpu, 0.0, 24000.0) for ts in stamps),
                activity_samples=tuple(ActivitySample(ts, 0, 1.0) for ts in stamps),
            )
        )
    return Evidence(collected_at=now, sessions=tuple(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    now = 1_732_590_000.0
    t0 = time.perf_counter()
    evidence = build(args.sessions, args.days, now)
    rows = sum(len(s.gpu_samples) for s in evidence.sessions)
    print(
        f"built {args.sessions} sessions x {rows // args.sessions} observations "
        f"({rows:,} GPU rows + {rows:,} activity rows) in {time.perf_counter() - t0:.1f} s"
    )
    settings = ReapSettings()
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        decisions = decide(evidence, settings)
        times.append(time.perf_counter() - t)
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d.action.value] = counts.get(d.action.value, 0) + 1
    print(f"decide(): best {min(times):.2f} s, worst {max(times):.2f} s over {args.repeat} runs")
    print(f"  per session: {1000 * min(times) / args.sessions:.2f} ms; decisions: {counts}")
    ratio = 1.0 / max(times)
    verdict = "under it" if ratio >= 1 else "OVER it (a loaded machine, or a regression)"
    print(f"  budget 1 s: the worst run is {ratio:.1f}x the pace of the budget, {verdict}")


if __name__ == "__main__":
    main()
