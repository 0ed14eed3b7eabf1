"""Expansion: a job spec + the host config + a user -> a complete SkyPilot task dict.

Pure: no I/O, no SkyPilot import. The spec gives a base task (what the researcher asked
for); `house_rules.apply_house_rules` adds the rest. The admin policy applies that same
function server-side to every request, so `submit --dry-run` prints what the box runs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.house_rules import (
    CHECKPOINT_MOUNT,
    CHECKPOINT_VOLUME,
    DATA_MOUNT,
    DATA_VOLUME,
    apply_house_rules,
    checkpoint_dir,
    idle_minutes_of,
    on_box,
    replaced_mount_notes,
)
from deskgpu.house_rules.nodes import most_per_node, node_pin_config
from deskgpu.identity import cluster_name
from deskgpu.labels import LABEL_JOB, LABEL_KEEP, LABEL_KIND, LABEL_PREFIX, LABEL_USER
from deskgpu.spec import GpuRequest, JobSpec
from deskgpu.units import parse_duration_s

__all__ = [
    "CHECKPOINT_MOUNT",
    "CHECKPOINT_VOLUME",
    "DATA_MOUNT",
    "DATA_VOLUME",
    "LABEL_JOB",
    "LABEL_KEEP",
    "LABEL_KIND",
    "LABEL_PREFIX",
    "LABEL_USER",
    "REDACTED",
    "Expansion",
    "base_task",
    "checkpoint_dir",
    "expand",
    "gpu_accelerators",
    "redacted",
]

REDACTED = "<redacted>"


@dataclass(frozen=True)
class Expansion:
    """What `submit` needs: the task dict, how to launch it, and notes for the user."""

    task: dict[str, Any]
    cluster_name: str
    managed: bool  # batch jobs are SkyPilot managed jobs; sessions are clusters
    idle_minutes: int | None
    notes: list[str] = field(default_factory=list)


def gpu_accelerators(request: GpuRequest, config: HostConfig) -> str | list[str] | None:
    """SkyPilot's `accelerators`: one `TYPE:N`, or any-of the box's models for a bare count."""
    if not request.count:
        return None
    if request.model:
        canonical = {m.lower(): m for m in config.gpus}
        return f"{canonical.get(request.model.lower(), request.model)}:{request.count}"
    if config.nodes:  # a pod gets one node's GPUs: the models some node has that many of
        models = [m for m in config.gpus if most_per_node(config, m) >= request.count]
    else:
        models = [m for m, n in config.gpus.items() if n >= request.count]
    if len(models) == 1:
        return f"{models[0]}:{request.count}"
    return [f"{m}:{request.count}" for m in models]


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


def base_task(spec: JobSpec, config: HostConfig, user: str) -> dict[str, Any]:
    """What the spec itself asks for, before the house rules (name not yet user-prefixed)."""
    resources: dict[str, Any] = {}
    if spec.infra:
        resources["infra"] = spec.infra
    accelerators = gpu_accelerators(spec.gpus, config)
    if accelerators is not None:
        resources["accelerators"] = accelerators
    if spec.image:
        resources["image_id"] = f"docker:{spec.image}"
    if spec.keep:
        resources["labels"] = {LABEL_KEEP: "true"}
    if spec.interactive:
        idle = spec.idle_timeout or config.idle_timeout
        resources["autostop"] = {"idle_minutes": max(1, parse_duration_s(idle) // 60)}
    task: dict[str, Any] = {"name": spec.name, "resources": resources}
    if spec.nodes > 1:
        task["num_nodes"] = spec.nodes
    if spec.node:
        task["config"] = node_pin_config(config, spec.node)
    if spec.workdir is not None:
        task["workdir"] = spec.workdir
    task["envs"] = dict(spec.env)
    task["setup"] = _setup_script(spec, checkpoint_dir(user, spec.name))
    run = _run_script(spec)
    if run is not None:
        task["run"] = run
    return task


def expand(spec: JobSpec, config: HostConfig, user: str) -> Expansion:
    """Apply the house rules. `spec` is already valid for `config` (see `spec.load_spec`)."""
    task = apply_house_rules(base_task(spec, config, user), config, user, spec.kind)
    notes: list[str] = []
    if not on_box(task, config):
        infra = task["resources"].get("infra", config.infra)
        notes.append(
            f"infra {infra}: no host mounts there. /data and {CHECKPOINT_MOUNT} are the box's "
            "disks; use SkyPilot `file_mounts` with a bucket (mode: MOUNT) for data and "
            "checkpoints, or they vanish with the VM."
        )
    notes += replaced_mount_notes(task, config)
    return Expansion(
        task=task,
        cluster_name=cluster_name(user, spec.name),
        managed=not spec.interactive,
        idle_minutes=idle_minutes_of(task) if spec.interactive else None,
        notes=notes,
    )


def redacted(task: dict[str, Any]) -> dict[str, Any]:
    """A copy of `task` safe to print or log: secret values replaced."""
    if not task.get("secrets"):
        return task
    out = dict(task)
    out["secrets"] = dict.fromkeys(task["secrets"], REDACTED)
    return out
