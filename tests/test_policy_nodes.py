"""The house rules on a cluster of boxes (issue 28): a job may ask for at most what one node
has, times its node count; a pin names a node of the cluster. Judged by the one
implementation `deskgpu submit` and the server's admin policy share: here through the real
CLI and through SkyPilot's own policy machinery on real `sky.Task`s
(tests/test_policy_nodes_server.py: on a real API server started from rendered files)."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import HostConfig, load_config
from deskgpu.house_rules import apply_house_rules, check_house_rules
from deskgpu.kubenames import HOSTNAME_LABEL
from tests.conftest import EXAMPLES

CLUSTER = EXAMPLES / "cluster/host-config.yaml"
NODES = "lab-a6000: 4x A6000; lab-h100-1: 8x H100; lab-h100-2: 8x H100"


def _spec(tmp: Path, text: str) -> Path:
    path = tmp / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _dry_run(cli, tmp: Path, text: str) -> Any:
    return cli("submit", str(_spec(tmp, text)), "--dry-run", "--config", str(CLUSTER))


# ---------------------------------------------------------------------------------------------
# deskgpu submit: the spec's `gpus`, `nodes` and `node` against the nodes


def test_eight_h100_fit_one_node(cli, tmp_path) -> None:
    result = _dry_run(cli, tmp_path, "name: big\ngpus: H100:8\nrun: python train.py\n")
    assert result.exit_code == 0, result.stderr
    task = yaml.safe_load(result.stdout)
    assert task["resources"]["accelerators"] == "H100:8"
    assert "num_nodes" not in task


def test_six_a6000_are_refused_naming_the_four_gpu_node(cli, tmp_path) -> None:
    result = _dry_run(cli, tmp_path, "name: big\ngpus: A6000:6\nrun: python train.py\n")
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{tmp_path / 'job.yaml'}:2:7: gpus: asks for A6000:6"), line
    assert NODES in line
    assert "ask for at most A6000:4 per node (lab-a6000)" in line


def test_two_nodes_of_eight_h100_become_num_nodes(cli, tmp_path) -> None:
    result = _dry_run(cli, tmp_path, "name: big\ngpus: H100:8\nnodes: 2\nrun: torchrun x.py\n")
    assert result.exit_code == 0, result.stderr
    task = yaml.safe_load(result.stdout)
    assert task["num_nodes"] == 2 and task["resources"]["accelerators"] == "H100:8"


def test_three_nodes_of_eight_h100_are_more_than_the_cluster_has(cli, tmp_path) -> None:
    result = _dry_run(cli, tmp_path, "name: big\ngpus: H100:8\nnodes: 3\nrun: x\n")
    assert result.exit_code == 2
    assert "asks for H100:8 on each of 3 nodes" in result.stderr
    assert "at most `nodes: 2` of H100:8 (lab-h100-1, lab-h100-2 have that many)" in result.stderr


def test_a_bare_count_picks_the_models_one_node_has_that_many_of(cli, tmp_path) -> None:
    result = _dry_run(cli, tmp_path, "name: big\ngpus: 6\nrun: x\n")
    assert result.exit_code == 0, result.stderr
    assert yaml.safe_load(result.stdout)["resources"]["accelerators"] == "H100:6"
    # 16 H100s in the cluster, but never 16 on one node.
    refused = _dry_run(cli, tmp_path, "name: big\ngpus: 16\nrun: x\n")
    assert refused.exit_code == 2 and "gpus: asks for A6000:16 or H100:16" in refused.stderr


def test_a_pin_becomes_a_node_selector(cli, tmp_path) -> None:
    result = _dry_run(cli, tmp_path, "name: big\ngpus: H100:8\nnode: lab-h100-2\nrun: x\n")
    assert result.exit_code == 0, result.stderr
    spec = yaml.safe_load(result.stdout)["config"]["kubernetes"]["pod_config"]["spec"]
    assert spec["nodeSelector"] == {HOSTNAME_LABEL: "lab-h100-2"}
    assert {v["name"] for v in spec["volumes"]} == {"deskgpu-data", "deskgpu-checkpoints"}


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        (
            "name: big\ngpus: H100:8\nnode: lab-gpu9\nrun: x\n",
            ":3:7: node:",
            ["no node 'lab-gpu9' in the cluster", NODES, "pin one of lab-a6000, lab-h100-1"],
        ),
        (
            "name: big\ngpus: H100:8\nnode: lab-a6000\nrun: x\n",
            ":2:7: gpus:",
            ["asks for H100:8, all on node lab-a6000, which has 4x A6000"],
        ),
        (
            "name: big\ngpus: H100:8\nnode: lab-h100-1\ninfra: aws\nrun: x\n",
            ":3:7: node:",
            ["`infra` sends it elsewhere"],
        ),
        ("name: big\ngpus: L40S:1\nrun: x\n", ":2:7: gpus:", ["the cluster has no L40S GPUs"]),
        ("name: big\nnodes: 0\nrun: x\n", ":2:8: nodes:", ["`nodes: 2`"]),
    ],
    ids=["unknown-node", "pinned-node-too-small", "pin-elsewhere", "no-such-model", "zero-nodes"],
)
def test_a_spec_the_cluster_cannot_run_is_located(cli, tmp_path, text, where, words) -> None:
    result = _dry_run(cli, tmp_path, text)
    assert result.exit_code == 2, result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{tmp_path / 'job.yaml'}{where}"), line
    for word in words:
        assert word in line, line


def test_a_single_box_has_no_node_to_pin(cli, tmp_path) -> None:
    spec = _spec(tmp_path, "name: big\ngpus: A6000:1\nnode: lab-a6000\nrun: x\n")
    result = cli("submit", str(spec), "--dry-run", "--config", str(EXAMPLES / "host-config.yaml"))
    assert result.exit_code == 2
    assert ":3:7: node: this box is one node" in result.stderr


# ---------------------------------------------------------------------------------------------
# The admin policy, through SkyPilot's own machinery

sky = pytest.importorskip("sky")
from sky import admin_policy, exceptions, skypilot_config  # noqa: E402
from sky.server.requests.request_names import AdminPolicyRequestName as Req  # noqa: E402
from sky.utils import admin_policy_utils, config_utils  # noqa: E402


@pytest.fixture
def cluster_policy(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DESKGPU_CONFIG", str(CLUSTER))
    monkeypatch.setenv("SKYPILOT_USER", "alice")
    with skypilot_config.replace_skypilot_config_in_process(
        config_utils.Config({"admin_policy": "deskgpu.policy.HouseRules"})
    ):
        yield


def _through(text: str) -> dict[str, Any]:
    task = sky.Task.from_yaml_config(yaml.safe_load(textwrap.dedent(text)))
    dag, _ = admin_policy_utils.apply(task, request_name=Req.JOBS_LAUNCH)
    (out,) = dag.tasks
    cfg: dict[str, Any] = out.to_yaml_config()
    return cfg


def _refused(text: str) -> str:
    task = sky.Task.from_yaml_config(yaml.safe_load(textwrap.dedent(text)))
    with pytest.raises(exceptions.UserRequestRejectedByPolicy) as info:
        admin_policy_utils.apply(task, request_name=Req.JOBS_LAUNCH)
    return str(info.value)


PINNED = """\
name: t
num_nodes: {n}
resources: {{infra: k8s, accelerators: {gpus}}}
config:
  kubernetes:
    pod_config:
      spec:
        nodeSelector: {{kubernetes.io/hostname: {node}}}
