"""Applying the house rules: what every request gets (names, labels, limits, the mounts)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.house_rules.common import (
    _OUR_VOLUMES,
    CHECKPOINT_MOUNT,
    CHECKPOINT_VOLUME,
    DATA_MOUNT,
    DATA_VOLUME,
    INTERACTIVE,
    KINDS,
    RESERVED_ENV_PREFIX,
    _checkpoint_root,
    _minutes,
    _our_mounts,
    is_secret_name,
    job_of,
    session_idle_minutes,
    user_prefixed,
)
from deskgpu.house_rules.taskdict import (
    _RESOURCE_ORDER,
    _TASK_ORDER,
    _box_candidates,
    _candidates,
    _config_section,
    _effective,
    _infra_of,
    _lift_config_overrides,
    _reorder,
    _resources,
    on_box,
    own_standard_mounts,
)
from deskgpu.identity import safe_user
from deskgpu.kubenames import JOB_SERVICE_ACCOUNT
from deskgpu.labels import LABEL_JOB, LABEL_KIND, LABEL_USER


def host_mounts_pod_config(config: HostConfig, user: str) -> dict[str, Any]:
    """hostPath volumes: `/data` read-only, `/checkpoints/<user>` read-write.

    `file_mounts` would copy files into the pod and lose them with it; a hostPath
    volume writes straight to the host's disk (DESIGN.md, SkyPilot facts). The checkpoint
    volume is the root-owned `checkpoint_root` itself, entered with `subPath: <user>`: the
    kubelet resolves a subPath inside its volume and refuses one that a symlink leads out of,
    where a hostPath of `<root>/<user>` would follow a symlink the user planted anywhere.
    """
    spec: dict[str, Any] = {}
    _merge_host_mounts(spec, config, user)
    return {"spec": spec}


def replaced_mount_notes(task: Mapping[str, Any], config: HostConfig) -> list[str]:
    """What a user (and the server log) is told when their own mount replaces a standard one."""
    if not on_box(dict(task), config):
        return []
    source = {DATA_MOUNT: config.data_root, CHECKPOINT_MOUNT: _checkpoint_root(config)}
    return [
        f"{path}: the task mounts its own storage there, so the box's {source[path]} is not "
        f"mounted at {path} for this job (everything written there goes to the task's storage)"
        for path in own_standard_mounts(task)
    ]


def _merge_host_mounts(
    spec: dict[str, Any], config: HostConfig, user: str, replaced: Sequence[str] = ()
) -> None:
    """Ours replace any volume or mount of the same name; the user's others stay.

    `replaced`: standard paths the task mounts its own storage at; ours are left out there
    (and a volume of ours no mount uses any more is dropped).
    """
    ours, volumes = _our_mounts(config, user)
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        containers = [{}]
    spec["containers"] = containers
    first = containers[0]
    # SkyPilot merges volumeMounts by mountPath: ours replace whatever sits at our paths (an
    # earlier pass's own mounts included). The user's other mounts of our volumes stay, for
    # `check_house_rules` to judge (read-only data, their own checkpoint subPath).
    paths = {m["mountPath"] for m in ours}
    theirs = [
        m
        for m in first.get("volumeMounts") or []
        if not (isinstance(m, dict) and m.get("mountPath") in paths)
    ]
    keep = {
        DATA_VOLUME: DATA_MOUNT not in replaced,
        CHECKPOINT_VOLUME: CHECKPOINT_MOUNT not in replaced,
    }
    first["volumeMounts"] = theirs + [m for m in ours if keep[m["name"]]]
    used = {
        m.get("name")
        for c in containers
        if isinstance(c, dict)
        for m in c.get("volumeMounts") or []
        if isinstance(m, dict)
    }
    theirs_volumes = [v for v in spec.get("volumes") or [] if v.get("name") not in _OUR_VOLUMES]
    spec["volumes"] = theirs_volumes + [v for v in volumes if v["name"] in used]


def apply_house_rules(
    task: Mapping[str, Any], config: HostConfig, user: str, kind: str, *, keep_name: bool = False
) -> dict[str, Any]:
    """A copy of `task` with the house rules applied for `user`; `kind` is batch or interactive.

    Adds the user prefix to the name; the box's infra and default image where none is
    asked for; owner labels; autodown within the box's idle limits for sessions (a user's
    `autostop: false` or `down: false` does not survive); `DESKGPU_*` envs; secret-looking
    envs moved to `secrets`; and on the box: `provision_timeout: -1` (queue, don't fail),
    Kueue's LocalQueue, and the standard `/data` and `/checkpoints/<user>` mounts (but not at
    a path where the task mounts its own storage: `own_standard_mounts`).

    `keep_name`: a job group's task keeps its name (the group's `primary_tasks` name it and its
    peers reach it as `<name>-<i>.<group>`); its owner label says whose it is.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    out: dict[str, Any] = copy.deepcopy(dict(task))
    who = safe_user(user)
    _lift_config_overrides(out)
    job = job_of(out.get("name"), user)
    if not (keep_name and out.get("name")):
        out["name"] = user_prefixed(out["name"], user) if out.get("name") else f"{who}-{job}"

    res = _resources(out)
    parts = [res, *_candidates(res)]
    effective = _effective(res)
    if any(_infra_of(r) is None for r in effective):
        res["infra"] = config.infra
    if config.default_image and any(not r.get("image_id") for r in effective):
        res["image_id"] = f"docker:{config.default_image}"
    ours = {LABEL_USER: who, LABEL_JOB: job, LABEL_KIND: kind}
    for part in parts:
        if part is res or "labels" in part:
            part["labels"] = {**(part.get("labels") or {}), **ours}
    if kind == INTERACTIVE:
        asked = next((_minutes(r.get("autostop")) for r in effective if r.get("autostop")), None)
        idle = session_idle_minutes(asked, config)
        for part in parts:
            if part is res or "autostop" in part:
                before = part.get("autostop")
                # Kubernetes cannot stop a pod, only delete it: autostop there means down.
                rule = dict(before) if isinstance(before, Mapping) else {}
                rule.update({"idle_minutes": idle, "down": True})
                part["autostop"] = _reorder(rule, ("idle_minutes", "down"))
    for key in ("any_of", "ordered"):
        if isinstance(res.get(key), list):
            res[key] = [
                _reorder(c, _RESOURCE_ORDER) if isinstance(c, dict) else c for c in res[key]
            ]
    out["resources"] = _reorder(res, _RESOURCE_ORDER)

    _apply_env_rules(out, who, job)

    box = _box_candidates(out["resources"], config)
    if box:
        infra = _infra_of(box[0]) or config.infra
        cfg = out.get("config")
        cfg = cfg if isinstance(cfg, dict) else {}
        out["config"] = cfg
        section = cfg.get(_config_section(infra))
        section = section if isinstance(section, dict) else {}
        cfg[_config_section(infra)] = section
        # -1: keep the pod Pending until GPUs free up, so a busy box queues the job
        # instead of failing it after the default 10 s (sky/provision/kubernetes/instance.py).
        section["provision_timeout"] = -1
        pod_config = section.get("pod_config")
        pod_config = pod_config if isinstance(pod_config, dict) else {}
        section["pod_config"] = pod_config
        spec = pod_config.get("spec")
        spec = spec if isinstance(spec, dict) else {}
        pod_config["spec"] = spec
        _merge_host_mounts(spec, config, user, own_standard_mounts(out))
        # The jobs' restricted identity (deskgpu.setup.cluster): under `kubernetes` for SSH node
        # pools too (sky/clouds/kubernetes.py reads it there). A client's value stays, to be
        # refused.
        k8s_section = cfg.get("kubernetes")
        k8s_section = k8s_section if isinstance(k8s_section, dict) else {}
        cfg["kubernetes"] = k8s_section
        k8s_section.setdefault("remote_identity", JOB_SERVICE_ACCOUNT)
        if config.kueue_local_queue:
            # Always under `kubernetes`: SkyPilot reads Kueue from there for SSH node pools
            # too (clouds/kubernetes.py), and `ssh.kueue` is not a task-overridable key.
            k8s = cfg.get("kubernetes")
            k8s = k8s if isinstance(k8s, dict) else {}
            cfg["kubernetes"] = k8s
            kueue = k8s.get("kueue")
            kueue = kueue if isinstance(kueue, dict) else {}
            kueue["local_queue_name"] = config.kueue_local_queue
            k8s["kueue"] = kueue
            stray = section.get("kueue") if section is not k8s else None
            if isinstance(stray, dict):
                stray.pop("local_queue_name", None)
                if not stray:
                    section.pop("kueue")
    return _reorder(out, _TASK_ORDER)


def _apply_env_rules(task: dict[str, Any], who: str, job: str) -> None:
    envs = {
        str(k): v
        for k, v in (task.get("envs") or {}).items()
        if not str(k).upper().startswith(RESERVED_ENV_PREFIX)
    }
    secrets = task.get("secrets")
    if secrets is None or isinstance(secrets, dict):
        moved = {k: envs.pop(k) for k in list(envs) if is_secret_name(k)}
        secrets = {**(secrets or {}), **moved}
        secrets = {k: v for k, v in secrets.items() if not k.upper().startswith("DESKGPU_")}
    envs.update(
        {
            "DESKGPU_USER": who,
            "DESKGPU_JOB": job,
            "DESKGPU_CHECKPOINT_DIR": f"{CHECKPOINT_MOUNT}/{who}/{job}",
            "DESKGPU_DATA_DIR": DATA_MOUNT,
        }
    )
    task["envs"] = envs
    if secrets:
        task["secrets"] = secrets
    else:
        task.pop("secrets", None)
