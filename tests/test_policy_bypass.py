"""Regression tests for the review's policy bypasses (C1-C4, H1-H3, M2, M5, L7).

Like `test_policy.py`, every request goes through SkyPilot's own policy machinery
(`admin_policy_utils.apply` with `admin_policy: deskgpu.policy.HouseRules`) on real
`sky.Task`s; a client's `~/.sky/config.yaml` reaches the policy the way the API server
merges it (`skypilot_config.override_skypilot_config`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import HostConfig
from deskgpu.house_rules import (
    CHECKPOINT_VOLUME,
    DATA_VOLUME,
    apply_house_rules,
    check_house_rules,
    cluster_name_violation,
)

sky = pytest.importorskip("sky")
from sky import admin_policy, exceptions, skypilot_config  # noqa: E402
from sky.server.requests.request_names import AdminPolicyRequestName as Req  # noqa: E402
from sky.utils import admin_policy_utils, config_utils  # noqa: E402

POLICY = "deskgpu.policy.HouseRules"
HOST = textwrap.dedent(
    """\
    box_name: lab-a6000
    gpus: {A6000: 4}
    max_gpus_per_job: 2
    default_image: nvcr.io/nvidia/pytorch:24.05-py3
    images:
      allow: ["nvcr.io/nvidia/*"]
    """
)
ROOT = {
    "containers": [{"volumeMounts": [{"name": "host", "mountPath": "/host"}]}],
    "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
}


@pytest.fixture
def policy_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    path = tmp_path / "config.yaml"
    path.write_text(HOST)
    monkeypatch.setenv("DESKGPU_CONFIG", str(path))
    monkeypatch.setenv("SKYPILOT_USER", "alice")
    with skypilot_config.replace_skypilot_config_in_process(
        config_utils.Config({"admin_policy": POLICY})
    ):
        yield


def _options(cluster: str | None) -> Any:
    return admin_policy.RequestOptions(
        cluster_name=cluster, idle_minutes_to_autostop=None, down=False, dryrun=False
    )


def _task(cfg: dict[str, Any] | str) -> Any:
    if isinstance(cfg, str):
        cfg = yaml.safe_load(textwrap.dedent(cfg))
    return sky.Task.from_yaml_config(copy.deepcopy(cfg))


@contextlib.contextmanager
def _client_config(cfg: dict[str, Any] | None) -> Iterator[None]:
    """The client's SkyPilot config merged over the server's, as the API server does."""
    if cfg is None:
        yield
        return
    with skypilot_config.override_skypilot_config(cfg):
        yield


def _apply_with_config(
    task: Any, request: Req, options: Any = None, client: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Any]:
    """The mutated task (as YAML config) and the mutated SkyPilot config."""
    with _client_config(client):
        dag, config = admin_policy_utils.apply(task, request_name=request, request_options=options)
    (out,) = dag.tasks
    cfg = out.to_yaml_config()
    cfg.pop("_user_specified_yaml", None)
    return cfg, config


def _apply(task: Any, request: Req, options: Any = None, client: dict[str, Any] | None = None):
    return _apply_with_config(task, request, options, client)[0]


def _pod_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """The pod spec the policy leaves in a mutated single-candidate task."""
    spec: dict[str, Any] = cfg["resources"]["_cluster_config_overrides"]["kubernetes"][
        "pod_config"
    ]["spec"]
    return spec


def _rejected(
    task: Any, request: Req = Req.JOBS_LAUNCH, options: Any = None, client: Any = None
) -> str:
    with pytest.raises(exceptions.UserRequestRejectedByPolicy) as info:
        _apply(task, request, options, client)
    return str(info.value)


def _pod_task(spec: dict[str, Any], resources: Any = None, **section: Any) -> Any:
    return _task(
        {
            "name": "j",
            "resources": resources or {"infra": "k8s", "accelerators": "A6000:1"},
            "run": "x",
            "config": {"kubernetes": {"pod_config": {"spec": spec}, **section}},
        }
    )


# ---------------------------------------------------------------------------------------------
# C1: a cloud candidate next to the box does not switch the box's checks off


@pytest.mark.parametrize("group", ["any_of", "ordered"])
def test_a_cloud_candidate_beside_the_box_still_gets_the_box_checks(policy_server, group) -> None:
    task = _pod_task(ROOT, resources={group: [{"infra": "aws"}, {"infra": "k8s"}]})
    assert "host_mount:" in _rejected(task)


def test_gpu_limits_hold_for_every_candidate(policy_server) -> None:
    task = _task(
        {
            "name": "j",
            "run": "x",
            "resources": {
                "any_of": [
                    {"infra": "aws", "accelerators": "A6000:8"},
                    {"infra": "k8s", "accelerators": "A6000:8"},
                ]
            },
        }
    )
    assert "max_gpus:" in _rejected(task)


def test_wildcard_infra_may_land_on_the_box_so_it_is_checked(policy_server) -> None:
    task = _task({"name": "j", "run": "x", "resources": {"infra": "*", "accelerators": "A6000:9"}})
    assert "max_gpus:" in _rejected(task)


def test_mixed_candidates_are_shaped_for_the_box_and_twice_is_once(policy_server) -> None:
    task = _task({"name": "j", "run": "x", "resources": {"any_of": [{"infra": "aws"}, {}]}})
    once = _apply(task, Req.JOBS_LAUNCH)
    for cand in once["resources"]["any_of"]:
        k8s = cand["_cluster_config_overrides"]["kubernetes"]
        assert k8s["provision_timeout"] == -1
        names = {v["name"] for v in k8s["pod_config"]["spec"]["volumes"]}
        assert names == {DATA_VOLUME, CHECKPOINT_VOLUME}
    twice = _apply(_task(once), Req.JOBS_LAUNCH)
    # any_of is a set to SkyPilot: compare the candidates in any order.
    for cfg in (once, twice):
        cfg["resources"]["any_of"].sort(key=lambda c: json.dumps(c, sort_keys=True, default=str))
    assert twice == once


# ---------------------------------------------------------------------------------------------
# C2: the request's SkyPilot config (client ~/.sky/config.yaml, --config) is checked too


@pytest.mark.parametrize(
    ("client", "rule"),
    [
        ({"kubernetes": {"pod_config": {"spec": ROOT}}}, "host_mount"),
        ({"kubernetes": {"remote_identity": "LOCAL_CREDENTIALS"}}, "remote_identity"),
        (
            {"kubernetes": {"context_configs": {"default": {"pod_config": {"spec": ROOT}}}}},
            "host_mount",
        ),
        (
            {
                "ssh": {
                    "pod_config": {
                        "spec": {"containers": [{"securityContext": {"privileged": True}}]}
                    }
                }
            },
            "privileged",
        ),
        (
            {"kubernetes": {"custom_metadata": {"labels": {"deskgpu.io/user": "bob"}}}},
            "pod_metadata",
        ),
    ],
    ids=["hostpath-root", "local-credentials", "context-config", "ssh-privileged", "owner-label"],
)
def test_a_client_skypilot_config_cannot_reach_into_the_pods(policy_server, client, rule) -> None:
    task = _task("name: j\nresources: {accelerators: A6000:1}\nrun: x\n")
    for request, options in [
        (Req.JOBS_LAUNCH, None),
        (Req.CLUSTER_LAUNCH, _options("alice-j")),
        (Req.CLUSTER_EXEC, _options("alice-j")),
        (Req.JOBS_LAUNCH_CONTROLLER, _options("sky-jobs-controller-1")),
    ]:
        message = _rejected(task, request, options, client=client)
        assert f"{rule}:" in message and "SkyPilot config." in message, request


def test_a_harmless_client_config_passes(policy_server) -> None:
    client = {"kubernetes": {"pod_config": {"spec": {"imagePullSecrets": [{"name": "regcred"}]}}}}
    task = _task("name: j\nresources: {accelerators: A6000:1}\nrun: x\n")
    _, config = _apply_with_config(task, Req.JOBS_LAUNCH, client=client)
    secrets = config.get_nested(("kubernetes", "pod_config", "spec", "imagePullSecrets"), None)
    assert secrets == [{"name": "regcred"}]  # kept, not merely not refused


def test_a_controller_task_cannot_carry_a_pod_config(policy_server) -> None:
    task = _pod_task(ROOT, resources={"cpus": "4+"})
    assert "host_mount:" in _rejected(task, Req.JOBS_LAUNCH_CONTROLLER, _options("sky-jobs-c"))


# ---------------------------------------------------------------------------------------------
# C3: no hostPath but the standard volumes; checkpoints by subPath of the root-owned root


@pytest.mark.parametrize("sub", ["bob", "alice/../bob", "", "/alice"])
def test_only_your_own_checkpoint_subpath(policy_server, sub) -> None:
    mount = {"name": CHECKPOINT_VOLUME, "mountPath": "/mnt/c"}
    if sub:
        mount["subPath"] = sub
    assert "host_mount:" in _rejected(_pod_task({"containers": [{"volumeMounts": [mount]}]}))


def test_subpath_expressions_are_refused(policy_server) -> None:
    mount = {"name": CHECKPOINT_VOLUME, "mountPath": "/mnt/c", "subPathExpr": "$(U)"}
    assert "pod_config:" in _rejected(_pod_task({"containers": [{"volumeMounts": [mount]}]}))


def test_own_checkpoints_may_be_mounted_again(policy_server) -> None:
    mount = {"name": CHECKPOINT_VOLUME, "mountPath": "/out", "subPath": "alice/run-1"}
    out = _apply(_pod_task({"containers": [{"volumeMounts": [mount]}]}), Req.JOBS_LAUNCH)
    assert mount in _pod_spec(out)["containers"][0]["volumeMounts"]


def test_a_registered_hostpath_volume_is_refused_even_inside_the_roots() -> None:
    config = HostConfig(gpus={"A6000": 4})
    task = {"name": "j", "run": "x", "volumes": {"/mnt/v": "myvol"}}
    found = check_house_rules(
        apply_house_rules(task, config, "alice", "batch"),
        config,
        "alice",
        volume_host_paths={"myvol": "/checkpoints/alice/link"},
    )
    assert [v.rule for v in found] == ["host_mount"]


# ---------------------------------------------------------------------------------------------
# C4: no credentials, and no identity that may create pods: only the box's jobs account
# (issue #12: SkyPilot's own `skypilot-service-account` may do anything in the namespace)


@pytest.mark.parametrize(
    "identity",
    [
        "LOCAL_CREDENTIALS",
        "cluster-admin-sa",
        {"*": "LOCAL_CREDENTIALS"},
        "SERVICE_ACCOUNT",
        "NO_UPLOAD",
        {"*": "deskgpu-job", "other": "SERVICE_ACCOUNT"},
    ],
    ids=str,
)
def test_remote_identity_other_than_the_jobs_account_is_refused(policy_server, identity) -> None:
    task = _pod_task({}, remote_identity=identity)
    assert "remote_identity:" in _rejected(task)


@pytest.mark.parametrize(
    "client",
    [
        {"kubernetes": {"remote_identity": "SERVICE_ACCOUNT"}},
        {"kubernetes": {"context_configs": {"default": {"remote_identity": "NO_UPLOAD"}}}},
    ],
    ids=["global", "per-context"],
)
def test_a_clients_config_cannot_pick_skypilots_service_account(policy_server, client) -> None:
    """A context's value would beat the task's (sky/utils/config_utils.py
    get_cloud_config_value_from_dict): refused, not overridden."""
    task = _task({"name": "j", "run": "x", "resources": {"infra": "k8s"}})
    assert "remote_identity:" in _rejected(task, client=client)


@pytest.mark.parametrize("asked", [None, "deskgpu-job", {"*": "deskgpu-job"}], ids=str)
def test_every_box_task_runs_as_the_jobs_account(policy_server, asked) -> None:
    """The policy sets it; SkyPilot resolves it the way it fills the pod template's
    serviceAccountName (sky/clouds/kubernetes.py make_deploy_resources_variables), and,
    being a name of its own, creates no RBAC for it (provision/kubernetes/config.py)."""
    from sky.provision.kubernetes import utils as kubernetes_utils
    from sky.utils import schemas

    task = _pod_task({}, **({} if asked is None else {"remote_identity": asked}))
    out = _apply(task, Req.JOBS_LAUNCH)
    overrides = out["resources"]["_cluster_config_overrides"]
    assert overrides["kubernetes"]["remote_identity"] == (asked or "deskgpu-job")
    (resources,) = sky.Task.from_yaml_config(copy.deepcopy(out)).resources
    identity = skypilot_config.get_effective_workspace_region_config(
        cloud="kubernetes",
        region="default",
        keys=("remote_identity",),
        default_value=schemas.get_default_remote_identity("kubernetes"),
        override_configs=resources.cluster_config_overrides,
    )
    name = identity["*"] if isinstance(identity, dict) else identity
    assert name == "deskgpu-job"
    assert name not in [o.value for o in schemas.RemoteIdentityOptions]
    assert name != kubernetes_utils.DEFAULT_SERVICE_ACCOUNT_NAME


def test_the_servers_own_config_naming_the_jobs_account_passes(policy_server) -> None:
    """The rendered server config sets it too; the request's merged config is checked."""
    task = _task({"name": "j", "run": "x", "resources": {"infra": "k8s"}})
    out = _apply(task, Req.JOBS_LAUNCH, client={"kubernetes": {"remote_identity": "deskgpu-job"}})
    assert out["resources"]["_cluster_config_overrides"]["kubernetes"]["remote_identity"] == (
        "deskgpu-job"
    )


