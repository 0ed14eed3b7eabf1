"""Three nodes through a real Prometheus: `queue`, `reap` and the textfile, via the real CLI.

Prometheus is Debian's (`/usr/bin/prometheus`), scraping three nodes' dcgm-exporter and
node_exporter endpoints that `tests/promcluster.py` serves in dcgm-exporter's own exposition
format (tests/fixtures/telemetry/README.md says where each shape came from; the values are
chosen for this scenario). A week of history is written into its TSDB with `promtool tsdb
create-blocks-from openmetrics` before it starts, so reap's range queries read a real week.

The SkyPilot half is a hand-built `SkyView` (clusters and a managed job as the guard's queue
endpoint would list them), given to the CLI where `fetch_queue` answers: what is under test
here is the GPU half, which runs unmodified.

The scenario, now:
- lab-a (server, 2x A6000): alice's managed job `train` busy on GPU 0; GPU 1 free.
- lab-b (agent, 8x H100): carol's session `carol-dbg` allocated GPU 0 and idle (0 MiB, 0%);
  bob's `python` on the host holds 8000 MiB of GPU 5 (no pod); the rest free.
- lab-c (agent, 2x L40S): dave's session `dave-nb`, up 3 days, idle at 0% with 20 GiB on
  GPU 0 all week, nobody attached: a zombie; GPU 1 free.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskgpu.labels import LABEL_KIND, LABEL_USER
from deskgpu.snapshot import RUNNING, Cluster, Job, SkyView
from tests import promcluster as pc

NOW = time.time()
WEEK = 7 * 86400
STEP = 300.0  # each node's observe every 5 minutes
DAVE_UP_SINCE = NOW - 3 * 86400
ON_CLOUD = {"carol-dbg": "carol-dbg-2ea4", "dave-nb": "dave-nb-7f3c", "train": "train-a1b2"}


def _pod_gpu(index: int, uuid: str, model: str, cluster: str, user: str, **kw: Any) -> pc.GpuState:
    on_cloud = ON_CLOUD[cluster]
    return pc.GpuState(
        index,
        uuid,
        model,
        pod=f"{on_cloud}-head",
        namespace="default",
        container="ray-node",
        pod_labels={
            "skypilot-cluster": on_cloud,
            "skypilot-cluster-name": on_cloud,
            "skypilot-user": user,
            "parent": "skypilot",
            "deskgpu.io/job": cluster,
            "deskgpu.io/kind": "batch" if cluster == "train" else "interactive",
            "deskgpu.io/user": user,
        },
        **kw,
    )


def nodes_at(ts: float) -> list[pc.NodeState]:
    a6000, h100, l40s = "NVIDIA RTX A6000", "NVIDIA H100 80GB HBM3", "NVIDIA L40S"
    lab_a = pc.NodeState(
        "lab-a",
        [
            _pod_gpu(0, "GPU-a0", a6000, "train", "alice", util_pct=95,
                     fb_used_mib=30000, fb_free_mib=19140),
            pc.GpuState(1, "GPU-a1", a6000, util_pct=0, fb_used_mib=0, fb_free_mib=49140),
        ],
        observed_at=ts,
    )  # fmt: skip
    b_gpus = [
        pc.GpuState(i, f"GPU-b{i}", h100, util_pct=0, fb_used_mib=0, fb_free_mib=81559)
        for i in range(8)
    ]
    b_gpus[0] = _pod_gpu(0, "GPU-b0", h100, "carol-dbg", "carol", util_pct=0,
                         fb_used_mib=0, fb_free_mib=81559)  # fmt: skip
    b_gpus[5].util_pct, b_gpus[5].fb_used_mib, b_gpus[5].fb_free_mib = 40, 8000, 73559
    lab_b = pc.NodeState(
        "lab-b",
        b_gpus,
        unmanaged=[pc.UnmanagedProc(5, "GPU-b5", 4242, "bob", "python", 8000)],
        activity=[pc.SessionActivity(ON_CLOUD["carol-dbg"], 1, 10.0)],
        observed_at=ts,
    )
    c_gpus = [pc.GpuState(1, "GPU-c1", l40s, util_pct=0, fb_used_mib=0, fb_free_mib=46068)]
    activity = []
    if ts >= DAVE_UP_SINCE:
        c_gpus.insert(0, _pod_gpu(0, "GPU-c0", l40s, "dave-nb", "dave", util_pct=0,
                                  fb_used_mib=20480, fb_free_mib=25588))  # fmt: skip
        activity.append(pc.SessionActivity(ON_CLOUD["dave-nb"], 0, 100.0 + (ts - NOW) / 1000))
    else:
        c_gpus.insert(0, pc.GpuState(0, "GPU-c0", l40s, util_pct=0, fb_used_mib=0,
                                     fb_free_mib=46068))  # fmt: skip
    lab_c = pc.NodeState("lab-c", c_gpus, activity=activity, observed_at=ts)
    return [lab_a, lab_b, lab_c]


def sky() -> SkyView:
    def session(name: str, user: str, since: float) -> Cluster:
        return Cluster(
            name=name,
            user=user,
            state=RUNNING,
            sky_status="UP",
            gpus="1",
            launched_at=since,
            cluster_name_on_cloud=ON_CLOUD[name],
            labels={LABEL_KIND: "interactive", LABEL_USER: user},
        )

    job = Job(
        id=7,
        name="train",
        user="alice",
        state=RUNNING,
        sky_status="RUNNING",
        gpus="A6000:1",
        submitted_at=NOW - 3600,
        started_at=NOW - 3500,
        cluster_name_on_cloud=ON_CLOUD["train"],
        labels={LABEL_KIND: "batch", LABEL_USER: "alice"},
    )
    return SkyView(
        available=True,
        endpoint="http://127.0.0.1:1",
        clusters=[
            session("carol-dbg", "carol", NOW - 2 * 86400),
            session("dave-nb", "dave", DAVE_UP_SINCE),
        ],
        jobs=[job],
    )


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[pc.NodeServer, pc.RealPrometheus]]:
    work = tmp_path_factory.mktemp("telemetry")
    with pc.NodeServer(nodes_at(NOW)) as server:
        targets = server.targets()
        lines = pc.history_lines(nodes_at, NOW - WEEK, NOW - 600, STEP, targets)
        pc.backfill(work / "tsdb", lines)
        with pc.RealPrometheus(work, targets, storage_dir=work / "tsdb") as prom:
            yield server, prom


@pytest.fixture
def host_config(tmp_path: Path, cluster: tuple[pc.NodeServer, pc.RealPrometheus]) -> Path:
    _, prom = cluster
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""box_name: lab
state_dir: {tmp_path / "state"}
telemetry:
  prometheus: {prom.url}
  stale_after: 1m
  scrape_interval: 15s
nodes:
  - {{name: lab-a, role: server, address: 10.0.0.10, gpus: {{A6000: 2}}}}
  - {{name: lab-b, role: agent, address: 10.0.0.11, gpus: {{H100: 8}}}}
  - {{name: lab-c, role: agent, address: 10.0.0.12, gpus: {{L40S: 2}}}}
"""
    )
    return path