run: x
"""


def test_the_policy_passes_what_one_node_has_times_the_node_count(cluster_policy) -> None:
    one = _through("name: t\nresources: {infra: k8s, accelerators: H100:8}\nrun: x\n")
    assert one["resources"]["accelerators"] == {"H100": 8}
    two = _through("name: t\nnum_nodes: 2\nresources: {infra: k8s, accelerators: H100:8}\nrun: x")
    assert two["num_nodes"] == 2


def test_the_policy_refuses_more_than_a_node_has_naming_each_node(cluster_policy) -> None:
    message = _refused("name: t\nresources: {infra: k8s, accelerators: A6000:6}\nrun: x\n")
    assert "gpu_inventory: asks for A6000:6" in message and NODES in message
    message = _refused("name: t\nnum_nodes: 3\nresources: {accelerators: H100:8}\nrun: x\n")
    assert "on each of 3 nodes" in message


def test_the_policy_keeps_a_pin_to_a_known_node(cluster_policy) -> None:
    cfg = _through(PINNED.format(n=1, gpus="H100:8", node="lab-h100-1"))
    pod = cfg["resources"]["_cluster_config_overrides"]["kubernetes"]["pod_config"]
    assert pod["spec"]["nodeSelector"] == {HOSTNAME_LABEL: "lab-h100-1"}


def test_the_policy_refuses_a_pin_to_an_unknown_node(cluster_policy) -> None:
    message = _refused(PINNED.format(n=1, gpus="H100:8", node="lab-gpu9"))
    assert "node: " in message and "'lab-gpu9', which is not one of the cluster's nodes" in message
    assert "pin it to one of lab-a6000, lab-h100-1, lab-h100-2" in message


def test_a_pinned_job_fits_only_on_its_node(cluster_policy) -> None:
    message = _refused(PINNED.format(n=1, gpus="H100:1", node="lab-a6000"))
    assert "all on node lab-a6000, which has 4x A6000" in message
    # Two pods of 4 on one 8-GPU node fit; of 8, they do not.
    _through(PINNED.format(n=2, gpus="H100:4", node="lab-h100-2"))
    assert "on each of 2 nodes, all on node lab-h100-2" in _refused(
        PINNED.format(n=2, gpus="H100:8", node="lab-h100-2")
    )


def test_a_request_configs_pin_is_held_to_the_same_rule(cluster_policy) -> None:
    """A client's `~/.sky/config.yaml` pod_config reaches every pod: its pin is checked too."""
    task = sky.Task.from_yaml_config({"name": "t", "resources": {"infra": "k8s"}, "run": "x"})
    request = admin_policy.UserRequest(
        task=task,
        skypilot_config=config_utils.Config(
            {
                "admin_policy": "deskgpu.policy.HouseRules",
                "kubernetes": {
                    "pod_config": {"spec": {"nodeSelector": {HOSTNAME_LABEL: "elsewhere"}}}
                },
            }
        ),
        request_name=Req.JOBS_LAUNCH,
        request_options=None,
        at_client_side=False,
    )
    from deskgpu.policy import HouseRules

    with pytest.raises(exceptions.UserRequestRejectedByPolicy) as info:
        HouseRules.validate_and_mutate(request)
    assert "'elsewhere', which is not one of the cluster's nodes" in str(info.value)


