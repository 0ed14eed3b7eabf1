"""The cluster enforces the house rules by itself (issue #12): the jobs' identity and the
ValidatingAdmissionPolicies that `deskgpu setup render` writes.

The manifests are validated against the Kubernetes OpenAPI schemas of the version the README
names (kubernetes-validate ships them; nothing is downloaded). The policies' CEL is evaluated
with cel-python on (a) the pods SkyPilot's own template (`kubernetes-ray.yml.j2`) renders for
policy-mutated tasks, with the task's pod_config merged by SkyPilot's own
`combine_pod_config_fields_and_metadata` and checked by its `check_pod_config`, and (b) escape
pods a job could try to create itself.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jinja2
import kubernetes_validate
import pytest
import yaml

from deskgpu.config import HostConfig
from deskgpu.house_rules import apply_house_rules
from deskgpu.kubenames import POLICIES
from deskgpu.setup import cluster
from deskgpu.setup.render import ADMISSION_FILE, JOB_IDENTITY_FILE, Tools, render

sky = pytest.importorskip("sky")
from sky import clouds, skypilot_config  # noqa: E402
from sky.provision.kubernetes import utils as kubernetes_utils  # noqa: E402
from sky.skylet import constants as sky_constants  # noqa: E402
from sky.utils import schemas  # noqa: E402

CONFIG = HostConfig(gpus={"A6000": 4}, data_root="/srv/data", checkpoint_root="/srv/ckpt")
TOOLS = Tools("/opt/deskgpu/bin/python", "/opt/deskgpu/bin/deskgpu")
K8S_VERSION = f"{cluster.KUBERNETES_VERSION}.0"
CONTEXT = "default"
SA_TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def _docs(path: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(render(CONFIG, TOOLS).by_path()[path].text))


def _policy(name: str) -> dict[str, Any]:
    (doc,) = [
        d
        for d in _docs(ADMISSION_FILE)
        if d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"] == name
    ]
    return doc


# ---------------------------------------------------------------------------------------------
# The manifests are what the Kubernetes API accepts


@pytest.mark.parametrize("path", [JOB_IDENTITY_FILE, ADMISSION_FILE])
def test_manifests_validate_against_the_kubernetes_openapi_schemas(path) -> None:
    docs = _docs(path)
    assert docs
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == (
            cluster.KUBERNETES_VERSION
        )


def test_the_schema_check_catches_a_defect() -> None:
    doc = copy.deepcopy(_policy(cluster.ADMISSION_POLICY))
    doc["spec"]["validation"] = doc["spec"].pop("validations")  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_policy_is_bound_in_the_jobs_namespace_and_denies() -> None:
    docs = _docs(ADMISSION_FILE)
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert set(policies) == set(POLICIES) == {b["spec"]["policyName"] for b in bindings}
    for b in bindings:
        assert b["spec"]["validationActions"] == ["Deny"]
        selector = b["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]
        assert selector == {"kubernetes.io/metadata.name": "default"}
    for p in policies.values():
        assert p["spec"]["failurePolicy"] == "Fail"


def test_the_jobs_identity_cannot_create_anything_but_events() -> None:
    sa, role, binding = _docs(JOB_IDENTITY_FILE)
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "deskgpu-job"
    granted = {
        (res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]
    }
    assert granted == {
        ("pods", "list"),
        ("pods", "delete"),
        ("services", "delete"),
        ("events", "create"),
    }
    assert all(rule["apiGroups"] == [""] for rule in role["rules"])
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "deskgpu-job", "namespace": "default"}
    ]


# ---------------------------------------------------------------------------------------------
# Evaluating the policies' CEL as the API server would


def _eval(expression: str, activation: dict[str, Any]) -> Any:
    env = celpy.Environment()
    program = env.program(env.compile(expression))
    return program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})


def denials(
    policy: dict[str, Any],
    *,
    obj: dict[str, Any] | None = None,
    old: dict[str, Any] | None = None,
    request: dict[str, Any] | None = None,
) -> list[str]:
    """The messages of the validations that deny this request ([] when admitted)."""
    activation = {"object": obj, "oldObject": old, "request": request or {}}
    for condition in policy["spec"].get("matchConditions", []):
        if not _true(_eval(condition["expression"], activation)):
            return []
    return [
        v["message"]
        for v in policy["spec"]["validations"]
        if not _true(_eval(v["expression"], activation))
    ]


def _true(result: Any) -> bool:
    """A validation passes only on `true` (an evaluation error denies: failurePolicy Fail)."""
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)


def _with_token_volume(pod: dict[str, Any]) -> dict[str, Any]:
    """What the ServiceAccount admission plugin adds before validating admission runs."""
    pod = copy.deepcopy(pod)
    spec = pod["spec"]
    spec.setdefault("volumes", []).append(
        {
            "name": "kube-api-access-7xk2p",
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt"}]}},
                ],
            },
        }
    )
    for c in spec["containers"]:
        c.setdefault("volumeMounts", []).append(
            {"name": "kube-api-access-7xk2p", "mountPath": SA_TOKEN_MOUNT, "readOnly": True}
        )
    return pod


def skypilot_pod(task_config: dict[str, Any], cluster_name: str = "alice-train-2ea4") -> Any:
    """The head pod SkyPilot 0.14 creates for `task_config` on the box's k3s.

    The template is filled with what `Kubernetes.make_deploy_resources_variables` and
    `backend_utils.write_cluster_config` give it for a GPU node labelled
    `skypilot.co/accelerator` (those two ask the cluster, which a test has not; the identity is
    resolved the way the former does, sky/clouds/kubernetes.py). Then, as write_cluster_config
    does, the task's pod_config is merged and the pod checked by SkyPilot's own code.
    """
    task = sky.Task.from_yaml_config(copy.deepcopy(task_config))
    (resources,) = task.resources
    overrides = resources.cluster_config_overrides
    identity = skypilot_config.get_effective_workspace_region_config(
        cloud="kubernetes",
        region=CONTEXT,
        keys=("remote_identity",),
        default_value=schemas.get_default_remote_identity("kubernetes"),
        override_configs=overrides,
    )
    if isinstance(identity, dict):
        identity = identity.get("*")
    if identity in [o.value for o in schemas.RemoteIdentityOptions]:
        identity = kubernetes_utils.DEFAULT_SERVICE_ACCOUNT_NAME
    count = int(sum((resources.accelerators or {}).values()))
    label_values = [m.lower() for m in (resources.accelerators or {})] or None
    variables = {
        "cluster_name_on_cloud": cluster_name,
        "num_nodes": task.num_nodes,
        "user": "alice",
        "original_user": "alice",
        "workspace": "default",
        "labels": dict(resources.labels or {}),
        "k8s_namespace": "default",
        "k8s_context": CONTEXT,
        "k8s_port_mode": "loadbalancer",
        "k8s_networking_mode": "portforward",
        "timeout": "-1",
        "k8s_service_account_name": identity,
        "k8s_automount_sa_token": "true",
        "k8s_acc_label_key": "skypilot.co/accelerator" if count else None,
        "k8s_acc_label_values": label_values,
        "k8s_resource_key": "nvidia.com/gpu" if count else None,
        "k8s_node_affinity": kubernetes_utils.get_node_affinity(
            "skypilot.co/accelerator" if count else None, label_values, None
        ),
        "k8s_topology_label_key": None,
        "k8s_topology_label_value": None,
        "k8s_spot_label_key": None,
        "k8s_spot_label_value": None,
        "k8s_env_vars": {"SKYPILOT_IN_CLUSTER_CONTEXT_NAME": CONTEXT},
        "k8s_efa_count": None,
        "k8s_apt_mirrors": None,
        "k8s_high_availability_storage_class_name": None,
        "k8s_kueue_admission_timeout": None,
        "k8s_rdma_networks": None,
        "k8s_rdma_nic_resource": None,
        "priority_class": None,
        "image_id": "nvcr.io/nvidia/pytorch:24.05-py3",
        "cpus": "4",
        "memory": "16",
        "accelerator_count": str(count),
        "k8s_fuse_device_required": False,
        "high_availability": False,
        "volume_mounts": [],
        "ephemeral_volume_mounts": [],
        "k8s_skypilot_system_namespace": "skypilot-system",
        "k8s_host_network": False,
        "k8s_rdma_host_device_access": False,
        "credentials": {},
        "ray_port": sky_constants.SKY_REMOTE_RAY_PORT,
        "ray_dashboard_port": sky_constants.SKY_REMOTE_RAY_DASHBOARD_PORT,
    }
    template = Path(sky.__file__).parent / "templates" / "kubernetes-ray.yml.j2"
    cluster_yaml = yaml.safe_load(jinja2.Template(template.read_text()).render(**variables))
    combined = kubernetes_utils.combine_pod_config_fields_and_metadata(
        cluster_yaml, cluster_config_overrides=overrides, cloud=clouds.Kubernetes(), context=CONTEXT
    )
    pod = combined["available_node_types"]["ray_head_default"]["node_config"]
    valid, message = kubernetes_utils.check_pod_config(copy.deepcopy(pod))
    assert valid, message
    pod["metadata"]["name"] = f"{cluster_name}-head"  # as the provisioner names it
    return _with_token_volume(pod)


def _shaped(task: dict[str, Any], kind: str = "interactive") -> dict[str, Any]:
    return apply_house_rules(task, CONFIG, "alice", kind)


SHAPED = {
    "gpu session": _shaped({"name": "train", "run": "x", "resources": {"accelerators": "A6000:2"}}),
    "batch": _shaped({"name": "sweep", "run": "python sweep.py"}, kind="batch"),
    "cpu only, two nodes": _shaped({"name": "etl", "run": "x", "num_nodes": 2}),
    "own emptyDir and a /data subdir": _shaped(
        {
            "name": "scratch",
            "run": "x",
            "config": {
                "kubernetes": {
                    "pod_config": {
                        "spec": {
                            "containers": [
                                {
                                    "volumeMounts": [
                                        {"name": "scratch", "mountPath": "/scratch"},
                                        {
                                            "name": "deskgpu-data",
                                            "mountPath": "/imagenet",
                                            "subPath": "imagenet",
                                            "readOnly": True,
                                        },
                                    ]
                                }
                            ],
                            "volumes": [{"name": "scratch", "emptyDir": {}}],
                        }
                    }
                }
            },
        }
    ),
}


@pytest.mark.parametrize("name", list(SHAPED))
def test_skypilots_own_pods_for_policy_shaped_tasks_are_admitted(name) -> None:
    pod = skypilot_pod(SHAPED[name])
    spec = pod["spec"]
    # What the policy is really about, as SkyPilot built it: the restricted identity, our
    # mounts, SkyPilot's shared-memory emptyDir and the injected token.
    assert spec["serviceAccountName"] == "deskgpu-job"
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host == {"deskgpu-data": "/srv/data", "deskgpu-checkpoints": "/srv/ckpt"}
    assert {"dshm", "kube-api-access-7xk2p"} <= {v["name"] for v in spec["volumes"]}
    assert pod["metadata"]["labels"]["deskgpu.io/user"] == "alice"
    assert denials(_policy(cluster.ADMISSION_POLICY), obj=pod) == []


# ---------------------------------------------------------------------------------------------
# Escape pods: what a job's code (or a bypass of the policy) might create


def _escape(change: Any) -> dict[str, Any]:
    pod = skypilot_pod(SHAPED["gpu session"])
    change(pod["spec"])
    return pod


def _add_host_volume(spec: dict[str, Any], path: str, mount: dict[str, Any]) -> None:
    spec["volumes"].append({"name": "host", "hostPath": {"path": path}})
    spec["containers"][0]["volumeMounts"].append({"name": "host", **mount})


def _set(where: str, **values: Any) -> Any:
    def change(spec: dict[str, Any]) -> None:
        target = spec if where == "pod" else spec["containers"][0].setdefault("securityContext", {})
        target.update(values)

    return change


def _remount(volume: str, **fields: Any) -> Any:
    def change(spec: dict[str, Any]) -> None:
        for m in spec["containers"][0]["volumeMounts"]:
            if m["name"] == volume:
                for key, value in fields.items():
                    if value is None:
                        m.pop(key, None)
                    else:
                        m[key] = value

    return change


def _init_container(**security: Any) -> Any:
    def change(spec: dict[str, Any]) -> None:
        spec["initContainers"] = [
            {"name": "x", "image": "busybox", "securityContext": security or {}}
        ]

    return change


ESCAPES = {
    "privileged": (_set("container", privileged=True), "privileged"),
    "privileged init container": (_init_container(privileged=True), "privileged"),
    "hostPath /": (
        lambda s: _add_host_volume(s, "/", {"mountPath": "/host"}),
        "the only hostPath volumes",
    ),
    "hostPath /srv/data/../etc": (
        lambda s: _add_host_volume(s, "/srv/data/../etc", {"mountPath": "/e", "readOnly": True}),
        "the only hostPath volumes",
    ),
    "checkpoint root without subPath": (
        _remount("deskgpu-checkpoints", subPath=None),
        "/srv/ckpt is mounted only with subPath",
    ),
    "someone else's checkpoints": (
        _remount("deskgpu-checkpoints", subPath="bob"),
        "/srv/ckpt is mounted only with subPath",
    ),
    "data read-write": (_remount("deskgpu-data", readOnly=False), "/srv/data is mounted read-only"),
    "hostNetwork": (_set("pod", hostNetwork=True), "no hostNetwork"),
    "hostPID": (_set("pod", hostPID=True), "no hostNetwork, hostPID"),
    "add SYS_ADMIN": (_set("container", capabilities={"add": ["SYS_ADMIN"]}), "capabilities"),
    "allowPrivilegeEscalation": (
        _set("container", allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation",
    ),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_pods_are_denied(name) -> None:
    change, said = ESCAPES[name]
    found = denials(_policy(cluster.ADMISSION_POLICY), obj=_escape(change))
    assert len(found) == 1 and said in found[0], found


def test_an_ephemeral_container_cannot_mount_data_read_write() -> None:
    def change(spec: dict[str, Any]) -> None:
        spec["ephemeralContainers"] = [
            {"name": "dbg", "image": "busybox", "volumeMounts": [
                {"name": "deskgpu-data", "mountPath": "/d"},
            ]},
        ]  # fmt: skip

    found = denials(_policy(cluster.ADMISSION_POLICY), obj=_escape(change))
    assert found == ["deskgpu: /srv/data is mounted read-only"]


# ---------------------------------------------------------------------------------------------
# Deletes: the jobs' identity tears down its own cluster only (autodown runs on the head pod)


def _delete_by(pod_name: str | None, username: str = cluster.JOB_USERNAME) -> dict[str, Any]:
    user: dict[str, Any] = {"username": username}
    if pod_name is not None:
        user["extra"] = {cluster.POD_NAME_EXTRA: [pod_name]}
    return {"operation": "DELETE", "userInfo": user}


def _object(kind: str, name: str, cluster_name: str) -> dict[str, Any]:
    labels = {"skypilot-cluster": cluster_name, "parent": "skypilot"}
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "labels": labels}}


@pytest.mark.parametrize(
    "victim",
    [
        ("Pod", "alice-dev-1a2b-head"),
        ("Pod", "alice-dev-1a2b-worker1"),
        ("Service", "alice-dev-1a2b-head-ssh"),
    ],
)
def test_autodown_deletes_its_own_clusters_objects(victim) -> None:
    kind, name = victim
    old = _object(kind, name, "alice-dev-1a2b")
    policy = _policy(cluster.DELETE_POLICY)
    assert denials(policy, old=old, request=_delete_by("alice-dev-1a2b-head")) == []


@pytest.mark.parametrize(
    ("requester", "victim_cluster"),
    [
        ("alice-dev-1a2b-head", "bob-train-9f00"),  # another user's job
        ("alice-dev-1a2b-worker1", "alice-dev-1a2b"),  # a worker is not the autodowner
        ("alice-dev-head", "alice-dev-1a2b"),  # a name that is only a prefix
        (None, "alice-dev-1a2b"),  # a token not bound to a pod
    ],
)
def test_a_job_cannot_delete_other_clusters_objects(requester, victim_cluster) -> None:
    old = _object("Pod", f"{victim_cluster}-head", victim_cluster)
    policy = _policy(cluster.DELETE_POLICY)
    assert denials(policy, old=old, request=_delete_by(requester)) == [
        "deskgpu: a job may delete only its own cluster's pods and services"
    ]


def test_deletes_by_anyone_else_are_not_this_policys_business() -> None:
    old = _object("Pod", "bob-train-9f00-head", "bob-train-9f00")
    request = _delete_by(None, username="system:admin")
    assert denials(_policy(cluster.DELETE_POLICY), old=old, request=request) == []
