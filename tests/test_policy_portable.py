"""House rules that real SkyPilot task YAMLs live with, through SkyPilot's own policy machinery.

Each YAML here is written in the shape of a file in SkyPilot's examples/ and llm/ (named in the
test); the recipes the installed SkyPilot package ships are read from the package at test time.
Every accepted request must still load the way the jobs controller loads it (dumped and loaded
back with SkyPilot's own `dag_utils`).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import load_config
from deskgpu.house_rules import (
    CHECKPOINT_VOLUME,
    DATA_VOLUME,
    LABEL_USER,
    apply_house_rules,
    own_standard_mounts,
    replaced_mount_notes,
)
from tests.conftest import HOST_CONFIG
from tests.test_policy import _pod_spec, _rejected, host_config, policy_server  # noqa: F401

# Every test but the pure ones runs under SkyPilot's config with our policy, as on the server.
pytestmark = pytest.mark.usefixtures("policy_server")

sky = pytest.importorskip("sky")
from sky.server.requests.request_names import AdminPolicyRequestName as Req  # noqa: E402
from sky.utils import admin_policy_utils, dag_utils  # noqa: E402

# llm/rl-post-training-jobgroup/rlhf-math-jobgroup.yaml's shape: a header with primary_tasks,
# and jobs that reach each other as <job>-<node>.<group>.
JOB_GROUP = textwrap.dedent(
    """\
    ---
    name: rlhf-math
    execution: parallel
    primary_tasks: [ppo-trainer]
    termination_delay: 30s
    ---
    name: ppo-trainer
    resources: {infra: k8s, accelerators: A6000:2}
    run: python train.py --reward-url http://reward-model-0.rlhf-math:8000
    ---
    name: reward-model
    resources: {infra: k8s, accelerators: A6000:1}
    run: python serve_reward.py --port 8000
    """
)


def _group_through_policy(text: str) -> Any:
    dag = dag_utils.load_job_group_from_yaml_str(text)
    mutated, _ = admin_policy_utils.apply(dag, request_name=Req.JOBS_LAUNCH)
    return mutated


def test_a_job_group_keeps_its_job_names_and_still_loads() -> None:
    mutated = _group_through_policy(JOB_GROUP)
    assert mutated.is_job_group() and mutated.name == "rlhf-math"
    assert [t.name for t in mutated.tasks] == ["ppo-trainer", "reward-model"]
    assert mutated.primary_tasks == ["ppo-trainer"]
    for task in mutated.tasks:  # whose they are is in the labels
        (res,) = task.resources
        assert res.labels[LABEL_USER] == "alice"
    # What the jobs controller does with it: dump, load back (primary_tasks checked there).
    again = dag_utils.load_dag_from_yaml_str(dag_utils.dump_dag_to_yaml_str(mutated))
    assert again.is_job_group() and again.primary_tasks == ["ppo-trainer"]
    # The peer address the trainer's run line hard-codes is the one SkyPilot gives the job.
    reward = next(t for t in again.tasks if t.name == "reward-model")
    assert f"{reward.name}-0.{again.name}" in again.tasks[0].run


def test_a_job_group_gets_the_house_rules_all_the_same() -> None:
    mutated = _group_through_policy(JOB_GROUP)
    for task in mutated.tasks:
        cfg = task.to_yaml_config()
        spec = _pod_spec(cfg)
        names = {v["name"] for v in spec["volumes"]}
        assert {DATA_VOLUME, CHECKPOINT_VOLUME} <= names
        assert cfg["envs"]["DESKGPU_USER"] == "alice"


def test_a_job_group_that_breaks_a_rule_is_still_refused() -> None:
    text = JOB_GROUP.replace("A6000:2", "A6000:4")  # max_gpus_per_job is 2
    with pytest.raises(sky.exceptions.UserRequestRejectedByPolicy, match="max_gpus"):
        _group_through_policy(text)


def test_a_pipeline_is_still_renamed() -> None:
    """Only a job group's names are addresses; a chain's tasks get the user prefix."""
    text = JOB_GROUP.replace("execution: parallel\n", "").replace(
        "primary_tasks: [ppo-trainer]\n", ""
    )
    text = text.replace("termination_delay: 30s\n", "")
    dag = dag_utils.load_chain_dag_from_yaml_str(text)
    mutated, _ = admin_policy_utils.apply(dag, request_name=Req.JOBS_LAUNCH)
    assert [t.name for t in mutated.tasks] == ["alice-ppo-trainer", "alice-reward-model"]


# -- the task's own storage at exactly /data or /checkpoints -------------------------------------


def _task(text: str) -> Any:
    return sky.Task.from_yaml_config(yaml.safe_load(textwrap.dedent(text)))


def _launch(task: Any) -> dict[str, Any]:
    dag, _ = admin_policy_utils.apply(task, request_name=Req.JOBS_LAUNCH)
    (out,) = dag.tasks
    # The jobs controller's view: dumped and loaded back by SkyPilot itself.
    again = dag_utils.load_chain_dag_from_yaml_str(dag_utils.dump_chain_dag_to_yaml_str(dag))
    cfg: dict[str, Any] = again.tasks[0].to_yaml_config()
    assert cfg["name"] == out.name
    return cfg


def _mounts(cfg: dict[str, Any]) -> dict[str, str]:
    spec = _pod_spec(cfg)
    return {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}


def test_a_bucket_at_checkpoints_takes_the_standard_mounts_place() -> None:
    """llm/verl/verl-grpo.yaml's shape: its checkpoints go to its own bucket."""
    cfg = _launch(
        _task(
            """
            name: verl-grpo
            resources: {infra: k8s, accelerators: A6000:2}
            file_mounts:
              /checkpoints:
                source: s3://my-verl-bucket/ckpt
                mode: MOUNT
            run: python -m verl.trainer.main_ppo trainer.default_local_dir=/checkpoints
            """
        )
    )
    assert _mounts(cfg) == {"/data": DATA_VOLUME}  # the box's data stays; its checkpoints go
    assert {v["name"] for v in _pod_spec(cfg)["volumes"]} == {DATA_VOLUME}
    assert cfg["file_mounts"]["/checkpoints"]["source"] == "s3://my-verl-bucket/ckpt"


