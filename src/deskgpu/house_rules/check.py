"""Checking the house rules: every rule a task breaks, each a `Violation` naming the fix."""

from __future__ import annotations

import copy
import fnmatch
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.house_rules.common import (
    _GENERATED_CLUSTER,
    _STANDARD_MOUNTS,
    DATA_MOUNT,
    GPU_VISIBILITY_ENV,
    Violation,
    _gpu_env_violation,
    _host_path_violation,
    _reserved,
    _reserved_violation,
    _storage_mount,
    user_prefixed,
)
from deskgpu.house_rules.nodes import per_node_violation, pinned_node
from deskgpu.house_rules.podspec import sky_config_violations
from deskgpu.house_rules.taskdict import (
    _accelerators,
    _box_candidates,
    _effective,
    _image_values,
    _lift_config_overrides,
    on_box,
)
from deskgpu.identity import safe_user


def check_house_rules(
    task: Mapping[str, Any],
    config: HostConfig,
    user: str,
    *,
    volume_host_paths: Mapping[str, str | None] | None = None,
) -> list[Violation]:
    """Every rule `task` breaks; empty when it may run. Checks the task as given.

    `volume_host_paths` maps registered SkyPilot volume names to their host path (None for
    volumes that are not host paths), so a `k8s-hostpath` volume cannot smuggle in `/`.

    The Kubernetes/SSH sections of `config` (pod_config, remote_identity, custom_metadata,
    enable_docker) are checked whatever the infra: they only ever act on Kubernetes, and the
    box is the Kubernetes SkyPilot reaches. GPU and mount rules apply when any candidate
    resource may land on the box.
    """
    t: dict[str, Any] = copy.deepcopy(dict(task))
    _lift_config_overrides(t)
    found: list[Violation] = []
    res = t.get("resources") or {}
    effective = _effective(res)
    box = _box_candidates(res, config)
    if box:
        cfg_now = t.get("config")
        pin = pinned_node(cfg_now) if isinstance(cfg_now, Mapping) else None
        found += _gpu_violations(box, int(t.get("num_nodes") or 1), config, pin)
    found += _image_violations(effective, config)
    found += _task_env_violations(t)
    cfg = t.get("config")
    if isinstance(cfg, Mapping):
        found += sky_config_violations(cfg, config, user, where="config")
    if box:
        found += _file_mount_violations(t)
    found += _volume_violations(t, config, user, volume_host_paths or {})
    return found


def _norm_model(model: str) -> str:
    return re.sub(r"[^a-z0-9]", "", model.lower())


def _gpu_violations(
    candidates: list[dict[str, Any]], nodes: int, config: HostConfig, pin: str | None = None
) -> list[Violation]:
    """`max_gpus` holds for every option SkyPilot might pick; the inventory needs one option
    that fits. Options: each candidate's accelerators, and each entry of an accelerator list
    or set (SkyPilot reads `[A6000:2, L40S:2]` as any of them, not all). On a cluster
    (`nodes:`) an option fits when each of its pods finds a node with that many
    (`house_rules.nodes`); `pin`: the node the task's pod_config pins it to."""
    options = [pair for r in candidates for pair in _accelerators(r.get("accelerators"))]
    if not options:
        return []
    found = []
    limit = config.max_gpus_per_job
    over = [(m, c * nodes) for m, c in options if limit is not None and c * nodes > limit]
    if over and limit is not None:
        model, total = over[0]
        found.append(
            Violation(
                "max_gpus",
                f"asks for {total:g}x {model}; the house rule is at most {limit} GPUs per request "
                "(for every alternative it lists)",
                f"ask for at most {limit}, e.g. `--gpus {model}:{limit}`, or talk to the "
                "box's admin",
            )
        )
    if config.nodes:
        known = pin if pin is not None and config.node(pin) is not None else None
        per_node = per_node_violation(config, options, nodes, known)
        if per_node is not None:
            found.append(per_node)
    elif config.gpus:
        inventory = {_norm_model(m): n for m, n in config.gpus.items()}

        def fits(model: str, count: float) -> bool:
            have = inventory.get(_norm_model(model))
            return have is not None and count * nodes <= have

        if not any(fits(m, c) for m, c in options):
            wanted = " or ".join(f"{m}:{c:g}" for m, c in options)
            if nodes > 1:
                wanted += f" on each of {nodes} nodes"
            found.append(
                Violation(
                    "gpu_inventory",
                    f"asks for {wanted}, but this box has {config.describe_gpus()}: it would "
                    "wait in the queue forever",
                    "ask for one of those models and at most that many, e.g. "
                    f"`--gpus {next(iter(config.gpus))}:1`",
                )
            )
    return found


