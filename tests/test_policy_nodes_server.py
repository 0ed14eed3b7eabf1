"""The per-node GPU rules on a real API server started from the files `deskgpu setup render`
writes for the server node of a 3-node cluster (a 4x A6000 server, two 8x H100 agents):
SkyPilot's own request handling runs the admin policy, as on the box (issue 28).

The server runs as the rendered `skypilot-api.service` runs it (its ExecStart and
Environment; HOME laid out from the rendered `~/.sky`: config, plugins, the accelerator
catalog of the cluster's GPUs), on a free loopback port; the rendered host config stands in for
`/etc/deskgpu/config.yaml`. Requests are `/validate` bodies built by SkyPilot's own payload
classes (tests/raw_request.py), the request every `sky launch` sends first.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskgpu.config import SYSTEM_CONFIG, load_config
from deskgpu.setup.agent import render_node
from deskgpu.setup.render import SERVER_UNIT, Tools, write
from tests.apiserver import free_port, running_api_server
from tests.conftest import EXAMPLES
from tests.raw_request import body_for, post

pytestmark = pytest.mark.apiserver

CLUSTER = EXAMPLES / "cluster/host-config.yaml"
NODES = "lab-a6000: 4x A6000; lab-h100-1: 8x H100; lab-h100-2: 8x H100"
# Sizing for a loaded 2-core test machine (tests/test_hardening_server.py says why).
TEST_SIZING = {"SKYPILOT_POD_CPU_CORE_LIMIT": "1", "SKYPILOT_POD_MEMORY_GB_LIMIT": "4"}


def _server_files(tmp: Path, port: int) -> tuple[Path, dict[str, str]]:
    """The server node's rendered files, laid out as its unit would find them."""
    host_config = tmp / "host-config.yaml"
    host_config.write_text(
        CLUSTER.read_text().replace("127.0.0.1:46580", f"127.0.0.1:{port}")
        + "doctor:\n  require_admin_policy: true\n"
    )
    config = load_config(host_config)
    out = tmp / "rendered"
    tools = Tools(sys.executable, "deskgpu")
    write(render_node(config, tools, host_config.read_text(), node="lab-a6000"), out)
    assert (out / "etc/exports.d/deskgpu.exports").is_file()  # the server's, not one box's
    env: dict[str, str] = {}
    for line in (out / "etc/systemd/system" / SERVER_UNIT).read_text().splitlines():
        if line.startswith("Environment="):
            env.update(p.split("=", 1) for p in shlex.split(line.removeprefix("Environment=")))
    home = tmp / "server-home"
    shutil.copytree(out / env["HOME"].lstrip("/"), home)
    env.update(HOME=str(home), KUBECONFIG=str(home / ".kube/config"), **TEST_SIZING)
    env["DESKGPU_CONFIG"] = str(out / SYSTEM_CONFIG.relative_to("/"))
    return home, env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("cluster-server")
    port = free_port()
    home, env = _server_files(tmp, port)
    assert "H100" in (home / ".sky/catalogs/v8/common/accelerators.csv").read_text()
    with running_api_server(
        home, deploy=True, port=port, extra_env={**env, "SKYPILOT_API_SERVER_ENDPOINT": None}
    ) as url:
        yield url


def _validate(url: str, task: str) -> dict[str, Any]:
    """POST /validate as alice (the test runs as root, whom the guard takes at their word)."""
    import json

    doc = body_for("/validate", task, None)
    doc["env_vars"]["SKYPILOT_USER"] = "alice"
    status, _, raw = post(url + "/validate", doc)
    detail = json.loads(raw or b"{}").get("detail") if status != 200 else None
    detail = json.loads(detail) if isinstance(detail, str) else (detail or {})
    return {"status": status, "type": detail.get("type"), "error": str(detail.get("message"))}


def _task(gpus: str, *, num_nodes: int = 1, node: str | None = None) -> str:
    text = f"name: t\nnum_nodes: {num_nodes}\nresources:\n  infra: k8s\n  accelerators: {gpus}\n"
    if node:
        text += (
            "config:\n  kubernetes:\n    pod_config:\n      spec:\n"
            f"        nodeSelector: {{kubernetes.io/hostname: {node}}}\n"
        )
    return text + "run: echo hi\n"


def test_eight_h100_on_one_node_pass(server: str) -> None:
    answer = _validate(server, _task("H100:8"))
    assert answer["status"] == 200, answer


def test_six_a6000_are_refused_naming_the_four_gpu_node(server: str) -> None:
    answer = _validate(server, _task("A6000:6"))
    assert answer["type"] == "UserRequestRejectedByPolicy", answer
    assert "gpu_inventory: asks for A6000:6" in answer["error"]
    assert NODES in answer["error"] and "A6000:4 per node (lab-a6000)" in answer["error"]


def test_two_nodes_of_eight_h100_pass(server: str) -> None:
    answer = _validate(server, _task("H100:8", num_nodes=2))
    assert answer["status"] == 200, answer
    refused = _validate(server, _task("H100:8", num_nodes=3))
    assert "on each of 3 nodes" in refused["error"], refused


def test_a_pin_to_an_unknown_node_is_refused(server: str) -> None:
    answer = _validate(server, _task("H100:8", node="lab-gpu9"))
    assert answer["type"] == "UserRequestRejectedByPolicy", answer
    assert "node: " in answer["error"]
    assert "'lab-gpu9', which is not one of the cluster's nodes" in answer["error"]
    assert "pin it to one of lab-a6000, lab-h100-1, lab-h100-2" in answer["error"]
    known = _validate(server, _task("H100:8", node="lab-h100-2"))
    assert known["status"] == 200, known
