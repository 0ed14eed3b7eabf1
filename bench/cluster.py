"""The cluster's GPU half through a real Prometheus, against the one-box NVML path, same run.

    uv run python bench/cluster.py [--nodes 8] [--gpus 8] [--sessions 200] [--days 1] [--runs 5]

Served from recorded expositions (tests/promcluster.py: dcgm-exporter's format and label sets,
deskgpu's textfile): `--nodes` nodes of `--gpus` GPUs, `--sessions` SkyPilot sessions of which
one per GPU holds it (some busy, some allocated and idle, a host process outside any pod on
each node's last GPU) and the rest wait for GPUs, listed by SkyPilot only. Debian's
`/usr/bin/prometheus` scrapes them every second, over `--days` of history written into its
TSDB beforehand with `promtool tsdb create-blocks-from openmetrics`.

Timed, each `--runs` times, in this process (no interpreter start, no SkyPilot: the SkyPilot
half is the same hand-built `SkyView` for both sides):
- queue: `deskgpu.queue.take` over Prometheus (every node's GPUs, holders, stale check, host
  processes, SSH/CPU) against `take` over NVML for ONE node's worth of GPUs, read through a
  pynvml stand-in (tests/test_queue_nvml.py's `fake_nvml`). No driver answers that stand-in,
  so the NVML side is a lower bound of a real box's (a real `nvmlInit` alone takes ~10-100 ms).
- observe: what a cluster-wide judgement reads per run, reap's evidence over Prometheus (every
  node's observations over `--days`, replayed from range queries into an in-memory history),
  against `deskgpu observe`'s one-node NVML observation into a history on disk. observe itself
  stays each node's own NVML collector; this is the price of looking at all of them at once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import promcluster as pc
from tests.test_queue_nvml import fake_nvml

from deskgpu import nvml
from deskgpu import queue as survey
from deskgpu.config import HostConfig
from deskgpu.config.telemetry import Telemetry
from deskgpu.labels import LABEL_KIND, LABEL_USER
from deskgpu.reap import gather, observe, run
from deskgpu.snapshot import QUEUED, RUNNING, Cluster, SkyView
from deskgpu.state.history import open_history
from deskgpu.telemetry import history as replayed
from deskgpu.telemetry.promapi import Prometheus

H100 = "NVIDIA H100 80GB HBM3"
MIB = 1024 * 1024


def on_cloud(k: int) -> str:
    return f"user{k % 23}-s{k}-{k:04x}"


def nodes_at(n_nodes: int, n_gpus: int) -> Callable[[float], list[pc.NodeState]]:
    def state(ts: float) -> list[pc.NodeState]:
        out = []
        for n in range(n_nodes):
            gpus, activity = [], []
            for i in range(n_gpus):
                k = n * n_gpus + i
                if i == n_gpus - 1:  # a host process outside any pod
                    gpus.append(pc.GpuState(i, f"GPU-{n}-{i}", H100, 55, 9000, 72559))
                    continue
                busy = k % 3 == 0
                gpus.append(
                    pc.GpuState(
                        i, f"GPU-{n}-{i}", H100, 90 if busy else 0, 40000 if busy else 0,
                        41559 if busy else 81559, pod=f"{on_cloud(k)}-head", namespace="default",
                        container="ray-node",
                        pod_labels={"skypilot-cluster-name": on_cloud(k),
                                    "skypilot-user": f"user{k % 23}"},
                    )
                )  # fmt: skip
                activity.append(pc.SessionActivity(on_cloud(k), 0, 100.0 + ts / 1e6))
            unmanaged = [
                pc.UnmanagedProc(
                    n_gpus - 1, f"GPU-{n}-{n_gpus - 1}", 4000 + n, "bob", "python", 9000
                )
            ]
            out.append(pc.NodeState(f"node-{n}", gpus, unmanaged, activity, observed_at=ts))
        return out

    return state


def sky(n_nodes: int, n_gpus: int, sessions: int, now: float) -> SkyView:
    clusters = []
    for k in range(sessions):
        holds = k < n_nodes * n_gpus and k % n_gpus != n_gpus - 1
        clusters.append(
            Cluster(
                name=f"s{k}",
                user=f"user{k % 23}",
                state=RUNNING if holds else QUEUED,
                sky_status="UP" if holds else "INIT",
                launched_at=now - 86400,
                cluster_name_on_cloud=on_cloud(k),
                labels={LABEL_KIND: "interactive", LABEL_USER: f"user{k % 23}"},
            )
        )
    return SkyView(available=True, clusters=clusters)


def one_node_nvml(n_gpus: int) -> types.ModuleType:
    gpus = []
    for i in range(n_gpus):
        busy = i % 3 == 0
        gpus.append(
            {
                "uuid": f"GPU-{i}",
                "name": H100.encode(),
                "memory": types.SimpleNamespace(
                    used=(40000 if busy else 0) * MIB, total=81559 * MIB
                ),
                "util": types.SimpleNamespace(gpu=90 if busy else 0),
                "temp": 40, "power_mw": 300_000, "limit_mw": 700_000, "throttle": 0,
                "persistence": 1, "mig": (0, 0), "compute": [], "graphics": [],
            }
        )  # fmt: skip
    module: types.ModuleType = fake_nvml(gpus)
    return module


def timed(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--days", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    now = time.time()
    state = nodes_at(args.nodes, args.gpus)
    view = sky(args.nodes, args.gpus, args.sessions, now)
    nvml_lib = one_node_nvml(args.gpus)
    with tempfile.TemporaryDirectory(prefix="deskgpu-bench-cluster-") as tmp:
        work = Path(tmp)
        with pc.NodeServer(state(now)) as server:
            targets = server.targets()
            t0 = time.perf_counter()
            lines = pc.history_lines(state, now - args.days * 86400, now - 60, 300.0, targets)
            pc.backfill(work / "tsdb", lines)
            print(f"backfilled {args.days:g} day(s) in {time.perf_counter() - t0:.1f} s")
            with pc.RealPrometheus(work, targets, storage_dir=work / "tsdb") as prom:
                tele = Telemetry(prometheus=prom.url, stale_after="1m", scrape_interval="15s")
                cluster = HostConfig(telemetry=tele, state_dir=str(work / "state"))
                one_box = HostConfig(state_dir=str(work / "state-one"))
                for_prom = survey.Sources(fetch_sky=lambda _c: view, read_notices=lambda _c: [])
                for_nvml = survey.Sources(
                    read_nvml=lambda: nvml.read(nvml_lib),
                    fetch_sky=lambda _c: view,
                    read_notices=lambda _c: [],
                )
                snap = survey.take(cluster, for_prom)
                held = sum(1 for g in snap.nvml.gpus if g.allocated_to or g.processes)
                print(
                    f"{len(snap.nvml.nodes)} nodes, {len(snap.nvml.gpus)} GPUs ({held} held), "
                    f"{len(view.clusters)} sessions; Prometheus 2.42 at {prom.url}"
                )
                q_prom = timed(lambda: survey.take(cluster, for_prom), args.runs)
                q_nvml = timed(lambda: survey.take(one_box, for_nvml), args.runs)
                print(
                    f"queue   Prometheus, {len(snap.nvml.gpus)} GPUs: "
                    f"median {q_prom * 1000:7.1f} ms"
                )
                print(f"queue   NVML stand-in, {args.gpus} GPUs:  median {q_nvml * 1000:7.1f} ms")
                print(f"        ratio {q_prom / q_nvml:.1f}x (the NVML side is a lower bound)")

                def cluster_evidence() -> int:
                    live = gather.live_view(snap)
                    wanted = [
                        replayed.Wanted(s.cluster, s.on_cloud, s.node, sorted(s.gpus))
                        for s in live.sessions
                        if s.node is not None and s.on_cloud and s.gpus
                    ]
                    since, until = now - args.days * 86400, time.time()
                    with open_history(":memory:") as history:
                        replayed.replay(Prometheus(prom.url), wanted, since, until, tele, history)
                        return int(
                            history.db.execute("SELECT COUNT(*) FROM gpu_samples").fetchone()[0]
                        )

                rows = cluster_evidence()
                one = run.Live(snapshot=lambda c: survey.take(c, for_nvml))
                settings = one_box.reap_settings
                o_prom = timed(cluster_evidence, args.runs)
                o_nvml = timed(lambda: observe.observe(one_box, settings, one), args.runs)
                print(
                    f"observe Prometheus, every node's {args.days:g} day(s) ({rows:,} GPU rows): "
                    f"median {o_prom * 1000:7.1f} ms"
                )
                print(
                    "observe NVML stand-in, one node, one observation: "
                    f"median {o_nvml * 1000:7.1f} ms"
                )
                print(f"        ratio {o_prom / o_nvml:.1f}x")


if __name__ == "__main__":
    main()