@pytest.fixture
def skypilot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SkyPilot half as the guard would answer (the GPU half is under test)."""
    from deskgpu.skypilot import sdk

    monkeypatch.setattr(sdk, "fetch_queue", lambda _config, **_kw: sky())
    monkeypatch.setattr(sdk, "cluster_jobs", lambda _name, _config: (0, 0))
    monkeypatch.delenv("DESKGPU_TELEMETRY", raising=False)


def _gpus(doc: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(g["node"], g["index"]): g for g in doc["nvml"]["gpus"]}


def test_queue_json_shows_every_nodes_gpus_with_their_holders(cli, host_config, skypilot) -> None:
    result = cli("queue", "--json", "--config", str(host_config))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["nvml"]["source"] == "prometheus"
    assert [(n["name"], n["state"], n["processes"]) for n in doc["nvml"]["nodes"]] == [
        ("lab-a", "fresh", "fresh"),
        ("lab-b", "fresh", "fresh"),
        ("lab-c", "fresh", "fresh"),
    ]
    gpus = _gpus(doc)
    assert len(gpus) == 2 + 8 + 2
    train = gpus[("lab-a", 0)]
    assert train["utilization_gpu_pct"] == 95 and train["memory_used_mib"] == 30000
    [proc] = train["processes"]
    assert proc["pid"] is None and proc["holder"]["user"] == "alice"
    assert proc["holder"]["job"] == "train" and proc["holder"]["managed_job_id"] == 7
    carol = gpus[("lab-b", 0)]
    assert carol["processes"] == [] and carol["allocated_to"]["cluster"] == "carol-dbg"
    assert carol["allocated_to"]["user"] == "carol"
    [bob] = gpus[("lab-b", 5)]["processes"]
    assert bob["pid"] == 4242 and bob["used_memory_mib"] == 8000
    assert bob["holder"] == {**bob["holder"], "kind": "unmanaged", "unix_user": "bob"}
    assert bob["holder"]["command"] == "python"
    assert gpus[("lab-a", 1)]["processes"] == [] and gpus[("lab-a", 1)]["allocated_to"] is None
    assert doc["summary"]["gpus_allocated_idle"] == 1


def test_queue_screen_groups_gpus_by_node_and_names_the_holders(cli, host_config, skypilot) -> None:
    result = cli("queue", "--config", str(host_config), env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    positions = [out.index(f"GPUs on {n}") for n in ("lab-a", "lab-b", "lab-c")]
    assert positions == sorted(positions)
    assert "unmanaged bob (python)" in out
    assert "carol/carol-dbg" in out and "(allocated, idle)" in out
    assert "alice/train" in out
    assert "lab-c:0" in out  # dave-nb's GPUs column says where
    assert max(len(line) for line in out.splitlines()) <= 80


def test_reap_dry_run_decides_the_zombie_on_lab_c_over_the_recorded_week(
    cli, host_config, skypilot
) -> None:
    result = cli("reap", "--json", "--config", str(host_config))
    assert result.exit_code in (0, 3), result.stderr  # 3: zombies found in a dry run
    doc = json.loads(result.stdout)
    assert doc["evidence_source"] == "prometheus"
    by = {d["subject"]: d for d in doc["decisions"]}
    dave = by["dave-nb"]
    assert dave["action"] == "warn", dave
    assert dave["node"] == "lab-c" and dave["owner"] == "dave"
    assert any("idle" in r for r in dave["reasons"]), dave["reasons"]
    carol = by["carol-dbg"]
    assert carol["action"] == "keep" and any("SSH" in r for r in carol["reasons"]), carol
    bob = by["pid:4242@lab-b"]
    assert bob["action"] == "report-unmanaged" and bob["node"] == "lab-b"
    assert "train" not in by or by["train"]["action"] != "warn"


def test_the_zombie_on_lab_c_is_decided_as_one_box_decides_the_same_evidence(
    cli, host_config, skypilot, tmp_path: Path
) -> None:
    """The evidence reap built over Prometheus, its node left out, is a one-box evidence
    document; replayed (`reap --evidence`), it decides the same, for the same reasons."""
    recorded = tmp_path / "evidence.json"
    result = cli("reap", "--json", "--record", str(recorded), "--config", str(host_config))
    assert result.exit_code in (0, 3), result.stderr
    cluster_wide = {d["subject"]: d for d in json.loads(result.stdout)["decisions"]}
    doc = json.loads(recorded.read_text())
    [dave] = [s for s in doc["sessions"] if s["cluster"] == "dave-nb"]
    assert dave["node"] == "lab-c"
    samples = dave["gpu_samples"]
    assert len(samples) > 2 * 86400 / STEP  # an observation every 5 minutes since it started
    assert {tuple(row[1:]) for row in samples} == {(0, 0, 20480)}  # GPU 0, 0%, 20 GiB
    for session in doc["sessions"]:
        session.pop("node", None)
    for proc in doc["unmanaged"]:
        proc.pop("node", None)
    one_box = tmp_path / "one-box.json"
    one_box.write_text(json.dumps(doc))
    replayed = cli("reap", "--json", "--evidence", str(one_box), "--config", str(host_config))
    assert replayed.exit_code in (0, 3), replayed.stderr
    alone = {d["subject"]: d for d in json.loads(replayed.stdout)["decisions"]}
    assert alone["dave-nb"]["action"] == cluster_wide["dave-nb"]["action"] == "warn"
    where = [r.replace("on lab-c GPU", "on GPU") for r in cluster_wide["dave-nb"]["reasons"]]
    assert alone["dave-nb"]["reasons"] == where


def test_a_node_whose_exporter_stops_is_stale_in_queue_and_never_idle_for_reap(
    cli, host_config, skypilot, cluster
) -> None:
    server, prom = cluster
    before = server.node("lab-c")
    server.set_node(pc.NodeState(**{**before.__dict__, "dcgm_up": False}))
    try:
        prom.wait_for(
            'up{job="dcgm-exporter",node="lab-c"}', lambda r: r and r[0]["value"][1] == "0"
        )
        prom.wait_for('DCGM_FI_DEV_GPU_UTIL{node="lab-c"}', lambda r: not r)
        result = cli("queue", "--json", "--config", str(host_config))
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        lab_c = next(n for n in doc["nvml"]["nodes"] if n["name"] == "lab-c")
        assert lab_c["state"] == "stale" and "503" in (lab_c["note"] or ""), lab_c
        gpus = _gpus(doc)
        assert gpus[("lab-c", 0)]["stale"] and gpus[("lab-c", 1)]["stale"]
        assert "dave/dave-nb" in gpus[("lab-c", 0)]["error"]  # who had it when last seen
        assert doc["summary"]["gpus_free"] == 8 - 1  # lab-c's free GPU is not counted free
        screen = cli("queue", "--config", str(host_config))
        assert "GPUs on lab-c (STALE" in screen.stdout and "STALE" in screen.stdout
        reaped = cli("reap", "--json", "--config", str(host_config))
        decisions = {d["subject"]: d for d in json.loads(reaped.stdout)["decisions"]}
        assert decisions["dave-nb"]["action"] not in ("warn", "reap"), decisions["dave-nb"]
    finally:
        server.set_node(before)
        prom.wait_for(
            'up{job="dcgm-exporter",node="lab-c"}', lambda r: r and r[0]["value"][1] == "1"
        )


def test_report_totals_gpu_hours_per_node_and_per_researcher(cli, host_config, skypilot) -> None:
    """Over the recorded week: dave held lab-c GPU 0 idle for 3 days (72 GPU-h), carol
    lab-b GPU 0 idle all week, alice lab-a GPU 0 busy all week; bob's host process is no
    session. Counted on a 5-minute grid, within one grid step of the exact figures."""
    result = cli("report", "--json", "--since", "7d", "--config", str(host_config))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    nodes = {n["node"]: n for n in doc["nodes"]}
    assert list(nodes) == ["lab-a", "lab-b", "lab-c"]
    assert [nodes[n]["gpus"] for n in nodes] == [2, 8, 2]
    step_h = STEP / 3600
    week_h = (WEEK - 600) / 3600  # the backfill ends 10 minutes ago; the live scrapes since
    dave_h = (NOW - DAVE_UP_SINCE) / 3600
    assert abs(nodes["lab-c"]["gpu_hours_allocated"] - dave_h) <= 2 * step_h
    assert nodes["lab-c"]["gpu_hours_busy"] == 0 and nodes["lab-c"]["users"] == ["dave"]
    assert abs(nodes["lab-a"]["gpu_hours_busy"] - week_h) <= 2 * step_h + 600 / 3600
    assert nodes["lab-a"]["gpu_hours_idle"] == 0
    assert nodes["lab-b"]["gpu_hours_busy"] == 0 and nodes["lab-b"]["users"] == ["carol"]
    users = {u["user"]: u for u in doc["users"]}
    assert set(users) == {"alice", "carol", "dave"}
    assert users["dave"]["gpu_hours_allocated"] == nodes["lab-c"]["gpu_hours_allocated"]
    assert users["carol"]["gpu_hours_idle"] == nodes["lab-b"]["gpu_hours_idle"]
    sessions = {s["cluster"]: s for s in doc["sessions"]}
    assert sessions[ON_CLOUD["dave-nb"]]["gpus"] == ["lab-c:0"]
    assert sessions[ON_CLOUD["train"]]["job"] == "train"
    assert doc["box"]["gpus"] == 12
    text = cli("report", "--since", "7d", "--config", str(host_config))
    assert text.exit_code == 0 and "lab-c" in text.stdout and "NODE" in text.stdout


def test_a_recorded_cluster_snapshot_replays_the_same_screen(
    cli, host_config, skypilot, tmp_path: Path
) -> None:
    recorded = tmp_path / "cluster.json"
    live = cli("queue", "--record", str(recorded), "--config", str(host_config))
    assert live.exit_code == 0, live.stderr
    replayed = cli("queue", "--snapshot", str(recorded), "--config", str(host_config))
    assert replayed.exit_code == 0, replayed.stderr
    assert "GPUs on lab-b" in replayed.stdout and "unmanaged bob (python)" in replayed.stdout
    doc = json.loads(recorded.read_text())
    assert {g["node"] for g in doc["nvml"]["gpus"]} == {"lab-a", "lab-b", "lab-c"}


def test_a_node_prometheus_never_heard_from_is_listed_missing(
    cli, host_config, skypilot, tmp_path: Path
) -> None:
    text = host_config.read_text().replace(
        "  - {name: lab-c",
        "  - {name: lab-d, role: agent, address: 10.0.0.13, gpus: {L40S: 2}}\n  - {name: lab-c",
    )
    config = tmp_path / "four.yaml"
    config.write_text(text)
    result = cli("queue", "--json", "--config", str(config))
    doc = json.loads(result.stdout)
    lab_d = next(n for n in doc["nvml"]["nodes"] if n["name"] == "lab-d")
    assert lab_d["state"] == "missing" and "lab-d" in lab_d["note"]
    screen = cli("queue", "--config", str(config))
    assert "GPUs on lab-d: MISSING" in screen.stdout
