"""The host config's `nodes:` and `storage:` (issue 28): one cluster, one inventory, located
errors with their fix like every other key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from deskgpu.config import HostConfig, load_config
from deskgpu.config.nodes import Node, SharedStorage
from deskgpu.errors import SpecError
from deskgpu.setup.render import config_document
from tests.conftest import EXAMPLES

CLUSTER = EXAMPLES / "cluster/host-config.yaml"
THREE = """\
nodes:
  - name: lab-a6000
    role: server
    address: 10.0.0.10
    gpus: {A6000: 4}
  - name: lab-h100-1
    role: agent
    address: 10.0.0.11
    gpus: {H100: 8}
  - name: lab-h100-2
    role: agent
    address: 10.0.0.12
    gpus: {H100: 8}
"""


def test_the_cluster_example_loads_with_the_inventory_summed_over_its_nodes() -> None:
    config = load_config(CLUSTER)
    assert [(n.name, n.role) for n in config.nodes] == [
        ("lab-a6000", "server"),
        ("lab-h100-1", "agent"),
        ("lab-h100-2", "agent"),
    ]
    assert config.gpus == {"A6000": 4, "H100": 16} and config.gpu_count == 20
    assert config.server_node == Node("lab-a6000", "server", {"A6000": 4}, "10.0.0.10")
    assert config.storage is None  # the server's own NFS exports
    assert (
        config.describe_nodes() == "lab-a6000: 4x A6000; lab-h100-1: 8x H100; lab-h100-2: 8x H100"
    )


def test_without_nodes_a_config_is_one_box_as_before() -> None:
    config = HostConfig(gpus={"A6000": 4})
    assert config.nodes == () and config.server_node is None and config.gpus == {"A6000": 4}


def test_in_code_the_inventory_follows_the_nodes_whatever_gpus_says() -> None:
    """One source: `dataclasses.replace` carries the old sum along; the nodes win."""
    config = load_config(CLUSTER)
    fewer = dataclasses.replace(config, nodes=config.nodes[:2])
    assert fewer.gpus == {"A6000": 4, "H100": 8}


def test_a_cluster_written_out_reads_back_equal(tmp_path: Path) -> None:
    for config in (
        load_config(CLUSTER),
        dataclasses.replace(
            load_config(CLUSTER),
            storage=SharedStorage("nas.lab:/export/data", "nas.lab:/export/ckpt"),
        ),
    ):
        doc = config_document(config)
        assert "gpus" not in doc  # derived: written once, in the nodes
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(doc))
        assert dataclasses.replace(load_config(path), source=config.source) == config


def test_a_nas_is_named_once_for_every_node(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        THREE + "storage:\n  nfs: {data: 'nas.lab:/export/data', "
        "checkpoints: 'nas.lab:/export/checkpoints'}\n"
    )
    assert load_config(path).storage == SharedStorage(
        "nas.lab:/export/data", "nas.lab:/export/checkpoints"
    )


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        (
            "gpus: {A6000: 4}\n" + THREE,
            ":1:1:",
            ["gpus: is derived from `nodes:`", "remove the top-level `gpus:`"],
        ),
        (
            THREE.replace("role: agent\n    address: 10.0.0.11", "role: server\n    address: x"),
            ":7:11:",
            ["nodes[1].role: a second server; 'lab-a6000'", "make this one `role: agent`"],
        ),
        (
            THREE.replace("role: server", "role: agent"),
            ":1:1:",
            ["nodes: no node has `role: server`", "`role: server`"],
        ),
        (
            THREE.replace("lab-h100-2", "lab-h100-1"),
            ":10:11:",
            ["nodes[2].name: node 'lab-h100-1' is listed twice (first at nodes[1])"],
        ),
        (
            THREE.replace("    address: 10.0.0.10\n", ""),
            ":2:5:",
            ["nodes[0]: node 'lab-a6000' has no `address`", "add `address: "],
        ),
        (
            "storage: {nfs: {data: 'nas:/d', checkpoints: 'nas:/c'}}\n",
            ":1:1:",
            ["storage: names the storage the nodes share", "add `nodes:`"],
        ),
        (
            THREE.replace("role: server", "role: master"),
            ":3:11:",
            ["nodes[0].role", "`role: server` for the box running k3s's server"],
        ),
        (
            THREE.replace("name: lab-a6000", "name: Lab_A6000"),
            ":2:11:",
            ["nodes[0].name", "as `kubectl get nodes` shows it"],
        ),
        (
            THREE + "storage: {nfs: {data: /export/data, checkpoints: 'nas:/c'}}\n",
            ":14:",
            ["storage.nfs.data", "`HOST:/PATH`"],
        ),
        (
            THREE.replace("gpus: {H100: 8}", "gpus: {H100: 0}", 1),
            ":9:18:",
            ["nodes[1].gpus.H100", "e.g. `gpus: {H100: 8}`"],
        ),
    ],
    ids=[
        "gpus-beside-nodes",
        "two-servers",
        "no-server",
        "duplicate-name",
        "no-address",
        "storage-without-nodes",
        "bad-role",
        "bad-name",
        "storage-not-host-path",
        "zero-gpus",
    ],
)
def test_a_bad_cluster_is_located_with_its_fix(
    tmp_path: Path, text: str, where: str, words: list[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_config(path)
    (line,) = info.value.lines()
    assert line.startswith(f"{path}{where}"), line
    for word in words:
        assert word in line, line


def test_a_bad_cluster_is_exit_2_with_the_line_for_every_command(tmp_path: Path, cli) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(THREE.replace("role: server", "role: agent"))
    for args in (
        ("setup", "render", "--out", str(tmp_path / "o"), "--config", str(path)),
        ("doctor", "--config", str(path)),
        ("submit", str(EXAMPLES / "cpu-only.yaml"), "--dry-run", "--config", str(path)),
    ):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith(f"{path}:1:1: nodes: no node has `role: server`")
        assert "Traceback" not in result.stderr
