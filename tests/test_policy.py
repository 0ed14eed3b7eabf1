"""The admin policy, driven through SkyPilot's own policy machinery on real `sky.Task`s.

Every test loads `deskgpu.policy.HouseRules` the way the API server does (`admin_policy:` in
SkyPilot's config, `admin_policy_utils.apply`), so a change in SkyPilot's policy interface
breaks here, not on the box.
"""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import HostConfig, load_config
from deskgpu.expand import expand
from deskgpu.house_rules import (
    CHECKPOINT_VOLUME,
    DATA_VOLUME,
    LABEL_JOB,
    LABEL_KIND,
    LABEL_USER,
    apply_house_rules,
    check_house_rules,
)
from deskgpu.identity import safe_user
from deskgpu.policy import decide, request_user, shape_task_config
from deskgpu.spec import spec_from_located
from deskgpu.yamlio import load_located
from tests.conftest import HOST_CONFIG

sky = pytest.importorskip("sky")
from sky import admin_policy, exceptions, models, skypilot_config  # noqa: E402
from sky.server.requests.request_names import AdminPolicyRequestName as Req  # noqa: E402
from sky.utils import admin_policy_utils, config_utils  # noqa: E402

POLICY = "deskgpu.policy.HouseRules"
STRICT = textwrap.dedent(
    """\
    box_name: lab-a6000
    gpus: {A6000: 4}
    max_gpus_per_job: 2
    default_image: nvcr.io/nvidia/pytorch:24.05-py3
    images:
      allow: ["nvcr.io/nvidia/*", "ghcr.io/transformerlab/*"]
      deny: ["*:latest"]
    idle_timeout: 2h
    max_idle_timeout: 1d
    """
)


@pytest.fixture
def host_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(STRICT)
    monkeypatch.setenv("DESKGPU_CONFIG", str(path))
    monkeypatch.setenv("SKYPILOT_USER", "alice")
    return path


@pytest.fixture
def policy_server(host_config: Path):
    """SkyPilot's config with our policy, as on the API server."""
    with skypilot_config.replace_skypilot_config_in_process(
        config_utils.Config({"admin_policy": POLICY})
    ):
        yield


def _options(cluster: str | None, idle: int | None = None, down: bool = False):
    return admin_policy.RequestOptions(
        cluster_name=cluster, idle_minutes_to_autostop=idle, down=down, dryrun=False
    )


def through_policy(task: Any, request: Req, options: Any = None) -> dict[str, Any]:
    """Apply the configured policy the way `sky launch` / `sky jobs launch` do."""
    dag, _ = admin_policy_utils.apply(task, request_name=request, request_options=options)
    (out,) = dag.tasks
    return _comparable(out)


def _comparable(task: Any) -> dict[str, Any]:
    cfg = task.to_yaml_config()
    cfg.pop("_user_specified_yaml", None)  # what the user wrote, kept for their dashboard
    return cfg


def _task(text: str) -> Any:
    return sky.Task.from_yaml_config(yaml.safe_load(textwrap.dedent(text)))


def _pod_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    overrides = cfg["resources"]["_cluster_config_overrides"]
    return overrides["kubernetes"]["pod_config"]["spec"]


def _checkpoint_mount(cfg: dict[str, Any]) -> dict[str, Any]:
    mounts = _pod_spec(cfg)["containers"][0]["volumeMounts"]
    return next(m for m in mounts if m["name"] == CHECKPOINT_VOLUME)


def _rejected(task: Any, request: Req, options: Any = None) -> str:
    with pytest.raises(exceptions.UserRequestRejectedByPolicy) as info:
        admin_policy_utils.apply(task, request_name=request, request_options=options)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Tasks from every kind of submitter