def test_a_volume_at_data_takes_the_standard_mounts_place() -> None:
    """llm/train-eval-jobgroup's shape: a SkyPilot volume holds the dataset."""
    cfg = _launch(
        _task(
            """
            name: train
            resources: {infra: k8s, accelerators: A6000:1}
            volumes: {/data: shared-datasets}
            run: python train.py --data /data
            """
        )
    )
    assert _mounts(cfg) == {"/checkpoints/alice": CHECKPOINT_VOLUME}
    assert cfg["volumes"] == {"/data": "shared-datasets"}


def test_a_cached_bucket_at_data_is_a_mount_too() -> None:
    """examples/airflow's shape: `name`/`store` storage with MOUNT_CACHED."""
    cfg = _launch(
        _task(
            """
            name: preprocess
            resources: {infra: k8s}
            file_mounts:
              /data: {name: my-airflow-data, store: s3, mode: MOUNT_CACHED}
            run: python preprocess.py
            """
        )
    )
    assert "/data" not in _mounts(cfg)


@pytest.mark.parametrize(
    ("file_mounts", "says"),
    [
        ({"/data": "./local-data"}, "copies files into /data"),  # a copy into read-only data
        ({"/data": "s3://bucket/x"}, "copies files into /data"),  # a URL string is a copy
        ({"/data": {"source": "s3://bucket", "mode": "COPY"}}, "copies files into /data"),
        ({"/data/imagenet": {"source": "s3://bucket", "mode": "MOUNT"}}, "inside /data"),
        ({"/checkpoints/alice/x": "./ckpt"}, "inside /data or /checkpoints"),
    ],
)
def test_what_stays_refused(file_mounts: dict[str, Any], says: str) -> None:
    task = sky.Task.from_yaml_config(
        {"name": "j", "resources": {"infra": "k8s"}, "file_mounts": file_mounts, "run": "x"}
    )
    message = _rejected(task, Req.JOBS_LAUNCH)
    assert "reserved_mount:" in message and says in message


def test_a_volume_inside_data_stays_refused() -> None:
    task = _task(
        """
        name: j
        resources: {infra: k8s}
        volumes: {/data/extra: myvol}
        run: x
        """
    )
    assert "reserved_mount:" in _rejected(task, Req.JOBS_LAUNCH)


def test_the_replacement_is_said_and_applying_twice_changes_nothing() -> None:
    config = load_config(HOST_CONFIG)
    task = {
        "name": "verl",
        "resources": {"infra": "k8s"},
        "file_mounts": {"/checkpoints": {"source": "s3://b", "mode": "MOUNT"}},
        "run": "x",
    }
    once = apply_house_rules(task, config, "alice", "batch")
    assert own_standard_mounts(once) == ["/checkpoints"]
    (note,) = replaced_mount_notes(once, config)
    assert note.startswith("/checkpoints: the task mounts its own storage there")
    assert apply_house_rules(once, config, "alice", "batch") == once


