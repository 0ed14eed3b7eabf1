"""House rules: a job spec + the host config + a user -> a complete SkyPilot task dict.

Pure: no I/O, no SkyPilot import. `submit --dry-run` prints exactly this dict, `submit`
hands it to SkyPilot, and the admin policy applies the same rules server-side.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from deskgpu.config import HostConfig, is_box_infra
from deskgpu.identity import cluster_name, safe_user
from deskgpu.spec import GpuRequest, JobSpec
from deskgpu.units import parse_duration_s

LABEL_PREFIX = "deskgpu.io"
LABEL_USER = f"{LABEL_PREFIX}/user"
LABEL_JOB = f"{LABEL_PREFIX}/job"
LABEL_KIND = f"{LABEL_PREFIX}/kind"
LABEL_KEEP = f"{LABEL_PREFIX}/keep"

DATA_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
DATA_VOLUME = "deskgpu-data"
CHECKPOINT_VOLUME = "deskgpu-checkpoints"

# Env names whose values SkyPilot should treat as secrets (redacted in its dashboard and logs).
_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSW(OR)?D|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)", re.I
)
REDACTED = "<redacted>"


@dataclass(frozen=True)
class Expansion:
    """What `submit` needs: the task dict, how to launch it, and notes for the user."""

    task: dict[str, Any]
    cluster_name: str
    managed: bool  # batch jobs are SkyPilot managed jobs; sessions are clusters
    idle_minutes: int | None
    notes: list[str] = field(default_factory=list)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def gpu_accelerators(request: GpuRequest, config: HostConfig) -> str | list[str] | None:
    """SkyPilot's `accelerators`: one `TYPE:N`, or any-of the box's models for a bare count."""
    if not request.count:
        return None
    if request.model:
        canonical = {m.lower(): m for m in config.gpus}
        return f"{canonical.get(request.model.lower(), request.model)}:{request.count}"
    models = [m for m, n in config.gpus.items() if n >= request.count]
    if len(models) == 1:
        return f"{models[0]}:{request.count}"
    return [f"{m}:{request.count}" for m in models]


def checkpoint_dir(user: str, job: str) -> str:
    return f"{CHECKPOINT_MOUNT}/{safe_user(user)}/{job}"


def _config_section(infra: str) -> str:
    """Task-level config key for the box's infra: `ssh` for SSH node pools, else `kubernetes`."""
    return "ssh" if infra.split("/", 1)[0] == "ssh" else "kubernetes"


def host_mounts_pod_config(config: HostConfig, user: str) -> dict[str, Any]:
    """hostPath volumes: `/data` read-only, `/checkpoints/<user>` read-write.

    `file_mounts` would copy files into the pod and lose them with it; a hostPath
    volume writes straight to the host's disk (DESIGN.md, SkyPilot facts).
    """
    who = safe_user(user)
    user_ckpt = f"{CHECKPOINT_MOUNT}/{who}"
    return {
        "spec": {
            "containers": [
                {
                    "volumeMounts": [
                        {"name": DATA_VOLUME, "mountPath": DATA_MOUNT, "readOnly": True},
                        {"name": CHECKPOINT_VOLUME, "mountPath": user_ckpt},
                    ]
                }
            ],
            "volumes": [
                {
                    "name": DATA_VOLUME,
                    "hostPath": {"path": config.data_root, "type": "Directory"},
                },
                {
                    "name": CHECKPOINT_VOLUME,
                    "hostPath": {
                        "path": f"{config.checkpoint_root.rstrip('/')}/{who}",
                        "type": "DirectoryOrCreate",
                    },
                },
            ],
        }
    }


def _setup_script(spec: JobSpec, ckpt: str) -> str:
    lines = ["set -e", f"mkdir -p {shlex.quote(ckpt)}"]
    if spec.uv:
        lines += [
            "command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv",
            "if [ -f uv.lock ]; then uv sync --locked; else uv sync; fi",
            ". .venv/bin/activate",
        ]
    if spec.setup:
        lines.append(spec.setup.rstrip("\n"))
    return "\n".join(lines) + "\n"


def _run_script(spec: JobSpec) -> str | None:
    if spec.run is None:
        return None
    if spec.uv:
        return ". .venv/bin/activate\n" + spec.run.rstrip("\n") + "\n"
    return spec.run


def expand(spec: JobSpec, config: HostConfig, user: str) -> Expansion:
    """Apply the house rules. `spec` is already valid for `config` (see `spec.load_spec`)."""
    infra = spec.infra or config.infra
    on_box = is_box_infra(infra)
    name = cluster_name(user, spec.name)
    who = safe_user(user)
    ckpt = checkpoint_dir(user, spec.name)
    notes: list[str] = []

    resources: dict[str, Any] = {"infra": infra}
    accelerators = gpu_accelerators(spec.gpus, config)
    if accelerators is not None:
        resources["accelerators"] = accelerators
    image = spec.image or config.default_image
    if image:
        resources["image_id"] = f"docker:{image}"
    labels = {LABEL_USER: who, LABEL_JOB: spec.name, LABEL_KIND: spec.kind}
    if spec.keep:
        labels[LABEL_KEEP] = "true"
    resources["labels"] = labels

    idle_minutes: int | None = None
    if spec.interactive:
        idle = spec.idle_timeout or config.idle_timeout
        idle_minutes = max(1, parse_duration_s(idle) // 60)
        # Kubernetes cannot stop a pod, only delete it: autostop there means down.
        resources["autostop"] = {"idle_minutes": idle_minutes, "down": True}

    envs: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for key, value in spec.env.items():
        (secrets if is_secret_name(key) else envs)[key] = value
    envs.update(
        {
            "DESKGPU_USER": who,
            "DESKGPU_JOB": spec.name,
            "DESKGPU_CHECKPOINT_DIR": ckpt,
            "DESKGPU_DATA_DIR": DATA_MOUNT,
        }
    )

    task: dict[str, Any] = {"name": name, "resources": resources}
    if spec.workdir is not None:
        task["workdir"] = spec.workdir
    task["envs"] = envs
    if secrets:
        task["secrets"] = secrets
    task["setup"] = _setup_script(spec, ckpt)
    run = _run_script(spec)
    if run is not None:
        task["run"] = run

    if on_box:
        section: dict[str, Any] = {
            # -1: keep the pod Pending until GPUs free up, so a busy box queues the job
            # instead of failing it after the default 10 s (sky/provision/kubernetes/instance.py).
            "provision_timeout": -1,
            "pod_config": host_mounts_pod_config(config, user),
        }
        if config.kueue_local_queue:
            section["kueue"] = {"local_queue_name": config.kueue_local_queue}
        task["config"] = {_config_section(infra): section}
    else:
        notes.append(
            f"infra {infra}: no host mounts there. /data and {CHECKPOINT_MOUNT} are the box's "
            "disks; use SkyPilot `file_mounts` with a bucket (mode: MOUNT) for data and "
            "checkpoints, or they vanish with the VM."
        )
    return Expansion(
        task=task,
        cluster_name=name,
        managed=not spec.interactive,
        idle_minutes=idle_minutes,
        notes=notes,
    )


def redacted(task: dict[str, Any]) -> dict[str, Any]:
    """A copy of `task` safe to print or log: secret values replaced."""
    if not task.get("secrets"):
        return task
    out = dict(task)
    out["secrets"] = dict.fromkeys(task["secrets"], REDACTED)
    return out
