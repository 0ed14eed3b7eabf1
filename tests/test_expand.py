"""House rules: what expansion adds to a spec, checked on the dict and by SkyPilot's validator."""

from __future__ import annotations

from pathlib import Path

import pytest

from deskgpu.config import HostConfig
from deskgpu.expand import LABEL_KEEP, LABEL_KIND, REDACTED, expand, redacted
from deskgpu.identity import safe_user
from deskgpu.skypilot import sdk as skyapi
from deskgpu.spec import spec_from_located
from deskgpu.yamlio import load_located

BOX = HostConfig(gpus={"A6000": 4}, default_image="nvcr.io/nvidia/pytorch:24.05-py3")


def _expand(text: str, config: HostConfig = BOX, user: str = "alice"):
    spec = spec_from_located(load_located(text, "job.yaml"), config, user)
    exp = expand(spec, config, user)
    skyapi.validate_task(exp.task)  # every generated task passes SkyPilot's own validator
    return exp


def test_batch_job_is_a_managed_job_that_queues_on_a_busy_box() -> None:
    exp = _expand("name: train\ngpus: A6000:2\nrun: python train.py\n")
    assert exp.managed and exp.idle_minutes is None
    assert exp.task["resources"]["accelerators"] == "A6000:2"
    assert exp.task["resources"]["infra"] == "k8s"
    assert exp.task["config"]["kubernetes"]["provision_timeout"] == -1
    assert "autostop" not in exp.task["resources"]
    assert exp.task["resources"]["labels"][LABEL_KIND] == "batch"


def test_default_image_comes_from_the_host_config() -> None:
    exp = _expand("name: train\ngpus: 1\nrun: x\n")
    assert exp.task["resources"]["image_id"] == "docker:nvcr.io/nvidia/pytorch:24.05-py3"
    assert exp.task["resources"]["accelerators"] == "A6000:1"


def test_model_name_is_matched_case_insensitively_to_the_inventory() -> None:
    exp = _expand("name: train\ngpus: a6000:1\nrun: x\n")
    assert exp.task["resources"]["accelerators"] == "A6000:1"


def test_bare_count_on_a_mixed_box_accepts_any_model_that_fits() -> None:
    mixed = HostConfig(gpus={"A6000": 4, "L40S": 2})
    exp = _expand("name: train\ngpus: 2\nrun: x\n", mixed)
    assert exp.task["resources"]["accelerators"] == ["A6000:2", "L40S:2"]
    exp = _expand("name: train\ngpus: 3\nrun: x\n", mixed)
    assert exp.task["resources"]["accelerators"] == "A6000:3"


def test_interactive_session_autodowns_after_idle_timeout() -> None:
    exp = _expand("name: dbg\ngpus: A6000:1\ninteractive: true\nidle_timeout: 1h30m\n")
    assert not exp.managed
    assert exp.idle_minutes == 90
    assert exp.task["resources"]["autostop"] == {"idle_minutes": 90, "down": True}
    assert "run" not in exp.task


def test_interactive_session_without_timeout_gets_the_box_default() -> None:
    exp = _expand("name: dbg\ninteractive: true\n", HostConfig(idle_timeout="45m"))
    assert exp.idle_minutes == 45


def test_keep_becomes_a_label() -> None:
    exp = _expand("name: dbg\ninteractive: true\nkeep: true\n")
    assert exp.task["resources"]["labels"][LABEL_KEEP] == "true"


def test_envs_name_the_user_job_and_checkpoint_dir() -> None:
    exp = _expand("name: train\nrun: x\nenv: {WANDB_MODE: offline, SEED: 3, FAST: true}\n")
    envs = exp.task["envs"]
    assert envs["DESKGPU_USER"] == "alice" and envs["DESKGPU_JOB"] == "train"
    assert envs["DESKGPU_CHECKPOINT_DIR"] == "/checkpoints/alice/train"
    assert envs["WANDB_MODE"] == "offline" and envs["SEED"] == "3" and envs["FAST"] == "true"
    assert "mkdir -p /checkpoints/alice/train" in exp.task["setup"]