@pytest.mark.parametrize(
    "spec",
    [
        {"serviceAccountName": "admin"},
        {"serviceAccount": "admin"},
        {"automountServiceAccountToken": True},
    ],
    ids=["serviceAccountName", "serviceAccount", "automount"],
)
def test_pods_cannot_pick_a_service_account(policy_server, spec) -> None:
    assert "service_account:" in _rejected(_pod_task(spec))


# ---------------------------------------------------------------------------------------------
# H1: /data is read-only in every container


@pytest.mark.parametrize(
    "spec",
    [
        {"containers": [{"volumeMounts": [{"name": DATA_VOLUME, "mountPath": "/d"}]}]},
        {
            "containers": [
                {},
                {"name": "side", "volumeMounts": [{"name": DATA_VOLUME, "mountPath": "/d"}]},
            ]
        },
        {
            "initContainers": [
                {"name": "i", "volumeMounts": [{"name": DATA_VOLUME, "mountPath": "/d"}]}
            ]
        },
        {"ephemeralContainers": [{"name": "e"}]},
    ],
    ids=["main-rw", "second-container", "init-container", "ephemeral"],
)
def test_data_cannot_be_mounted_writable_anywhere(policy_server, spec) -> None:
    message = _rejected(_pod_task(spec))
    assert "data_read_only:" in message or "pod_config:" in message


