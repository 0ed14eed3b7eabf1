"""`deskgpu doctor`'s telemetry checks (issue 29) against a real Prometheus (Debian's
/usr/bin/prometheus, tests/promcluster.py) scraping served nodes: every target up is ok; a
node whose dcgm-exporter stopped fails, naming the node, the job and Prometheus' own error; a
URL nothing listens on fails within seconds; SkyPilot pods whose GPU series lack the copied
pod labels fail, naming the values file; no pod holding a GPU is a skip, never ok. Without
`telemetry:` every check is a skip. The probe's facts record and replay through the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from deskgpu.config import HostConfig
from deskgpu.config.nodes import Node
from deskgpu.config.telemetry import DCGM_JOB, NODE_EXPORTER_JOB, Telemetry
from deskgpu.doctor import probes
from deskgpu.doctor.checks import FAIL, OK, SKIP, WARN, Check, run_checks
from deskgpu.doctor.facts import HostFacts
from deskgpu.doctor.registry import BY_ID
from deskgpu.setup.telemetry import DCGM_VALUES
from deskgpu.telemetry.gpus import POD_CLUSTER_LABELS
from tests.promcluster import (
    GpuState,
    NodeServer,
    NodeState,
    RealPrometheus,
    cluster,
    free_port,
    sanitize_label_name,
)

IDS = ("telemetry.prometheus", "telemetry.targets", "telemetry.pod_labels")
H100 = "NVIDIA H100 80GB HBM3"
A6000 = "NVIDIA RTX A6000"
SKYPILOT_LABELS = {
    "parent": "skypilot",
    "skypilot-cluster": "train-1a2b",
    "skypilot-cluster-name": "train-1a2b",
    "skypilot-user": "alice",
}
NODES = (
    Node("lab-a6000", "server", {"A6000": 2}, "10.0.0.10"),
    Node("lab-h100-1", "agent", {"H100": 2}, "10.0.0.11"),
    Node("lab-h100-2", "agent", {"H100": 2}, "10.0.0.12"),
)


def _gpu(index: int, model: str, **pod: Any) -> GpuState:
    return GpuState(
        index=index,
        uuid=f"GPU-{index:08d}-0000-0000-0000-{len(model):012d}",
        model=model,
        util_pct=90 if pod else 0,
        fb_used_mib=40000 if pod else 0,
        fb_free_mib=40000,
        **pod,
    )


def _node(node: Node, **pod: Any) -> NodeState:
    model = A6000 if "A6000" in node.gpus else H100
    return NodeState(node.name, [_gpu(0, model, **pod), _gpu(1, model)])


def _config(url: str, nodes: tuple[Node, ...] = NODES, **telemetry: str) -> HostConfig:
    return HostConfig(
        box_name="lab",
        nodes=nodes,
        telemetry=Telemetry(url, **telemetry),
        source="/etc/deskgpu/config.yaml",
    )


def _facts(config: HostConfig, timeout_s: float = 4.0) -> HostFacts:
    """What `doctor` gathers for telemetry, on the server node (its hostname is its name)."""
    server = config.server_node
    return HostFacts(
        gathered_at=time.time(),
        hostname=server.name if server else "box",
        telemetry=probes.probe_telemetry(config, timeout_s),
    )


def _checks(facts: HostFacts, config: HostConfig) -> dict[str, Check]:
    return {c.id: c for c in run_checks(facts, config) if c.component == "telemetry"}


def _doctor(config: HostConfig) -> dict[str, Check]:
    return _checks(_facts(config), config)


def _lab_states(**pod: Any) -> list[NodeState]:
    """The three nodes; the server's GPU 0 in a pod when `pod` names one."""
    return [_node(NODES[0], **pod), _node(NODES[1]), _node(NODES[2])]


ALICE = {
    "pod": "train-1a2b-head",
    "namespace": "default",
    "container": "ray-node",
    "pod_labels": SKYPILOT_LABELS,
}
POD_SERIES = 'DCGM_FI_DEV_GPU_UTIL{pod!=""}'