def test_the_server_log_says_which_standard_mount_was_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="deskgpu.policy"):
        _launch(
            _task(
                """
                name: j
                resources: {infra: k8s}
                volumes: {/checkpoints: ckpt-vol}
                run: x
                """
            )
        )
    assert any("/checkpoints: the task mounts its own storage" in r.message for r in caplog.records)


# -- the installed package's own recipes -----------------------------------------------------------


def _recipes() -> list[Path]:
    import sky as sky_pkg

    return sorted((Path(sky_pkg.__file__).parent / "recipes" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.name)
def test_skypilots_own_recipes_go_through_without_a_crash(path: Path) -> None:
    """Accepted and still loadable, or refused by a named rule; never a crash."""
    text = path.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    if not docs or ("run" not in docs[-1] and "setup" not in docs[-1]):
        pytest.skip(f"{path.name} is not a task (a volume or pool spec)")
    dag = dag_utils.load_dag_from_yaml_str(text)
    try:
        mutated, _ = admin_policy_utils.apply(dag, request_name=Req.JOBS_LAUNCH)
    except sky.exceptions.UserRequestRejectedByPolicy as exc:
        assert "rejected by the house rules" in str(exc)
        assert "reserved_mount" not in str(exc) or "inside" in str(exc) or "copies" in str(exc)
        return
    again = dag_utils.load_dag_from_yaml_str(dag_utils.dump_dag_to_yaml_str(mutated))
    assert len(again.tasks) == len(dag.tasks)


def test_the_recipes_are_there_to_be_read() -> None:
    assert len(_recipes()) >= 3


# -- registered volumes ----------------------------------------------------------------------------


def _register_volume(name: str, vtype: str, host_path: str | None = None) -> None:
    """A volume record in SkyPilot's own state (this test's HOME), as `sky volumes apply` makes."""
    from sky import global_user_state, models
    from sky.utils import status_lib

    global_user_state.add_volume(
        name,
        models.VolumeConfig(
            name=name, type=vtype, cloud="kubernetes", region=None, zone=None,
            name_on_cloud=name, size=None, config={"host_path": host_path} if host_path else {},
        ),
        status_lib.VolumeStatus.READY,
    )  # fmt: skip


@pytest.mark.parametrize("host_path", ["/", "/etc", "/checkpoints", "/data"])
def test_a_registered_hostpath_volume_is_held_to_the_host_mount_rule(host_path: str) -> None:
    name = "hp-" + (host_path.strip("/") or "root")
    _register_volume(name, "k8s-hostpath", host_path)
    task = _task(
        f"""
        name: j
        resources: {{infra: k8s}}
        volumes: {{/mnt/x: {name}}}
        run: x
        """
    )
    message = _rejected(task, Req.JOBS_LAUNCH)
    assert f"volumes /mnt/x (volume {name})" in message
    assert "host_mount:" in message or "data_read_only:" in message


def test_a_registered_pvc_volume_at_data_is_fine() -> None:
    _register_volume("datasets-pvc", "k8s-pvc")
    cfg = _launch(
        _task(
            """
            name: j
            resources: {infra: k8s}
            volumes: {/data: datasets-pvc}
            run: x
            """
        )
    )
    assert cfg["volumes"] == {"/data": "datasets-pvc"}


def test_registering_a_hostpath_volume_is_refused_by_the_guard() -> None:
    from deskgpu.policy import volume_apply_refusal

    body = {"name": "escape", "volume_type": "k8s-hostpath", "cloud": "kubernetes",
            "config": {"host_path": "/"}, "env_vars": {"SKYPILOT_USER": "alice"}}  # fmt: skip
    refusal = volume_apply_refusal("/volumes/apply", body)
    assert refusal is not None and "host_mount:" in refusal and "volume escape" in refusal
    assert volume_apply_refusal("/volumes/apply", {**body, "volume_type": "k8s-pvc"}) is None
    assert volume_apply_refusal("/launch", body) is None


def test_house_rules_doc_allow_list_is_the_codes() -> None:
    from deskgpu.house_rules.podspec import readme_section
    from tests.conftest import ROOT

    assert readme_section() in (ROOT / "docs" / "house-rules.md").read_text(), (
        "regenerate: uv run python -m deskgpu.docs"
    )
