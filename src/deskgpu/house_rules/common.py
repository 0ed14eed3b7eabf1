"""The house rules' vocabulary: the standard mounts and volumes, names, `Violation`, and the
host-path rule every kind of mount is held to. Pure; imports no SkyPilot."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.identity import safe_user
from deskgpu.kubenames import JOB_SERVICE_ACCOUNT
from deskgpu.units import parse_duration_s

DATA_MOUNT = "/data"


CHECKPOINT_MOUNT = "/checkpoints"


DATA_VOLUME = "deskgpu-data"


CHECKPOINT_VOLUME = "deskgpu-checkpoints"


_OUR_VOLUMES = (DATA_VOLUME, CHECKPOINT_VOLUME)


BATCH = "batch"  # a managed job: queued durably, no autostop (it ends when its run ends)


INTERACTIVE = "interactive"  # a cluster: holds its GPUs until torn down, so it autodowns


KINDS = (BATCH, INTERACTIVE)


RESERVED_ENV_PREFIX = "DESKGPU_"
# What the house rules set in every job's environment (house_rules.apply `_apply_env_rules`).
DESKGPU_ENV = ("DESKGPU_USER", "DESKGPU_JOB", "DESKGPU_CHECKPOINT_DIR", "DESKGPU_DATA_DIR")


UNNAMED = "unnamed"


# GPUs are handed out by Kubernetes' device plugin; these would route around the queue and
# the limits (the same names the job spec loader refuses).
GPU_VISIBILITY_ENV = (
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "CUDA_VISIBLE_DEVICES",
)


# SkyPilot's main container in its Kubernetes pod template (sky/templates/kubernetes-ray.yml.j2):
# a pod_config container without a name, or with this one, is merged into it.
MAIN_CONTAINER = "ray-node"


# The one `remote_identity` a job may run with: the restricted service account `deskgpu setup
# render` creates. SkyPilot 0.14's others: LOCAL_CREDENTIALS (the server's kubeconfig) and
# SERVICE_ACCOUNT / NO_UPLOAD (`skypilot-service-account`, allowed every verb in the namespace).
SAFE_REMOTE_IDENTITIES = (JOB_SERVICE_ACCOUNT,)


# Env names whose values SkyPilot should treat as secrets (redacted in its dashboard and logs).
_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSW(OR)?D|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY"
    r"|(^|_)(KEY|PAT|AUTH|PASS|PWD)$|^AUTH_)",
    re.I,
)


# Names SkyPilot's client generates for `sky launch` without `-c`: `sky-<4 hex>-<user>`
# (sky/utils/common_utils.py make_cluster_name_on_cloud / generate_cluster_name).
_GENERATED_CLUSTER = re.compile(r"^sky-[0-9a-f]{4}-(?P<user>.+)$")


_STANDARD_MOUNTS = (DATA_MOUNT, CHECKPOINT_MOUNT)


_MOUNT_MODES = ("MOUNT", "MOUNT_CACHED")  # SkyPilot's storage modes that mount, not copy


@dataclass(frozen=True)
class Violation:
    """A broken house rule: which rule, what is wrong, and how to comply."""

    rule: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.problem} ({self.fix})"


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def checkpoint_dir(user: str, job: str) -> str:
    return f"{CHECKPOINT_MOUNT}/{safe_user(user)}/{job}"


def user_checkpoint_root(config: HostConfig, user: str) -> str:
    """The host directory mounted read-write at `/checkpoints/<user>`."""
    return f"{_checkpoint_root(config)}/{safe_user(user)}"


def _checkpoint_root(config: HostConfig) -> str:
    return posixpath.normpath(config.checkpoint_root) if config.checkpoint_root else "/"


def label_value(text: str | None) -> str:
    """Any name as a Kubernetes label value (and a safe single path component)."""
    token = re.sub(r"[^a-z0-9_.-]+", "-", (text or "").lower())
    token = re.sub(r"^[^a-z0-9]+|[^a-z0-9]+$", "", token[:63])
    token = re.sub(r"[^a-z0-9]+$", "", token)
    return token or UNNAMED


def user_prefixed(name: str, user: str) -> str:
    """`<user>-<name>`: names are global on a shared API server. Idempotent."""
    who = safe_user(user)
    return name if name.startswith(f"{who}-") else f"{who}-{name}"


def job_of(name: str | None, user: str) -> str:
    """The job part of a (possibly user-prefixed) task name, as a label value."""
    who = safe_user(user)
    if name and name.startswith(f"{who}-") and len(name) > len(who) + 1:
        name = name[len(who) + 1 :]
    return label_value(name)


def session_idle_minutes(requested: int | None, config: HostConfig) -> int:
    """The idle minutes a session gets: what it asked for, within the box's limits."""
    longest = max(1, config.max_idle_timeout_s // 60)
    if requested is None or requested < 0:
        requested = config.idle_timeout_s // 60
    return max(1, min(requested, longest))


def _minutes(value: Any) -> int | None:
    """A SkyPilot autostop value (`true`, `30`, `"1h"`, `{idle_minutes: ...}`) in minutes."""
    if isinstance(value, Mapping):
        return _minutes(value.get("idle_minutes"))
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    try:
        return parse_duration_s(text) // 60
    except ValueError:
        return None


def _within(path: str, root: str) -> bool:
    root = posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _reserved(path: str) -> bool:
    norm = posixpath.normpath(path) if path else ""
    return _within(norm, DATA_MOUNT) or _within(norm, CHECKPOINT_MOUNT)


def _reserved_violation(what: str, path: str) -> Violation:
    return Violation(
        "reserved_mount",
        f"{what} targets {path}, inside {DATA_MOUNT} or {CHECKPOINT_MOUNT}, which every job "
        "mounts from the box's disks",
        f"read data from {DATA_MOUNT} directly, write checkpoints to $DESKGPU_CHECKPOINT_DIR, "
        f"mount it somewhere else, or mount your own storage at exactly {DATA_MOUNT} or "
        f"{CHECKPOINT_MOUNT} (it then takes the box's place there)",
    )


def _gpu_env_violation(what: str) -> Violation:
    return Violation(
        "gpu_env",
        f"{what} sets which GPUs the job sees; Kubernetes hands out GPUs through the queue",
        "remove it and ask for GPUs with `accelerators:` / `--gpus`",
    )


def _storage_mount(value: Any) -> bool:
    """A file_mounts value that mounts a bucket (a storage dict, MOUNT or MOUNT_CACHED),
    rather than copying files (a local path, a bucket URL string, `mode: COPY`)."""
    if not isinstance(value, Mapping) or not (value.get("source") or value.get("name")):
        return False
    return str(value.get("mode") or "MOUNT").upper() in _MOUNT_MODES


def _our_mounts(config: HostConfig, user: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    who = safe_user(user)
    mounts: list[dict[str, Any]] = [
        {"name": DATA_VOLUME, "mountPath": DATA_MOUNT, "readOnly": True},
        {"name": CHECKPOINT_VOLUME, "mountPath": f"{CHECKPOINT_MOUNT}/{who}", "subPath": who},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": DATA_VOLUME, "hostPath": {"path": config.data_root, "type": "Directory"}},
        {
            "name": CHECKPOINT_VOLUME,
            "hostPath": {"path": _checkpoint_root(config), "type": "Directory"},
        },
    ]
    return mounts, volumes


def _host_path_violation(
    path: str, writable: bool, what: str, config: HostConfig, user: str
) -> Violation:
    """Any host path but the standard volumes is refused.

    A hostPath follows symlinks on the host, and the checks here can only read the path's
    text: a path inside a directory a user can write (their own checkpoints, a group-writable
    data folder) may lead anywhere. Parts of the standard volumes are reachable safely with
    `subPath` (the kubelet keeps a subPath inside its volume).
    """
    norm = posixpath.normpath("/" + path.lstrip("/")) if path.startswith("/") else path
    who = safe_user(user)
    standard = (
        f"every job already gets {config.data_root} read-only at {DATA_MOUNT} and its own "
        f"checkpoints read-write at {CHECKPOINT_MOUNT}/{who}; for a part of {config.data_root}, "
        f"mount volume {DATA_VOLUME} with `subPath: <dir>` and `readOnly: true`"
    )
    if not norm.startswith("/"):
        return Violation("host_mount", f"{what} mounts a relative host path {path!r}", standard)
    if _within(norm, config.data_root) and writable:
        return Violation(
            "data_read_only",
            f"{what} mounts {norm} read-write; {config.data_root} is read-only in jobs",
            f"write to {CHECKPOINT_MOUNT}/{who} instead; {standard}",
        )
    if _within(norm, _checkpoint_root(config)) and not _within(
        norm, user_checkpoint_root(config, user)
    ):
        return Violation(
            "host_mount",
            f"{what} mounts {norm}: another user's checkpoints",
            f"mount only your own; {standard}",
        )
    return Violation(
        "host_mount",
        f"{what} mounts host path {norm}; only the box's standard volumes may reach the host "
        "(a host path follows symlinks, so any other could lead anywhere)",
        f"remove it: {standard}; ask the admin to put shared data under {config.data_root}",
    )