@pytest.fixture(scope="module")
def lab_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Prometheus (it takes seconds to start) for the tests of the three-node lab."""
    with cluster(tmp_path_factory.mktemp("prom"), _lab_states(**ALICE)) as served:
        yield served


def _serve(server: NodeServer, prom: RealPrometheus, states: list[NodeState]) -> None:
    """Serve `states` and wait until Prometheus has scraped them: every target up, and the
    GPU series of pods what they hold."""
    for state in states:
        server.set_node(state)

    def held(labels: dict[str, str]) -> tuple[str, str, str]:
        return labels["node"], labels["pod"], labels.get(POD_CLUSTER_LABELS[0], "")

    pods = sorted(
        held(
            {
                "node": s.name,
                "pod": g.pod,
                **{sanitize_label_name(k): v for k, v in g.pod_labels.items()},
            }
        )
        for s in states
        for g in s.gpus
        if g.pod is not None
    )
    prom.wait_for("up == 1", lambda result: len(result) == 2 * len(states))
    prom.wait_for(POD_SERIES, lambda result: sorted(held(r["metric"]) for r in result) == pods)


@pytest.fixture
def lab(lab_prometheus: Any) -> tuple[NodeServer, RealPrometheus]:
    """The lab as a test starts it: every exporter up, the server's GPU 0 in alice's
    SkyPilot pod, labelled as dcgm-exporter with pod labels on labels it."""
    server, prom = lab_prometheus
    _serve(server, prom, _lab_states(**ALICE))
    return server, prom


def test_every_target_up_and_labelled_pods_is_ok(lab) -> None:
    _, prom = lab
    checks = _doctor(_config(prom.url))
    assert {i: c.status for i, c in checks.items()} == dict.fromkeys(IDS, OK), checks
    assert prom.url in checks["telemetry.prometheus"].detail
    targets = checks["telemetry.targets"].detail
    assert "3 nodes (lab-a6000, lab-h100-1, lab-h100-2): 6 targets up" in targets
    assert "default/train-1a2b-head on lab-a6000" in checks["telemetry.pod_labels"].detail


def test_a_node_whose_dcgm_exporter_stopped_fails_naming_it(lab) -> None:
    server, prom = lab
    server.node("lab-h100-1").dcgm_up = False
    prom.wait_for(f'up{{job="{DCGM_JOB}",node="lab-h100-1"}} == 0', lambda result: len(result) == 1)
    checks = _doctor(_config(prom.url))
    targets = checks["telemetry.targets"]
    assert targets.status == FAIL, targets
    assert f"lab-h100-1 {DCGM_JOB}" in targets.detail
    assert "is down" in targets.detail and "503" in targets.detail  # Prometheus' lastError
    assert "lab-a6000" not in targets.detail and "lab-h100-2" not in targets.detail
    assert targets.fix is not None and "on lab-h100-1" in targets.fix
    assert DCGM_VALUES in targets.fix
    assert checks["telemetry.prometheus"].status == OK


def test_a_node_whose_node_exporter_stopped_fails_naming_it(lab) -> None:
    server, prom = lab
    server.node("lab-h100-2").node_exporter_up = False
    prom.wait_for(
        f'up{{job="{NODE_EXPORTER_JOB}",node="lab-h100-2"}} == 0', lambda result: len(result) == 1
    )
    targets = _doctor(_config(prom.url))["telemetry.targets"]
    assert targets.status == FAIL
    assert f"lab-h100-2 {NODE_EXPORTER_JOB}" in targets.detail
    assert targets.fix is not None and "prometheus-node-exporter" in targets.fix


def test_a_node_prometheus_does_not_scrape_fails_and_an_unknown_one_warns(lab) -> None:
    _, prom = lab
    renamed = (*NODES[:2], dataclasses.replace(NODES[2], name="lab-h100-3"))
    targets = _doctor(_config(prom.url, renamed))["telemetry.targets"]
    assert targets.status == FAIL
    assert f"lab-h100-3: no {DCGM_JOB} target" in targets.detail
    assert "not in the host config" in targets.detail and "(node lab-h100-2)" in targets.detail
    assert targets.fix is not None and "setup render --node lab-a6000" in targets.fix
    # A node that left the config, its targets still scraped: a warning, the rest ok.
    targets = _doctor(_config(prom.url, NODES[:2]))["telemetry.targets"]
    assert targets.status == WARN, targets
    assert "not in the host config" in targets.detail and "lab-h100-2" in targets.detail


def test_a_target_not_scraped_within_stale_after_fails(lab) -> None:
    _, prom = lab
    config = _config(prom.url, stale_after="2m")
    facts = _facts(config)
    assert facts.telemetry is not None and facts.telemetry.server_time is not None
    assert _checks(facts, config)["telemetry.targets"].status == OK
    facts.telemetry.server_time += 600  # as if Prometheus stopped scraping 10 minutes ago
    targets = _checks(facts, config)["telemetry.targets"]
    assert targets.status == FAIL
    assert "last scraped 10m" in targets.detail and "stale_after 2m" in targets.detail


def test_prometheus_not_running_fails_within_seconds() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = _config(url)
    started = time.monotonic()
    checks = _doctor(config)
    assert time.monotonic() - started < 5
    prometheus = checks["telemetry.prometheus"]
    assert prometheus.status == FAIL
    assert url in prometheus.detail
    assert prometheus.fix is not None and "systemctl status prometheus" in prometheus.fix
    for check_id in IDS[1:]:
        assert checks[check_id].status == SKIP
        assert checks[check_id].detail == "needs telemetry.prometheus to pass; it is fail"


def test_skypilot_pods_without_the_copied_labels_fail(lab) -> None:
    server, prom = lab
    bare = {"pod": "train-9z-head", "namespace": "default", "container": "ray-node"}
    _serve(server, prom, _lab_states(**bare))
    pod_labels = _doctor(_config(prom.url))["telemetry.pod_labels"]
    assert pod_labels.status == FAIL, pod_labels
    assert "default/train-9z-head on lab-a6000" in pod_labels.detail
    assert all(f"`{label}`" in pod_labels.detail for label in POD_CLUSTER_LABELS)
    assert pod_labels.fix is not None and DCGM_VALUES in pod_labels.fix


def test_no_pod_on_any_gpu_is_a_skip_not_ok(lab) -> None:
    server, prom = lab
    _serve(server, prom, _lab_states())
    checks = _doctor(_config(prom.url))
    assert checks["telemetry.targets"].status == OK
    pod_labels = checks["telemetry.pod_labels"]
    assert pod_labels.status == SKIP
    assert "until a job runs" in pod_labels.detail


def test_only_pods_that_are_not_skypilots_tell_nothing(lab) -> None:
    """doctor's own GPU pod (`doctor --gpu-pod`) carries no SkyPilot label, rightly."""
    server, prom = lab
    _serve(server, prom, _lab_states(pod="deskgpu-doctor-gpu-1a2b", namespace="default"))
    pod_labels = _doctor(_config(prom.url))["telemetry.pod_labels"]
    assert pod_labels.status == SKIP
    assert "deskgpu-doctor-gpu-1a2b" in pod_labels.detail