# ---------------------------------------------------------------------------------------------
# H2: an allow-list, not a deny-list


@pytest.mark.parametrize(
    ("spec", "rule"),
    [
        ({"hostNetwork": True}, "privileged"),
        ({"hostIPC": True}, "privileged"),
        (
            {"containers": [{"securityContext": {"capabilities": {"add": ["NET_RAW"]}}}]},
            "privileged",
        ),
        (
            {"containers": [{"securityContext": {"capabilities": {"add": ["CAP_SYS_ADMIN"]}}}]},
            "privileged",
        ),
        ({"containers": [{"securityContext": {"allowPrivilegeEscalation": True}}]}, "privileged"),
        ({"containers": [{"securityContext": {"procMount": "Unmasked"}}]}, "privileged"),
        ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, "privileged"),
        ({"securityContext": {"sysctls": [{"name": "kernel.x", "value": "1"}]}}, "privileged"),
        ({"runtimeClassName": "runc"}, "pod_config"),
        ({"nodeName": "box"}, "pod_config"),
        ({"priorityClassName": "system-node-critical"}, "pod_config"),
        ({"containers": [{"image": "busybox"}]}, "pod_config"),
        ({"containers": [{"envFrom": [{"secretRef": {"name": "x"}}]}]}, "pod_config"),
        ({"volumes": [{"name": "s", "secret": {"secretName": "x"}}]}, "pod_config"),
    ],
    ids=lambda v: "-".join(str(v).split("'")[1:4:2]) if isinstance(v, dict) else str(v),
)
def test_pod_spec_is_an_allow_list(policy_server, spec, rule) -> None:
    assert f"{rule}:" in _rejected(_pod_task(spec))


