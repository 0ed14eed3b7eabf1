"""The telemetry harness (tests/promcluster.py) against a real Prometheus.

The expositions match the recorded ones in tests/fixtures/telemetry/ (shapes from dcgm-exporter
and node_exporter, see its README); a real /usr/bin/prometheus scrapes three served nodes,
sees a stopped exporter go `up == 0`, and answers a week of backfilled history. Skips without
Debian's `prometheus` package, fails without it in CI (.ci/run installs it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.promcluster import (
    DCGM_JOB,
    NODE_EXPORTER_JOB,
    GpuState,
    NodeServer,
    NodeState,
    RealPrometheus,
    SessionActivity,
    UnmanagedProc,
    backfill,
    dcgm_exposition,
    history_lines,
    textfile_exposition,
)

FIXTURES = Path(__file__).parent / "fixtures" / "telemetry"
H100 = "NVIDIA H100 80GB HBM3"
POD_LABELS = {
    "parent": "skypilot",
    "skypilot-cluster": "train-1a2b-alice",
    "skypilot-cluster-name": "train-1a2b-alice",
    "skypilot-user": "alice",
}


def node_a() -> NodeState:
    """The recorded node: GPU 0 in alice's pod, GPU 1 idle with bob's stray process."""
    return NodeState(
        name="node-a",
        gpus=[
            GpuState(
                index=0,
                uuid="GPU-3f5a1c2e-8b1d-4c1e-9a7f-0d2b6c4e8a10",
                model=H100,
                util_pct=97,
                fb_used_mib=61440,
                fb_free_mib=19715,
                power_w=412.37,
                temp_c=64,
                pod="train-1a2b-alice-head",
                namespace="default",
                container="ray-node",
                pod_labels=POD_LABELS,
            ),
            GpuState(
                index=1,
                uuid="GPU-9c0d7e21-4a6b-4f3e-8d12-7b5e3a9c1f04",
                model=H100,
                util_pct=0,
                fb_used_mib=1536,
                fb_free_mib=79619,
            ),
        ],
        unmanaged=[
            UnmanagedProc(
                gpu=1,
                uuid="GPU-9c0d7e21-4a6b-4f3e-8d12-7b5e3a9c1f04",
                pid=4242,
                user="bob",
                command="python",
                vram_mib=1536,
            )
        ],
        activity=[
            SessionActivity(cluster="train-1a2b-alice", ssh=1, cpu_seconds_total=5321.5),
            SessionActivity(cluster="dev-77aa-carol", ssh=None, cpu_seconds_total=None),
        ],
        observed_at=1767225600.0,
    )


def gpu(node: int, index: int, util: float, pod: str | None = None, user: str = "") -> GpuState:
    uuid = f"GPU-{node:08x}-0000-4000-8000-{index:012x}"
    state = GpuState(index, uuid, H100, util, fb_used_mib=40000, fb_free_mib=41155)
    if pod is not None:
        cluster = pod.removesuffix("-head")
        state.pod, state.namespace, state.container = pod, "default", "ray-node"
        state.pod_labels = {"skypilot-cluster": cluster, "skypilot-user": user}
    return state


def three_nodes() -> list[NodeState]:
    """node-a (recorded), node-b: carol's 4-GPU session, node-c: one idle GPU."""
    carol = [gpu(2, i, 50 + i, pod="dev-77aa-carol-head", user="carol") for i in range(4)]
    return [
        node_a(),
        NodeState(
            "node-b",
            carol,
            activity=[SessionActivity("dev-77aa-carol", ssh=0, cpu_seconds_total=12.0)],
        ),
        NodeState("node-c", [gpu(3, 0, 0)]),
    ]


def recorded(name: str) -> str:
    """A fixture without its provenance comment (the first line)."""
    first, rest = (FIXTURES / name).read_text().split("\n", 1)
    assert first.startswith("# by hand: ")
    return rest


def test_dcgm_exposition_is_the_recorded_one() -> None:
    text = dcgm_exposition(node_a(), "node-a")
    assert text == recorded("dcgm-exporter-node-a.prom")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    util = families["DCGM_FI_DEV_GPU_UTIL"].samples
    assert [s.labels.get("pod") for s in util] == ["train-1a2b-alice-head", None]
    assert util[0].labels["skypilot_cluster_name"] == "train-1a2b-alice"
    assert "skypilot-user" not in util[0].labels


def test_textfile_exposition_is_the_recorded_one() -> None:
    text = textfile_exposition(node_a(), now=1767225600.0)
    assert text == recorded("node-exporter-textfile-node-a.prom")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # prometheus_client names a counter family without `_total`.
    cpu = families["deskgpu_session_cpu_seconds"].samples
    assert [(s.labels, s.value) for s in cpu] == [({"cluster": "train-1a2b-alice"}, 5321.5)]
    ssh = families["deskgpu_session_ssh_connections"].samples
    assert [s.labels["cluster"] for s in ssh] == ["train-1a2b-alice"]  # carol's is None: absent


WEEK = 7 * 24 * 3600
STEP = 300.0