def test_plain_sky_launch_gets_the_house_rules(policy_server) -> None:
    task = _task(
        """
        resources:
          cloud: kubernetes
          accelerators: A6000:1
        setup: pip install -r requirements.txt
        run: python train.py
        """
    )
    cfg = through_policy(task, Req.CLUSTER_LAUNCH, _options("alice-exp"))
    res = cfg["resources"]
    assert cfg["name"] == "alice-exp"
    assert res["labels"][LABEL_USER] == "alice"
    assert res["labels"][LABEL_KIND] == "interactive"  # a cluster holds its GPUs: a session
    assert res["autostop"] == {"idle_minutes": 120, "down": True}
    assert res["image_id"] == {None: "docker:nvcr.io/nvidia/pytorch:24.05-py3"}
    overrides = res["_cluster_config_overrides"]["kubernetes"]
    assert overrides["provision_timeout"] == -1
    volumes = {v["name"]: v["hostPath"]["path"] for v in _pod_spec(cfg)["volumes"]}
    assert volumes == {DATA_VOLUME: "/data", CHECKPOINT_VOLUME: "/checkpoints"}
    assert _checkpoint_mount(cfg) == {
        "name": CHECKPOINT_VOLUME,
        "mountPath": "/checkpoints/alice",
        "subPath": "alice",
    }
    assert cfg["envs"]["DESKGPU_CHECKPOINT_DIR"] == "/checkpoints/alice/exp"


@pytest.mark.parametrize("autostop", [False, {"idle_minutes": 10000, "down": False}, "5d"], ids=str)
def test_user_cannot_cancel_or_stretch_the_admin_autostop_skypilot_9478(
    policy_server, autostop: Any
) -> None:
    """`autostop: false`, `down: false` or a week of idle do not survive the policy."""
    task = sky.Task.from_yaml_config(
        {"resources": {"infra": "k8s", "accelerators": "A6000:1", "autostop": autostop}}
    )
    cfg = through_policy(task, Req.CLUSTER_LAUNCH, _options("alice-dev", idle=-1))
    assert cfg["resources"]["autostop"]["down"] is True
    assert 1 <= cfg["resources"]["autostop"]["idle_minutes"] <= 24 * 60  # max_idle_timeout 1d


def test_session_keeps_a_shorter_idle_it_asked_for(policy_server) -> None:
    task = _task("resources: {infra: k8s, accelerators: A6000:1, autostop: 30m}")
    cfg = through_policy(task, Req.CLUSTER_LAUNCH, _options("alice-dev"))
    assert cfg["resources"]["autostop"] == {"idle_minutes": 30, "down": True}


def test_transformer_lab_style_sdk_task(policy_server) -> None:
    """Built with the SDK (no YAML), launched under SkyPilot's generated cluster name."""
    task = sky.Task(
        name="tlab-finetune",
        setup="pip install transformerlab",
        run="python -m transformerlab.train --config /workspace/plugin.json",
        envs={"HF_TOKEN": "hf_not_a_real_token", "MODEL": "llama"},
    )
    task.set_resources(
        sky.Resources(
            infra="kubernetes",
            accelerators={"A6000": 2},
            image_id="docker:ghcr.io/transformerlab/api:0.9",
        )
    )
    cfg = through_policy(task, Req.CLUSTER_LAUNCH, _options("sky-3f2a-alice"))
    assert cfg["name"] == "alice-tlab-finetune"
    assert cfg["resources"]["labels"][LABEL_JOB] == "tlab-finetune"
    assert cfg["secrets"] == {"HF_TOKEN": "hf_not_a_real_token"}
    assert "HF_TOKEN" not in cfg["envs"] and cfg["envs"]["MODEL"] == "llama"
    assert cfg["resources"]["image_id"] == {None: "docker:ghcr.io/transformerlab/api:0.9"}


def test_managed_job_from_sky_jobs_launch_is_batch_without_autostop(policy_server) -> None:
    task = _task("name: sweep\nresources: {accelerators: A6000:2}\nrun: python sweep.py\n")
    cfg = through_policy(task, Req.JOBS_LAUNCH)
    assert cfg["resources"]["labels"][LABEL_KIND] == "batch"
    assert "autostop" not in cfg["resources"]
    assert cfg["name"] == "alice-sweep"