def _image_violations(effective: list[dict[str, Any]], config: HostConfig) -> list[Violation]:
    found: list[Violation] = []
    if not config.images_allow and not config.images_deny:
        return found
    seen: set[str] = set()
    for r in effective:
        for image in _image_values(r.get("image_id")):
            if image in seen or image == config.default_image:
                continue
            seen.add(image)
            denied = next((p for p in config.images_deny if fnmatch.fnmatchcase(image, p)), None)
            allowed = ", ".join(config.images_allow) or (config.default_image or "")
            if denied:
                found.append(
                    Violation(
                        "image_denied",
                        f"image {image} matches {denied!r} on the box's deny list",
                        f"use another image{' matching ' + allowed if allowed else ''}",
                    )
                )
            elif config.images_allow and not any(
                fnmatch.fnmatchcase(image, p) for p in config.images_allow
            ):
                found.append(
                    Violation(
                        "image_not_allowed",
                        f"image {image} is not on the box's allow list",
                        f"use an image matching {allowed}",
                    )
                )
    return found


def _task_env_violations(task: dict[str, Any]) -> list[Violation]:
    found: list[Violation] = []
    for key in ("envs", "secrets"):
        values = task.get(key)
        for name in values if isinstance(values, Mapping) else []:
            if str(name).upper() in GPU_VISIBILITY_ENV:
                found.append(_gpu_env_violation(f"{key} {name}"))
    return found


def _file_mount_violations(task: dict[str, Any]) -> list[Violation]:
    """Nothing is copied into or mounted inside the standard paths; a bucket mounted at exactly
    one of them takes its place (`own_standard_mounts`)."""
    found = []
    for dst, value in (task.get("file_mounts") or {}).items():
        norm = posixpath.normpath(str(dst))
        if not _reserved(norm) or (norm in _STANDARD_MOUNTS and _storage_mount(value)):
            continue
        if norm in _STANDARD_MOUNTS:
            found.append(
                Violation(
                    "reserved_mount",
                    f"file_mounts {dst} copies files into {norm}, which every job mounts from "
                    "the box's disks" + (" read-only" if norm == DATA_MOUNT else ""),
                    f"mount a bucket there instead (`{{source: s3://..., mode: MOUNT}}` takes "
                    f"the place of the box's {norm}), or copy somewhere else",
                )
            )
        else:
            found.append(_reserved_violation(f"file_mounts {dst}", str(dst)))
    return found


def _volume_violations(
    task: dict[str, Any], config: HostConfig, user: str, host_paths: Mapping[str, str | None]
) -> list[Violation]:
    found: list[Violation] = []
    box = on_box(task, config)
    for dst, vol in (task.get("volumes") or {}).items():
        exact = posixpath.normpath(str(dst)) in _STANDARD_MOUNTS  # takes the standard's place
        if box and _reserved(str(dst)) and not exact:
            found.append(_reserved_violation(f"volumes {dst}", str(dst)))
        path: str | None
        if isinstance(vol, dict) and vol.get("host_path"):
            writable = str(vol.get("mode", "ro")) == "rw"
            path, what = str(vol["host_path"]), f"volumes {dst} (host_path)"
        else:
            name = vol if isinstance(vol, str) else (vol or {}).get("name")
            path = host_paths.get(str(name)) if name else None
            writable, what = True, f"volumes {dst} (volume {name})"
        if path:
            found.append(_host_path_violation(path, writable, what, config, user))
    for mount in task.get("volume_mounts") or []:
        vc = (mount or {}).get("volume_config") or {}
        host_path = (vc.get("config") or {}).get("host_path")
        if vc.get("type") == "k8s-hostpath" and not host_path:
            host_path = vc.get("name_on_cloud")
        if host_path:
            found.append(
                _host_path_violation(
                    str(host_path), True, f"volume {mount.get('volume_name')}", config, user
                )
            )
    return found


HOSTPATH_VOLUME = "k8s-hostpath"  # SkyPilot's volume type that is a directory of the host


def volume_registration_violation(
    volume_type: str | None, name: str, config_doc: Mapping[str, Any] | None,
    config: HostConfig, user: str,
) -> Violation | None:  # fmt: skip
    """`sky volumes apply`: a hostPath volume is held to the host-mount rule when registered,
    not only when a job names it (SkyPilot never hands this request to the admin policy)."""
    if volume_type != HOSTPATH_VOLUME:
        return None
    path = str((config_doc or {}).get("host_path") or "")
    return _host_path_violation(
        path or "(none)", True, f"volume {name} ({volume_type})", config, user
    )


def sky_cleaned_username(user: str) -> str:
    """SkyPilot's `common_utils.get_cleaned_username` (the tail of its generated names)."""
    name = re.sub(r"[^a-z0-9-_]", "", user.lower())
    name = re.sub(r"^[0-9-]+", "", name)
    return re.sub(r"-$", "", name)[:63]


def cluster_name_violation(name: str | None, user: str) -> Violation | None:
    """A cluster name (`sky launch -c NAME`, `sky exec NAME`) must carry its owner's prefix
    (names are global), or be the name SkyPilot generated for this user (`sky-1a2b-<user>`)."""
    if not name:
        return None
    who = safe_user(user)
    if name.startswith(f"{who}-"):
        return None
    generated = _GENERATED_CLUSTER.match(name)
    if generated and generated.group("user") in (sky_cleaned_username(user), who):
        return None
    return Violation(
        "cluster_name",
        f"cluster name {name!r} does not start with {who}-; cluster names are shared by "
        "everyone on this box",
        f"name it {user_prefixed(name, user)}: `sky launch -c {user_prefixed(name, user)} "
        "...`, or use `deskgpu submit`",
    )