def test_docker_in_docker_is_refused(policy_server) -> None:
    assert "privileged:" in _rejected(_pod_task({}, enable_docker=True))


def test_apparmor_annotations_are_refused(policy_server) -> None:
    pod = {
        "metadata": {
            "annotations": {"container.apparmor.security.beta.kubernetes.io/ray-node": "unconfined"}
        }
    }
    task = _task({"name": "j", "run": "x", "config": {"kubernetes": {"pod_config": pod}}})
    assert "pod_metadata:" in _rejected(task)


def test_restricting_settings_are_fine(policy_server) -> None:
    spec = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "securityContext": {
                    "capabilities": {"drop": ["ALL"]},
                    "allowPrivilegeEscalation": False,
                },
                "env": [{"name": "OMP_NUM_THREADS", "value": "8"}],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }
        ],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
    }
    out = _pod_spec(_apply(_pod_task(spec), Req.JOBS_LAUNCH))
    assert out["securityContext"] == spec["securityContext"]
    assert out["tolerations"] == spec["tolerations"]
    (container,) = out["containers"]
    (asked,) = spec["containers"]
    assert container["securityContext"] == asked["securityContext"]
    assert container["env"] == asked["env"]
    assert asked["volumeMounts"][0] in container["volumeMounts"]
    assert {"name": "scratch", "emptyDir": {}} in out["volumes"]