def history(now: float) -> Callable[[float], list[NodeState]]:
    """node-a busy by day (UTC 8-20h) and idle at night all week; node-b only the last day."""

    def state_at(ts: float) -> list[NodeState]:
        a = node_a()
        a.gpus[0].util_pct = 90 if 8 <= (ts % 86400) / 3600 < 20 else 5
        a.observed_at = None
        return [a, three_nodes()[1]] if ts > now - 86400 else [a]

    return state_at


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeServer, RealPrometheus]]:
    """One Prometheus for the module (each start costs ~7 s: Prometheus 2.42 hands discovered
    targets to its scrape loops on a fixed 5 s tick): three nodes served, a week backfilled."""
    workdir = tmp_path_factory.mktemp("promcluster")
    with NodeServer(three_nodes()) as server:
        now = time.time()
        lines = history_lines(history(now), now - WEEK, now - 60, STEP, server.targets())
        backfill(workdir / "tsdb", lines)
        with RealPrometheus(workdir, server.targets(), storage_dir=workdir / "tsdb") as prom:
            yield server, prom


def test_prometheus_scrapes_every_node(live: tuple[NodeServer, RealPrometheus]) -> None:
    server, prom = live
    util = prom.query("DCGM_FI_DEV_GPU_UTIL")
    by_gpu = {(s["metric"]["node"], s["metric"]["gpu"]): s for s in util}
    assert sorted(by_gpu) == [
        ("node-a", "0"), ("node-a", "1"),
        ("node-b", "0"), ("node-b", "1"), ("node-b", "2"), ("node-b", "3"),
        ("node-c", "0"),
    ]  # fmt: skip
    a0 = by_gpu[("node-a", "0")]["metric"]
    assert a0["job"] == DCGM_JOB
    assert a0["instance"] == server.targets()["node-a"].dcgm
    assert a0["Hostname"] == "node-a"
    assert (a0["pod"], a0["namespace"], a0["container"]) == (
        "train-1a2b-alice-head", "default", "ray-node",
    )  # fmt: skip
    assert (a0["skypilot_cluster"], a0["skypilot_user"]) == ("train-1a2b-alice", "alice")
    assert "pod" not in by_gpu[("node-a", "1")]["metric"]
    assert by_gpu[("node-b", "3")]["value"][1] == "53"

    stray = prom.query("deskgpu_unmanaged_process_memory_used_bytes")
    assert [(s["metric"]["node"], s["metric"]["pid"], s["value"][1]) for s in stray] == [
        ("node-a", "4242", str(1536 * 1024 * 1024))
    ]
    ssh = prom.query(f'deskgpu_session_ssh_connections{{job="{NODE_EXPORTER_JOB}"}}')
    assert sorted((s["metric"]["node"], s["metric"]["cluster"]) for s in ssh) == [
        ("node-a", "train-1a2b-alice"), ("node-b", "dev-77aa-carol"),
    ]  # fmt: skip

    # The state is live: the next scrape sees a change.
    gpu = server.node("node-c").gpus[0]
    try:
        gpu.util_pct = 88
        prom.wait_for(
            'DCGM_FI_DEV_GPU_UTIL{node="node-c"}',
            lambda r: [s["value"][1] for s in r] == ["88"],
        )
    finally:
        gpu.util_pct = 0


def test_a_stopped_exporter_goes_down(live: tuple[NodeServer, RealPrometheus]) -> None:
    server, prom = live
    node = server.node("node-c")
    try:
        node.dcgm_up = False
        down = prom.wait_for(f'up{{job="{DCGM_JOB}"}} == 0', lambda r: len(r) > 0)
        assert [s["metric"]["node"] for s in down] == ["node-c"]
        still = prom.query(f'up{{job="{NODE_EXPORTER_JOB}",node="node-c"}}')
        assert [s["value"][1] for s in still] == ["1"]
    finally:
        node.dcgm_up = True
    prom.wait_for(f'up{{job="{DCGM_JOB}",node="node-c"}} == 1', lambda r: len(r) == 1)


def test_a_backfilled_week_answers_range_queries(live: tuple[NodeServer, RealPrometheus]) -> None:
    server, prom = live
    end = time.time()
    series = prom.query_range('DCGM_FI_DEV_GPU_UTIL{node="node-a"}', end - WEEK, end, STEP)
    assert len(series) == 2  # backfilled and live samples are one series per GPU
    for s in series:
        assert 2000 <= len(s["values"]) <= 2017, len(s["values"])
        assert s["metric"]["instance"] == server.targets()["node-a"].dcgm
    gpu0 = next(s for s in series if s["metric"]["gpu"] == "0")
    assert {"90", "5", "97"} <= {v for _, v in gpu0["values"]}  # day, night, live scrape

    b = prom.query_range('DCGM_FI_DEV_GPU_UTIL{node="node-b"}', end - WEEK, end, STEP)
    assert len(b) == 4
    assert all(280 <= len(s["values"]) <= 300 for s in b)  # only the last day

    up = prom.query_range(f'up{{job="{DCGM_JOB}",node="node-a"}}', end - WEEK, end, 3600)
    assert [len(s["values"]) for s in up] == [169]
    observed = prom.query_range("deskgpu_observe_timestamp_seconds", end - WEEK, end, 3600)
    points = {s["metric"]["node"]: len(s["values"]) for s in observed}
    assert points["node-a"] == 169
    assert 24 <= points["node-b"] <= 25
    assert points["node-c"] == 1  # live only


def test_a_prometheus_that_cannot_start_is_reported_and_gone(tmp_path: Path) -> None:
    with NodeServer(three_nodes()[2:]) as server:
        prom = RealPrometheus(tmp_path, server.targets(), retention="not-a-duration")
        with pytest.raises(
            RuntimeError, match=r"exited with \d+ while starting[\s\S]*not a valid duration"
        ):
            prom.__enter__()
        assert prom._proc is None
