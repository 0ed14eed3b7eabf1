"""An attacker review's findings against the Prometheus telemetry, held by a real Prometheus.

Each node of this cluster is one trap that once gave a false "free" or "idle" (reproduced by
the review before the fix; the scenario is hand-built, shapes from tests/promcluster.py):

- `t-old`: GPU 0 was free earlier today (a series without pod labels in the history) and is
  now held by alice's busy pod: it once read free, with the old series' values.
- `t-nopod`: GPU 0 at 88% with 30 GiB and no pod, and the node's observe (fresh) lists no
  process on it: it once read free.
- `t-head` + `t-worker`: a session on two nodes; the worker's node stopped answering now (its
  history says busy). It was once judged idle on the head's GPU alone.
- `t-skew`: a node whose clock runs 45 minutes ahead: its observations once landed outside
  reap's window, hiding the activity in them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskgpu.labels import LABEL_KIND, LABEL_USER
from deskgpu.snapshot import RUNNING, Cluster, SkyView
from tests import promcluster as pc

NOW = time.time()
STEP = 300.0
BACK = 3 * 86400
SINCE = NOW - BACK - 3600
H100 = "NVIDIA H100 80GB HBM3"
SKEW = 2700.0


def pod(index: int, uuid: str, on_cloud: str, user: str, **kw: object) -> pc.GpuState:
    labels = {"skypilot-cluster-name": on_cloud, "skypilot-user": user, "deskgpu.io/user": user,
              "deskgpu.io/job": on_cloud, "deskgpu.io/kind": "interactive"}  # fmt: skip
    return pc.GpuState(index, uuid, H100, pod=f"{on_cloud}-head", namespace="default",
                       container="ray-node", pod_labels=labels, **kw)  # type: ignore[arg-type]  # fmt: skip


def free(index: int, uuid: str) -> pc.GpuState:
    return pc.GpuState(index, uuid, H100, util_pct=0, fb_used_mib=0, fb_free_mib=81559)


def nodes_at(ts: float, live: bool = False) -> list[pc.NodeState]:
    # t-old: free until two hours ago, then alice's busy pod
    if ts < NOW - 7200:
        old = [free(0, "GPU-o0")]
    else:
        old = [pod(0, "GPU-o0", "alice-old", "alice", util_pct=97, fb_used_mib=70000,
                   fb_free_mib=11559)]  # fmt: skip
    nopod = pc.GpuState(0, "GPU-n0", H100, util_pct=88, fb_used_mib=30000, fb_free_mib=51559)
    head = pod(0, "GPU-h0", "multi", "carol", util_pct=0, fb_used_mib=1500, fb_free_mib=80059)
    worker = pod(0, "GPU-w0", "multi", "carol", util_pct=98, fb_used_mib=60000, fb_free_mib=21559)
    skewed = pod(0, "GPU-s0", "skew", "dave", util_pct=0, fb_used_mib=20000, fb_free_mib=61559)
    return [
        pc.NodeState("t-old", old, activity=[pc.SessionActivity("alice-old", 0, ts / 100)],
                     observed_at=ts),
        pc.NodeState("t-nopod", [nopod], observed_at=ts),
        pc.NodeState("t-head", [head], activity=[pc.SessionActivity("multi", 0, 1.0)],
                     observed_at=ts),
        pc.NodeState("t-worker", [worker], activity=[pc.SessionActivity("multi", 0, ts / 10)],
                     observed_at=ts, dcgm_up=not live),
        pc.NodeState("t-skew", [skewed], activity=[pc.SessionActivity("skew", 0, 1.0)],
                     observed_at=ts + SKEW),
    ]  # fmt: skip


def sky() -> SkyView:
    def session(name: str, user: str) -> Cluster:
        return Cluster(name=name, user=user, state=RUNNING, sky_status="UP", launched_at=SINCE,
                       cluster_name_on_cloud=name,
                       labels={LABEL_KIND: "interactive", LABEL_USER: user})  # fmt: skip

    return SkyView(
        available=True,
        clusters=[
            session("alice-old", "alice"),
            session("multi", "carol"),
            session("skew", "dave"),
        ],
    )


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pc.RealPrometheus]:
    work = tmp_path_factory.mktemp("attacks")
    with pc.NodeServer(nodes_at(NOW, live=True)) as server:
        targets = server.targets()
        pc.backfill(work / "tsdb", pc.history_lines(nodes_at, NOW - BACK, NOW - 600, STEP, targets))
        with pc.RealPrometheus(work, targets, storage_dir=work / "tsdb", require_up=False) as p:
            p.wait_for('up{job="dcgm-exporter",node="t-worker"}', lambda r: bool(r))
            yield p


@pytest.fixture
def config(tmp_path: Path, prom: pc.RealPrometheus, monkeypatch: pytest.MonkeyPatch) -> Path:
    from deskgpu.skypilot import sdk

    monkeypatch.setattr(sdk, "fetch_queue", lambda _c, **_kw: sky())
    monkeypatch.setattr(sdk, "cluster_jobs", lambda _n, _c: (0, 0))
    monkeypatch.delenv("DESKGPU_TELEMETRY", raising=False)
    names = ["t-old", "t-nopod", "t-head", "t-worker", "t-skew"]
    nodes = "\n".join(
        f"  - {{name: {n}, role: {'server' if i == 0 else 'agent'}, address: 10.0.0.{10 + i}, "
        "gpus: {H100: 1}}"
        for i, n in enumerate(names)
    )
    path = tmp_path / "config.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\ntelemetry:\n  prometheus: {prom.url}\n"
        f"  stale_after: 1m\nnodes:\n{nodes}\n"
    )
    return path


def _gpu(doc: dict[str, object], node: str) -> dict[str, object]:
    gpus = doc["nvml"]["gpus"]  # type: ignore[index]
    return next(g for g in gpus if g["node"] == node)  # type: ignore[union-attr,index]


def test_a_gpu_free_earlier_today_and_held_now_reads_held(cli, config) -> None:
    doc = json.loads(cli("queue", "--json", "--config", str(config)).stdout)
    old = _gpu(doc, "t-old")
    assert old["utilization_gpu_pct"] == 97 and old["memory_used_mib"] == 70000
    assert old["allocated_to"]["user"] == "alice" and old["processes"]  # type: ignore[index]


def test_vram_no_pod_and_no_process_accounts_for_is_never_free(cli, config) -> None:
    doc = json.loads(cli("queue", "--json", "--config", str(config)).stdout)
    nopod = _gpu(doc, "t-nopod")
    [proc] = nopod["processes"]  # type: ignore[misc]
    assert proc["holder"]["kind"] == "hidden" and "no pod holds it" in proc["holder"]["note"]
    screen = cli("queue", "--config", str(config)).stdout
    assert "free" not in screen.split("GPUs on t-nopod", 1)[1].split("GPUs on", 1)[0]


def test_a_session_whose_other_node_is_stale_is_never_judged_idle(cli, config) -> None:
    doc = json.loads(cli("queue", "--json", "--config", str(config)).stdout)
    worker = _gpu(doc, "t-worker")
    assert worker["stale"] and worker["allocated_to"]["cluster_name_on_cloud"] == "multi"  # type: ignore[index]
    result = cli("reap", "--json", "--config", str(config))
    decisions = {d["subject"]: d for d in json.loads(result.stdout)["decisions"]}
    assert decisions["multi"]["action"] == "keep", decisions["multi"]


def test_a_node_whose_clock_runs_ahead_is_unknown_never_idle(cli, config) -> None:
    doc = json.loads(cli("queue", "--json", "--config", str(config)).stdout)
    skew = next(n for n in doc["nvml"]["nodes"] if n["name"] == "t-skew")
    assert skew["processes"] == "stale" and "clock is ahead" in skew["processes_note"]
    result = cli("reap", "--json", "--config", str(config))
    decisions = {d["subject"]: d for d in json.loads(result.stdout)["decisions"]}
    assert decisions["skew"]["action"] == "keep", decisions["skew"]
    assert decisions["alice-old"]["action"] == "keep"


def test_report_credits_each_gpu_hour_to_the_node_it_was_on(cli, config) -> None:
    doc = json.loads(cli("report", "--json", "--since", "3d", "--config", str(config)).stdout)
    nodes = {n["node"]: n for n in doc["nodes"]}
    head, worker = nodes["t-head"], nodes["t-worker"]
    assert head["sessions"] == worker["sessions"] == 1
    # the same session, one GPU on each node: each node holds its own GPU-hours, no more
    # than its one GPU can have held in the window
    window_h = 3 * 24
    assert 0 < head["gpu_hours_allocated"] <= window_h
    assert 0 < worker["gpu_hours_allocated"] <= window_h
    assert worker["gpu_hours_busy"] > 0 and head["gpu_hours_busy"] == 0