# ---------------------------------------------------------------------------------------------
# H3: GPUs only through the queue


@pytest.mark.parametrize("part", ["limits", "requests"])
def test_gpus_cannot_come_through_pod_resources(policy_server, part) -> None:
    spec = {"containers": [{"resources": {part: {"nvidia.com/gpu": 4}}}]}
    assert "gpu_outside_queue:" in _rejected(_pod_task(spec))


@pytest.mark.parametrize(
    "name", ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"]
)
def test_gpu_visibility_env_is_refused(policy_server, name) -> None:
    task = _task({"name": "j", "run": "x", "envs": {name: "all"}})
    assert "gpu_env:" in _rejected(task)
    spec = {"containers": [{"env": [{"name": name, "value": "all"}]}]}
    assert "gpu_env:" in _rejected(_pod_task(spec))


# ---------------------------------------------------------------------------------------------
# M2: cluster names on exec, and SkyPilot's generated name only for its own user


def test_exec_on_someone_elses_cluster_is_refused(policy_server) -> None:
    task = _task("run: nvidia-smi")
    assert "cluster_name:" in _rejected(task, Req.CLUSTER_EXEC, _options("bob-dev"))
    assert _apply(task, Req.CLUSTER_EXEC, _options("alice-dev"))["run"] == "nvidia-smi"


def test_generated_names_are_exempt_only_for_their_user(policy_server) -> None:
    task = _task("resources: {accelerators: A6000:1}")
    assert "cluster_name:" in _rejected(task, Req.CLUSTER_LAUNCH, _options("sky-3f2a-bob"))
    out = _apply(task, Req.CLUSTER_LAUNCH, _options("sky-3f2a-alice"))
    assert out["resources"]["accelerators"] == {"A6000": 1}
    assert cluster_name_violation("sky-3f2a-alice", "Alice") is None


# ---------------------------------------------------------------------------------------------
# M5: Kueue on an SSH node pool


def test_kueue_on_an_ssh_pool_makes_a_task_skypilot_accepts() -> None:
    config = HostConfig(infra="ssh/lab-box", kueue_local_queue="deskgpu")
    task = apply_house_rules({"name": "j", "run": "x"}, config, "alice", "batch")
    assert task["config"]["kubernetes"] == {
        "remote_identity": "deskgpu-job",
        "kueue": {"local_queue_name": "deskgpu"},
    }
    assert "kueue" not in task["config"]["ssh"]
    sky.Task.from_yaml_config(copy.deepcopy(task))
    assert apply_house_rules(task, config, "alice", "batch") == task
    assert check_house_rules(task, config, "alice") == []


# ---------------------------------------------------------------------------------------------
# L7: an accelerator list is any-of


def test_an_accelerator_list_needs_one_model_the_box_has(policy_server) -> None:
    ok = _task({"name": "j", "run": "x", "resources": {"accelerators": ["H100:1", "A6000:1"]}})
    candidates = _apply(ok, Req.JOBS_LAUNCH)["resources"]["ordered"]
    assert {"A6000": 1} in [c["accelerators"] for c in candidates]
    none = _task({"name": "j", "run": "x", "resources": {"accelerators": ["H100:1", "L40S:1"]}})
    assert "gpu_inventory:" in _rejected(none)


def test_every_alternative_respects_max_gpus(policy_server) -> None:
    task = _task({"name": "j", "run": "x", "resources": {"accelerators": ["A6000:1", "A6000:8"]}})
    assert "max_gpus:" in _rejected(task)