def test_secret_looking_env_goes_to_skypilot_secrets_and_is_redacted_for_display() -> None:
    exp = _expand("name: train\nrun: x\nenv: {HF_TOKEN: hf_abc, WANDB_API_KEY: k, LR: '1'}\n")
    assert exp.task["secrets"] == {"HF_TOKEN": "hf_abc", "WANDB_API_KEY": "k"}
    assert "HF_TOKEN" not in exp.task["envs"]
    shown = redacted(exp.task)
    assert shown["secrets"] == {"HF_TOKEN": REDACTED, "WANDB_API_KEY": REDACTED}
    assert exp.task["secrets"]["HF_TOKEN"] == "hf_abc"  # the original is untouched


def test_uv_env_is_built_in_setup_and_activated_for_run() -> None:
    exp = _expand("name: sweep\nuv: true\nsetup: echo after-uv\nrun: python sweep.py\n")
    setup = exp.task["setup"]
    assert setup.index("uv sync") < setup.index("echo after-uv")
    assert "uv sync --locked" in setup
    assert exp.task["run"].startswith(". .venv/bin/activate\n")


def test_ssh_node_pool_uses_the_ssh_config_section() -> None:
    exp = _expand("name: train\nrun: x\n", HostConfig(infra="ssh/lab-box"))
    assert exp.task["resources"]["infra"] == "ssh/lab-box"
    # SkyPilot reads remote_identity under `kubernetes` for SSH node pools too.
    assert set(exp.task["config"]) == {"ssh", "kubernetes"}
    assert exp.task["config"]["kubernetes"] == {"remote_identity": "deskgpu-job"}
    assert exp.task["config"]["ssh"]["provision_timeout"] == -1


def test_kueue_local_queue_when_configured() -> None:
    exp = _expand("name: train\nrun: x\n", HostConfig(kueue_local_queue="deskgpu"))
    assert exp.task["config"]["kubernetes"]["kueue"] == {"local_queue_name": "deskgpu"}


def test_configured_roots_are_the_host_paths_and_container_paths_stay_standard() -> None:
    config = HostConfig(data_root="/mnt/nvme/data", checkpoint_root="/mnt/nvme/ckpt/")
    exp = _expand("name: train\nrun: x\n", config)
    pod = exp.task["config"]["kubernetes"]["pod_config"]["spec"]
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert paths == {
        "deskgpu-data": "/mnt/nvme/data",
        "deskgpu-checkpoints": "/mnt/nvme/ckpt",
    }
    mounts = [(m["mountPath"], m.get("subPath")) for m in pod["containers"][0]["volumeMounts"]]
    assert mounts == [("/data", None), ("/checkpoints/alice", "alice")]


@pytest.mark.parametrize("user", ["../../etc", "Alice.Smith", "root", "9lives", "a/b", "__"])
def test_user_names_cannot_escape_the_checkpoint_root(user: str) -> None:
    exp = _expand("name: train\nrun: x\n", user=user)
    pod = exp.task["config"]["kubernetes"]["pod_config"]["spec"]
    ckpt = next(v for v in pod["volumes"] if v["name"] == "deskgpu-checkpoints")
    assert ckpt["hostPath"] == {"path": "/checkpoints", "type": "Directory"}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == ckpt["name"])
    path = Path(ckpt["hostPath"]["path"]) / mount["subPath"]
    assert path.parent == Path("/checkpoints")
    assert ".." not in path.parts and path.name == safe_user(user)
    assert exp.cluster_name == f"{safe_user(user)}-train"


def test_cloud_infra_drops_host_mounts_and_explains() -> None:
    exp = _expand("name: train\ngpus: A100:1\ninfra: aws\nrun: x\n")
    assert "config" not in exp.task
    assert exp.task["resources"]["infra"] == "aws"
    assert any("file_mounts" in note for note in exp.notes)


def test_expansion_is_deterministic() -> None:
    text = "name: train\ngpus: A6000:2\nrun: x\nenv: {A: '1'}\n"
    assert _expand(text).task == _expand(text).task