def test_identity_comes_from_the_api_server_not_the_task_labels(policy_server) -> None:
    """A task claiming to be bob's is relabelled with the requesting user."""
    task = _task(
        "name: x\nresources: {accelerators: A6000:1, labels: {deskgpu.io/user: bob}}\nrun: x\n"
    )
    cfg = through_policy(task, Req.JOBS_LAUNCH)
    assert cfg["resources"]["labels"][LABEL_USER] == "alice"
    assert _checkpoint_mount(cfg)["subPath"] == "alice"


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process runs with the server plugin (as every process of the box's server does)."""
    from deskgpu import policy

    monkeypatch.setattr(policy.GUARD, "active", True)


def test_controller_relaunch_keeps_the_recorded_owner(policy_server, guarded, monkeypatch) -> None:
    """The jobs controller relaunches alice's job as its own account: still alice's."""
    first = through_policy(
        _task("name: t\nresources: {accelerators: A6000:1}\nrun: x\n"), Req.JOBS_LAUNCH
    )
    monkeypatch.setenv("SKYPILOT_USER", "skypilot")
    again = through_policy(
        sky.Task.from_yaml_config(copy.deepcopy(first)), Req.JOBS_LAUNCH_CLUSTER, _options("t-1")
    )
    assert again["resources"]["labels"][LABEL_USER] == "alice"
    assert again == first


def test_controller_relaunch_with_its_annotations_passes(policy_server, guarded) -> None:
    """What SkyPilot's jobs controller adds (sky/jobs/controller.py `_add_k8s_annotations`)
    is reserved on a client's request but expected on the controller's own."""
    first = through_policy(
        _task("name: t\nresources: {accelerators: A6000:1}\nrun: x\n"), Req.JOBS_LAUNCH
    )
    relaunched = sky.Task.from_yaml_config(copy.deepcopy(first))
    note = {"skypilot-managed-job-id": "6", "skypilot-managed-job-name": "alice-t"}
    relaunched.set_resources(
        [
            r.copy(
                _cluster_config_overrides={
                    "kubernetes": {"pod_config": {"metadata": {"annotations": note}}}
                }
            )
            for r in relaunched.resources
        ]
    )
    again = through_policy(relaunched, Req.JOBS_LAUNCH_CLUSTER, _options("t-6", 5, True))
    overrides = again["resources"]["_cluster_config_overrides"]["kubernetes"]["pod_config"]
    assert overrides["metadata"]["annotations"] == note
    assert again["resources"]["labels"][LABEL_USER] == "alice"
    assert _checkpoint_mount(again)["subPath"] == "alice"  # the mounts are the owner's
    # The same annotations from a client are refused.
    assert "pod_metadata:" in _rejected(relaunched, Req.JOBS_LAUNCH)


def test_relaunch_without_the_guard_is_refused(policy_server) -> None:
    """Without the server plugin, `is_launched_by_jobs_controller` is whatever a client sent."""
    first = through_policy(
        _task("name: t\nresources: {accelerators: A6000:1}\nrun: x\n"), Req.JOBS_LAUNCH
    )
    message = _rejected(
        sky.Task.from_yaml_config(copy.deepcopy(first)), Req.JOBS_LAUNCH_CLUSTER, _options("t-1")
    )
    assert "without deskgpu's guard" in message


def test_relaunch_of_a_task_never_shaped_is_refused(policy_server, guarded) -> None:
    task = _task("name: t\nresources: {accelerators: A6000:1}\nrun: x\n")
    assert "owner label" in _rejected(task, Req.JOBS_LAUNCH_CLUSTER, _options("t-1"))


def test_skypilot_own_controller_launch_is_left_alone(policy_server) -> None:
    task = _task("name: sky-jobs-controller-1\nresources: {cpus: 4+}\nrun: x\n")
    cfg = through_policy(task, Req.JOBS_LAUNCH_CONTROLLER, _options("sky-jobs-controller-1"))
    assert "labels" not in cfg["resources"]
    assert cfg["name"] == "sky-jobs-controller-1"


# ---------------------------------------------------------------------------------------------
# One implementation: deskgpu's own tasks pass through unchanged, and twice is once


def _deskgpu_task(text: str, config: HostConfig, user: str = "alice"):
    spec = spec_from_located(load_located(text, "job.yaml"), config, user)
    return spec, expand(spec, config, user)


@pytest.mark.parametrize(
    "text",
    [
        "name: train\ngpus: A6000:2\nrun: python train.py\nenv: {HF_TOKEN: t, LR: '1'}\n",
        "name: dbg\ngpus: 1\ninteractive: true\nidle_timeout: 45m\nkeep: true\n",
        "name: sweep\nuv: true\nrun: python sweep.py\n",
        "name: cpu\nrun: echo hi\n",
    ],
    ids=["batch", "session", "uv", "cpu"],
)
def test_dry_run_is_exactly_what_the_policy_produces(policy_server, host_config, text) -> None:
    config = load_config(host_config)
    _, exp = _deskgpu_task(text, config)
    submitted = sky.Task.from_yaml_config(copy.deepcopy(exp.task))
    request = Req.JOBS_LAUNCH if exp.managed else Req.CLUSTER_LAUNCH
    options = None if exp.managed else _options(exp.cluster_name, exp.idle_minutes, True)
    assert through_policy(submitted, request, options) == _comparable(submitted)


@pytest.mark.parametrize("request_name", [Req.CLUSTER_LAUNCH, Req.JOBS_LAUNCH])
def test_applying_the_policy_twice_changes_nothing(policy_server, request_name) -> None:
    task = _task(
        """
        name: exp
        resources:
          ordered:
            - {infra: k8s, accelerators: A6000:1}
            - {infra: k8s, accelerators: A6000:2}
          autostop: 99999
        envs: {WANDB_API_KEY: k, DESKGPU_USER: mallory}
        config:
          kubernetes:
            provision_timeout: 10
            pod_config:
              spec:
                containers: [{volumeMounts: [{name: scratch, mountPath: /scratch}]}]
                volumes: [{name: scratch, emptyDir: {}}]
        run: python train.py
        """
    )
    options = _options("alice-exp") if request_name == Req.CLUSTER_LAUNCH else None
    once = through_policy(task, request_name, options)
    twice = through_policy(sky.Task.from_yaml_config(copy.deepcopy(once)), request_name, options)
    assert once == twice
    assert once["envs"]["DESKGPU_USER"] == "alice"
    for cand in once["resources"]["ordered"]:
        overrides = cand["_cluster_config_overrides"]["kubernetes"]
        assert overrides["provision_timeout"] == -1
        names = [v["name"] for v in overrides["pod_config"]["spec"]["volumes"]]
        assert names == ["scratch", DATA_VOLUME, CHECKPOINT_VOLUME]


def test_house_rules_on_dicts_are_idempotent_for_every_example() -> None:
    from deskgpu import submission
    from tests.conftest import EXAMPLES

    config = load_config(HOST_CONFIG)
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if path.name == "host-config.yaml":
            continue
        plan = submission.plan(path, config, "alice")
        task = plan.expansion.task
        assert apply_house_rules(task, config, "alice", plan.spec.kind) == task, path
        normalized = sky.Task.from_yaml_config(copy.deepcopy(task)).to_yaml_config()
        normalized.pop("_user_specified_yaml")
        again = apply_house_rules(normalized, config, "alice", plan.spec.kind)
        assert _comparable(sky.Task.from_yaml_config(again)) == normalized, path


# ---------------------------------------------------------------------------------------------
# Rejections say which rule and how to comply


@pytest.mark.parametrize(
    ("task_yaml", "rule", "hint"),
    [
        ("resources: {accelerators: A6000:4}\nrun: x", "max_gpus", "at most 2"),
        ("resources: {accelerators: H100:1}\nrun: x", "gpu_inventory", "4x A6000"),
        ("resources: {accelerators: A6000:2}\nnum_nodes: 3\nrun: x", "gpu_inventory", "nodes"),
        (
            "resources: {image_id: 'docker:nvcr.io/nvidia/pytorch:latest'}\nrun: x",
            "image_denied",
            "*:latest",
        ),
        ("resources: {image_id: 'docker:python:3.11'}\nrun: x", "image_not_allowed", "nvcr.io"),
        ("file_mounts: {/checkpoints/alice/x: ./ckpt}\nrun: x", "reserved_mount", "DESKGPU"),
    ],
    ids=[
        "too-many-gpus",
        "no-such-gpu",
        "multi-node",
        "denied-image",
        "unlisted-image",
        "file-mount-over-checkpoints",
    ],
)
def test_rejections_name_the_rule_and_the_fix(policy_server, task_yaml, rule, hint) -> None:
    message = _rejected(_task(f"name: j\n{task_yaml}\n"), Req.JOBS_LAUNCH)
    assert f"{rule}:" in message and hint in message
    assert "lab-a6000" in message


def _pod_task(volumes: list[dict[str, Any]], mounts: list[dict[str, Any]], **extra: Any) -> Any:
    container: dict[str, Any] = {"volumeMounts": mounts, **extra.pop("container", {})}
    spec = {"containers": [container], "volumes": volumes, **extra}
    return sky.Task.from_yaml_config(
        {
            "name": "j",
            "resources": {"infra": "k8s", "accelerators": "A6000:1"},
            "run": "x",
            "config": {"kubernetes": {"pod_config": {"spec": spec}}},
        }
    )


@pytest.mark.parametrize(
    ("path", "read_only", "rule"),
    [
        ("/", True, "host_mount"),
        ("/etc", True, "host_mount"),
        ("/data/../etc", True, "host_mount"),
        ("/checkpoints/bob", False, "host_mount"),
        ("/data/imagenet", False, "host_mount"),
    ],
)
def test_host_paths_outside_the_roots_are_rejected(policy_server, path, read_only, rule) -> None:
    task = _pod_task(
        [{"name": "h", "hostPath": {"path": path}}],
        [{"name": "h", "mountPath": "/mnt/h", "readOnly": read_only}],
    )
    message = _rejected(task, Req.JOBS_LAUNCH)
    assert f"{rule}:" in message


@pytest.mark.parametrize("path", ["/data/imagenet", "/checkpoints/alice/old-run", "/checkpoints"])
def test_host_paths_are_refused_even_inside_the_roots(policy_server, path) -> None:
    """A hostPath follows symlinks on the host: `ln -s / /checkpoints/alice/old-run` would
    make a lexically fine path mount the host's `/` (review C3). Only the standard volumes."""
    task = _pod_task(
        [{"name": "h", "hostPath": {"path": path}}],
        [{"name": "h", "mountPath": "/mnt/h", "readOnly": True}],
    )
    assert "host_mount:" in _rejected(task, Req.JOBS_LAUNCH)


def test_part_of_data_is_mounted_with_a_read_only_subpath(policy_server) -> None:
    task = _pod_task(
        [],
        [{"name": DATA_VOLUME, "mountPath": "/imagenet", "subPath": "imagenet", "readOnly": True}],
    )
    cfg = through_policy(task, Req.JOBS_LAUNCH)
    mounts = _pod_spec(cfg)["containers"][0]["volumeMounts"]
    assert mounts[0] == {
        "name": DATA_VOLUME,
        "mountPath": "/imagenet",
        "subPath": "imagenet",
        "readOnly": True,
    }


def test_a_volume_named_like_ours_cannot_point_elsewhere(policy_server) -> None:
    task = _pod_task(
        [{"name": CHECKPOINT_VOLUME, "hostPath": {"path": "/"}}],
        [{"name": CHECKPOINT_VOLUME, "mountPath": "/checkpoints/alice"}],
    )
    cfg = through_policy(task, Req.JOBS_LAUNCH)
    volumes = {v["name"]: v["hostPath"] for v in _pod_spec(cfg)["volumes"]}
    assert volumes[CHECKPOINT_VOLUME] == {"path": "/checkpoints", "type": "Directory"}
    assert _checkpoint_mount(cfg)["subPath"] == "alice"


def test_privileged_pods_are_rejected(policy_server) -> None:
    task = _pod_task([], [], container={"securityContext": {"privileged": True}}, hostPID=True)
    message = _rejected(task, Req.CLUSTER_LAUNCH, _options("alice-x"))
    assert message.count("privileged:") == 2


def test_cluster_names_must_carry_the_owner_prefix(policy_server) -> None:
    task = _task("resources: {accelerators: A6000:1}")
    message = _rejected(task, Req.CLUSTER_LAUNCH, _options("dev"))
    assert "cluster_name:" in message and "sky launch -c alice-dev" in message


def test_exec_is_checked_but_not_reshaped(policy_server) -> None:
    task = _task("run: nvidia-smi")
    cfg = through_policy(task, Req.CLUSTER_EXEC, _options("alice-dev"))
    assert "labels" not in cfg["resources"]
    hostile = _pod_task([{"name": "h", "hostPath": {"path": "/"}}], [])
    assert "host_mount:" in _rejected(hostile, Req.CLUSTER_EXEC, _options("alice-dev"))


def test_broken_host_config_rejects_with_a_pointer_to_doctor(policy_server, host_config) -> None:
    host_config.write_text("gpus: {A6000: four}\n")
    message = _rejected(_task("run: x"), Req.JOBS_LAUNCH)
    assert "deskgpu doctor" in message and "gpus.A6000" in message


def test_policy_survives_the_restful_encoding() -> None:
    """The same request shape SkyPilot sends a RESTful policy decodes and shapes cleanly."""
    config = HostConfig(gpus={"A6000": 4})
    task = _task("name: j\nresources: {accelerators: A6000:1}\nrun: x\n")
    request = admin_policy.UserRequest(
        task=task,
        skypilot_config=config_utils.Config(),
        request_name=Req.JOBS_LAUNCH,
        user=models.User(id="abc", name="Carol.Smith"),
    )
    decoded = admin_policy.UserRequest.decode(request.encode())
    from deskgpu.policy import mutate

    out = mutate(decoded, config).task.to_yaml_config()
    who = safe_user("Carol.Smith")
    assert who.startswith("carol-smith")
    assert out["resources"]["labels"][LABEL_USER] == who
    assert out["name"] == f"{who}-j"


# ---------------------------------------------------------------------------------------------
# The decisions, as plain functions


def test_request_kinds() -> None:
    assert decide("jobs.launch", False).kind == "batch"
    assert decide("launch", True).kind == "interactive"
    assert decide("launch", True).check_cluster_name
    assert decide("exec", True).kind is None and decide("exec", True).check
    assert not decide("jobs.launch_controller", True).check
    assert decide("validate", True).kind == "interactive"
    assert decide("validate", True).check_cluster_name  # `sky launch` validates first
    assert decide("validate", False).kind == "batch"
    # A controller's own validate (told by the guard from the connection) is its relaunch.
    internal = decide("validate", True, internal=True)
    assert internal.relaunch and not internal.check_cluster_name and internal.kind == "batch"
    assert decide("exec", True, internal=True).check_cluster_name


def test_request_user_prefers_the_server_user_except_on_relaunch() -> None:
    labels = {LABEL_USER: "alice"}
    assert request_user("launch", "bob", labels) == "bob"
    assert request_user("jobs.launch_cluster", "skypilot", labels) == "alice"
    assert request_user("launch", None, labels) == "alice"


def test_shape_task_config_without_skypilot_objects() -> None:
    config = HostConfig(gpus={"A6000": 4}, max_gpus_per_job=1)
    shaped, broken = shape_task_config(
        {"resources": {"accelerators": "A6000:2"}, "run": "x"},
        config,
        request_name="launch",
        user="alice",
        cluster_name="dev",
        has_request_options=True,
    )
    assert shaped["name"] == "alice-dev"
    assert [v.rule for v in broken] == ["cluster_name", "max_gpus"]
    assert check_house_rules(shaped, HostConfig(gpus={"A6000": 4}), "alice") == []


def test_deskgpu_shows_every_rule_of_a_server_rejection(policy_server) -> None:
    """`deskgpu submit` prints the whole rejection the policy wrote, not its first line."""
    from deskgpu.skypilot.sdk import explain

    hostile = _pod_task([{"name": "h", "hostPath": {"path": "/"}}], [])
    with pytest.raises(exceptions.UserRequestRejectedByPolicy) as info:
        admin_policy_utils.apply(
            hostile, request_name=Req.CLUSTER_LAUNCH, request_options=_options("dev")
        )
    text = str(explain(info.value, "http://127.0.0.1:1"))
    assert text.startswith("the API server refused the request: rejected by the house rules")
    assert "cluster_name:" in text and "host_mount:" in text
    assert len(text.splitlines()) >= 3
