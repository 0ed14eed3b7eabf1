"""`deskgpu doctor` on a cluster of boxes (issue 28), through the real CLI on hand-built facts
(tests/fixtures/doctor/cluster/make.py): a healthy agent passes; each broken agent (not joined,
wrong label, mount missing, version skew, clock skew) fails its check with a fix; the server
lists every node with its state; a single box reports nothing of the cluster's. And the
cluster probe, pointed at files under a temp dir."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from deskgpu.config import load_config
from deskgpu.doctor import probes
from deskgpu.doctor.facts import HostFacts
from deskgpu.doctor.registry import CLUSTER_ONLY, REGISTRY
from tests.conftest import EXAMPLES
from tests.fixtures.doctor.cluster import make

CLUSTER = str(EXAMPLES / "cluster/host-config.yaml")
FIXTURES = Path(make.__file__).parent


def _doctor(cli, name: str, config: str = CLUSTER) -> tuple[int, dict[str, dict[str, Any]]]:
    result = cli("doctor", "--json", "--facts", str(FIXTURES / name), "--config", config)
    assert result.exit_code in (0, 3), result.stderr
    doc = json.loads(result.stdout)
    return result.exit_code, {c["id"]: c for c in doc["checks"]}


def test_the_fixtures_are_the_generators_output() -> None:
    """One source: regenerate with `uv run python -m tests.fixtures.doctor.cluster.make`."""
    for name, doc in make.generated().items():
        assert json.loads((FIXTURES / name).read_text()) == doc, name


def test_a_healthy_agent_passes_every_check_it_runs(cli) -> None:
    code, checks = _doctor(cli, "agent-healthy.json")
    assert code == 0, {k: v for k, v in checks.items() if v["status"] == "fail"}
    for name in ("node", "joined", "labels", "gpus", "shared_storage", "version", "clock"):
        assert checks[f"cluster.{name}"]["status"] == "ok", checks[f"cluster.{name}"]
    assert "lab-h100-1, an agent of a 3-node cluster" in checks["cluster.node"]["detail"]
    # Its own GPUs, not the cluster's 20: driver.gpus judges the node's `gpus:`.
    assert checks["driver.gpus"]["status"] == "ok"
    assert "8x H100" in checks["driver.gpus"]["detail"]
    # The server's checks say where they run instead of failing here.
    for check_id in ("kubernetes.nodes", "skypilot.api_server", "operations.reap_scheduled"):
        assert checks[check_id]["status"] == "skip"
        assert "sudo deskgpu doctor` on lab-a6000" in checks[check_id]["detail"]
    assert checks["operations.observe_scheduled"]["status"] == "ok"


@pytest.mark.parametrize(
    ("fixture", "check_id", "detail", "fix"),
    [
        (
            "agent-not-joined.json",
            "cluster.joined",
            "lab-h100-1 has not joined",
            "sudo journalctl -u k3s-agent -n 50",
        ),
        (
            "agent-wrong-label.json",
            "cluster.labels",
            "lab-h100-1 has skypilot.co/accelerator=a6000",
            "sudo k3s kubectl label node lab-h100-1 --overwrite skypilot.co/accelerator=h100",
        ),
        (
            "agent-mount-missing.json",
            "cluster.shared_storage",
            "/checkpoints is not mounted (the shared checkpoints",
            "sudo systemctl enable --now checkpoints.mount",
        ),
        (
            "agent-version-skew.json",
            "cluster.version",
            "deskgpu 0.1.0 here, 0.0.9 on the server (lab-a6000)",
            "install the same deskgpu on every node",
        ),
        (
            "agent-clock-skew.json",
            "cluster.clock",
            "s behind the server's (more than 2 s)",
            "sudo timedatectl set-ntp true",
        ),
    ],
    ids=["not-joined", "wrong-label", "mount-missing", "version-skew", "clock-skew"],
)
def test_a_broken_agent_fails_its_check_with_the_fix(cli, fixture, check_id, detail, fix) -> None:
    code, checks = _doctor(cli, fixture)
    assert code == 3
    check = checks[check_id]
    assert check["status"] == "fail", check
    assert detail in check["detail"], check
    assert fix in check["fix"], check
    failed = [c for c in checks.values() if c["status"] == "fail"]
    assert [c["id"] for c in failed] == [check_id]  # only what is broken fails


def test_a_not_joined_agent_skips_what_needs_the_cluster(cli) -> None:
    _, checks = _doctor(cli, "agent-not-joined.json")
    for name in ("labels", "gpus", "version"):
        assert checks[f"cluster.{name}"]["detail"] == "needs cluster.joined to pass; it is fail"


def test_the_server_lists_every_node_with_its_state(cli) -> None:
    code, checks = _doctor(cli, "server-three-nodes.json")
    assert code == 0
    nodes = checks["cluster.nodes"]
    assert nodes["status"] == "ok"
    assert nodes["detail"] == (
        "lab-a6000 (server): Ready, 4/4 GPUs; lab-h100-1 (agent): Ready, 8/8 GPUs; "
        "lab-h100-2 (agent): Ready, 8/8 GPUs"
    )
    assert checks["cluster.shared_storage"]["detail"].endswith("exported to the agents")
    assert checks["kubernetes.gpu_allocatable"]["status"] == "ok"  # 20 over the nodes
    assert checks["cluster.joined"]["status"] == "skip"


def test_the_server_names_a_node_that_has_not_joined_and_how(cli) -> None:
    _, checks = _doctor(cli, "server-node-missing.json")
    nodes = checks["cluster.nodes"]
    assert nodes["status"] == "fail" and "lab-h100-2: not joined" in nodes["detail"]
    assert nodes["fix"].startswith(
        "on lab-h100-2: `deskgpu setup render --node lab-h100-2 --out /tmp/box && sudo sh "
        "/tmp/box/install.sh`"
    )


def test_a_single_box_reports_nothing_of_a_cluster(cli) -> None:
    box = str(Path(make.__file__).parents[1] / "host-config.yaml")
    result = cli(
        "doctor", "--json", "--facts", str(make.BASE), "--config", box,
    )  # fmt: skip
    ids = [c["id"] for c in json.loads(result.stdout)["checks"]]
    assert ids == [spec.id for spec in REGISTRY if spec.on not in CLUSTER_ONLY]
    assert not any(i.startswith("cluster.") for i in ids)


def test_a_host_the_cluster_does_not_name_fails_and_says_how(cli, tmp_path) -> None:
    doc = json.loads((FIXTURES / "agent-healthy.json").read_text())
    doc["hostname"] = "spare-box"
    doc["cluster"]["k3s_config"] = {"path": "/etc/rancher/k3s/config.yaml", "exists": False}
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(doc))
    result = cli("doctor", "--json", "--facts", str(facts), "--config", CLUSTER)
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["cluster.node"]["status"] == "fail"
    assert (
        "this host (spare-box) is none of the host config's nodes"
        in (checks["cluster.node"]["detail"])
    )
    assert checks["skypilot.api_server"]["detail"].startswith("this host is none of")


# ---------------------------------------------------------------------------------------------
# The probe


def test_the_cluster_probe_reads_an_agent_that_has_not_joined(tmp_path, monkeypatch) -> None:
    k3s_config = tmp_path / "k3s-config.yaml"
    k3s_config.write_text("server: https://10.0.0.10:6443\nnode-name: lab-h100-1\n")
    mounts = tmp_path / "mounts"
    mounts.write_text("10.0.0.10:/data /data nfs4 ro,hard 0 0\n")
    paths = probes.ProbePaths(
        k3s_config=str(k3s_config),
        mounts=str(mounts),
        k3s_kubeconfig=str(tmp_path / "no-admin-kubeconfig"),
        kubelet_kubeconfig=str(tmp_path / "no-kubelet-kubeconfig"),
    )
    config = load_config(Path(CLUSTER))
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no curl, timedatectl or kubectl: nothing leaves
    facts = probes.probe_cluster(config, paths, timeout_s=1.0)
    assert facts.server_date is not None and facts.server_date.missing
    assert facts.ntp is not None and facts.ntp.missing
    assert facts.k3s_config is not None and "lab-h100-1" in (facts.k3s_config.text or "")
    assert facts.mounts is not None and facts.mounts.text == mounts.read_text()
    assert facts.nodes is not None and not facts.nodes.ok
    assert "no-kubelet-kubeconfig: no such file" in facts.nodes.stderr
    if os.geteuid() == 0:
        assert facts.checkpoints_write is not None
    # What it gathered survives --record / --facts.
    host = HostFacts(gathered_at=1.0, cluster=facts)
    again = HostFacts.from_dict(json.loads(json.dumps(host.to_dict())))
    assert again.cluster == facts


def test_a_write_to_the_checkpoint_root_leaves_nothing(tmp_path) -> None:
    assert probes._try_write(str(tmp_path)) == "ok"
    assert list(tmp_path.iterdir()) == []
    assert probes._try_write(str(tmp_path / "missing")) == "No such file or directory"