# ---------------------------------------------------------------------------------------------
# One implementation: the same verdicts from the house rules as a library


def test_a_single_box_keeps_its_rules_and_a_free_node_selector() -> None:
    """Without `nodes:` nothing changes: the inventory is the box's, any nodeSelector passes."""
    box = HostConfig(gpus={"A6000": 4})
    task = yaml.safe_load(PINNED.format(n=1, gpus="A6000:4", node="anything"))
    shaped = apply_house_rules(task, box, "alice", "batch")
    assert check_house_rules(shaped, box, "alice") == []
    over = copy.deepcopy(task)
    over["resources"]["accelerators"] = "A6000:6"
    (broken,) = check_house_rules(apply_house_rules(over, box, "alice", "batch"), box, "alice")
    assert broken.problem.startswith("asks for A6000:6, but this box has 4x A6000")


def test_apply_is_idempotent_with_a_pin() -> None:
    config = load_config(CLUSTER)
    task = yaml.safe_load(PINNED.format(n=2, gpus="H100:4", node="lab-h100-1"))
    once = apply_house_rules(task, config, "alice", "batch")
    assert apply_house_rules(once, config, "alice", "batch") == once
    assert check_house_rules(once, config, "alice") == []


def test_skypilots_pod_for_a_pinned_job_carries_the_pin_and_is_admitted() -> None:
    """The pin survives SkyPilot's own pod template and pod_config merge, and the cluster's
    admission policy (rendered for the cluster) admits the pod (tests/test_cluster.py's
    machinery: SkyPilot's template, its merge and check, the policy's CEL evaluated)."""
    from deskgpu.kubenames import ADMISSION_POLICY
    from deskgpu.setup import cluster
    from tests.test_cluster import denials, skypilot_pod

    config = load_config(CLUSTER)
    task = yaml.safe_load(PINNED.format(n=1, gpus="H100:8", node="lab-h100-1"))
    pod = skypilot_pod(apply_house_rules(task, config, "alice", "batch"))
    assert pod["spec"]["nodeSelector"][HOSTNAME_LABEL] == "lab-h100-1"
    (policy,) = [
        o
        for o in cluster.admission_objects(config)
        if o["kind"] == "ValidatingAdmissionPolicy" and o["metadata"]["name"] == ADMISSION_POLICY
    ]
    assert denials(policy, obj=pod) == []


SCHEDULED = """\
name: t
resources: {{infra: k8s, accelerators: H100:8}}
config:
  kubernetes:
    pod_config:
      spec:
        {key}: {value}
run: x
"""


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        # An attacker review: each placed an 8-GPU job on the 4-GPU node, or on a cordoned one.
        (
            "affinity",
            "{nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms:"
            " [{matchExpressions: [{key: kubernetes.io/hostname, operator: In,"
            " values: [lab-a6000]}]}]}}}",
            "nodeAffinity places the job past the per-node GPU rules",
        ),
        ("nodeSelector", "{disk: ssd}", "selects nodes by a label the per-node GPU rules"),
        ("tolerations", "[{operator: Exists}]", "tolerates every taint"),
        (
            "tolerations",
            "[{key: node.kubernetes.io/unschedulable, operator: Exists}]",
            "tolerates every taint or a node's own",
        ),
    ],
)
def test_a_cluster_places_jobs_only_by_node_or_gpu_type(
    cluster_policy, key: str, value: str, words: str
) -> None:
    message = _refused(SCHEDULED.format(key=key, value=value))
    assert words in message, message
    assert "node:" in message or "tolerate only a named taint" in message


def test_a_cluster_keeps_pod_affinity_a_named_toleration_and_a_gpu_type_selector(
    cluster_policy,
) -> None:
    for key, value in (
        ("affinity", "{podAntiAffinity: {}}"),
        ("tolerations", "[{key: lab/maintenance, operator: Exists, effect: NoSchedule}]"),
        ("nodeSelector", "{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}"),
    ):
        _through(SCHEDULED.format(key=key, value=value))


def test_a_single_box_keeps_any_affinity_and_toleration() -> None:
    box = HostConfig(gpus={"A6000": 4})
    for key, value in (
        ("affinity", "{nodeAffinity: {}}"),
        ("tolerations", "[{operator: Exists}]"),
        ("nodeSelector", "{disk: ssd}"),
    ):
        task = yaml.safe_load(SCHEDULED.format(key=key, value=value).replace("H100:8", "A6000:4"))
        assert check_house_rules(apply_house_rules(task, box, "alice", "batch"), box, "alice") == []