def test_a_single_box_is_the_node_named_box_name(tmp_path) -> None:
    state = NodeState("lab", [_gpu(0, A6000, pod="t-1-head", pod_labels=SKYPILOT_LABELS)])
    with cluster(tmp_path / "prom", [state]) as (_, prom):
        config = HostConfig(box_name="lab", gpus={"A6000": 1}, telemetry={"prometheus": prom.url})
        checks = _doctor(config)
    assert {i: c.status for i, c in checks.items()} == dict.fromkeys(IDS, OK), checks
    assert "1 node (lab): 2 targets up" in checks["telemetry.targets"].detail


def test_without_telemetry_every_check_is_a_skip_saying_why() -> None:
    for config in (HostConfig(), HostConfig(nodes=NODES)):
        facts = HostFacts(gathered_at=time.time(), hostname="lab-a6000")
        checks = _checks(facts, config)
        assert set(checks) == set(IDS)
        for check in checks.values():
            assert check.status == SKIP, check
            assert "telemetry" in check.detail
    assert all(BY_ID[i].on == "server" for i in IDS)


def test_an_agent_leaves_them_to_the_server(tmp_path) -> None:
    config = _config(f"http://127.0.0.1:{free_port()}")
    facts = HostFacts(gathered_at=time.time(), hostname="lab-h100-1")
    for check in _checks(facts, config).values():
        assert check.status == SKIP
        assert "`sudo deskgpu doctor` on lab-a6000" in check.detail


def test_the_facts_record_and_replay_through_the_cli(cli, lab, tmp_path) -> None:
    server, prom = lab
    server.node("lab-h100-1").dcgm_up = False
    prom.wait_for(f'up{{job="{DCGM_JOB}",node="lab-h100-1"}} == 0', lambda result: len(result) == 1)
    config = _config(prom.url)
    facts = _facts(config)
    recorded = tmp_path / "facts.json"
    recorded.write_text(json.dumps(facts.to_dict()))
    assert HostFacts.from_dict(json.loads(recorded.read_text())) == facts
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "box_name": "lab",
                "nodes": [n.as_mapping() for n in NODES],
                "telemetry": {"prometheus": prom.url},
            }
        )
    )
    result = cli("doctor", "--json", "--facts", str(recorded), "--config", str(config_file))
    assert result.exit_code == 3, result.stderr
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["telemetry.prometheus"]["status"] == OK
    assert checks["telemetry.targets"]["status"] == FAIL
    assert f"lab-h100-1 {DCGM_JOB}" in checks["telemetry.targets"]["detail"]
    assert checks["telemetry.pod_labels"]["status"] == OK


def test_facts_without_telemetry_are_written_as_before() -> None:
    assert "telemetry" not in HostFacts(gathered_at=0.0).to_dict()
