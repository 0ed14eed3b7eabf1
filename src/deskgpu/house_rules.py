"""The house rules as functions over a SkyPilot task dict: one implementation for everyone.

`deskgpu submit` builds a base task from a job spec and applies these rules (`expand.py`);
the admin policy (`policy.py`) applies the same rules to every request reaching the shared
API server, whether it came from `sky launch`, Transformer Lab or deskgpu itself.

Pure: no I/O, no SkyPilot import. A task dict may be in the form deskgpu writes (`config:`
at the top, `accelerators: A6000:2`) or the form `sky.Task.to_yaml_config()` returns
(`resources._cluster_config_overrides`, accelerators as a mapping, `image_id: {null: ...}`,
`any_of`/`ordered` candidates). `apply_house_rules` returns deskgpu's form, and applying it
to its own output changes nothing.
"""

from __future__ import annotations

import copy
import fnmatch
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deskgpu.config import HostConfig, is_box_infra
from deskgpu.identity import safe_user
from deskgpu.kubenames import JOB_SERVICE_ACCOUNT
from deskgpu.labels import LABEL_JOB, LABEL_KIND, LABEL_USER
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
    r"(TOKEN|SECRET|PASSW(OR)?D|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)", re.I
)
# Names SkyPilot's client generates for `sky launch` without `-c`: `sky-<4 hex>-<user>`
# (sky/utils/common_utils.py make_cluster_name_on_cloud / generate_cluster_name).
_GENERATED_CLUSTER = re.compile(r"^sky-[0-9a-f]{4}-(?P<user>.+)$")
_TASK_ORDER = (
    "name",
    "resources",
    "num_nodes",
    "workdir",
    "envs",
    "secrets",
    "file_mounts",
    "volumes",
    "setup",
    "run",
    "config",
)
_RESOURCE_ORDER = (
    "infra",
    "cloud",
    "region",
    "zone",
    "accelerators",
    "cpus",
    "memory",
    "instance_type",
    "image_id",
    "labels",
    "autostop",
)


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


# ---------------------------------------------------------------------------------------------
# Reading a task dict in either form


def _resources(task: dict[str, Any]) -> dict[str, Any]:
    res = task.get("resources")
    if not isinstance(res, dict):
        res = {}
        task["resources"] = res
    return res


def _candidates(res: dict[str, Any]) -> list[dict[str, Any]]:
    """`any_of` / `ordered` candidates; they override the fields beside them."""
    for key in ("any_of", "ordered"):
        group = res.get(key)
        if isinstance(group, list):
            return [c for c in group if isinstance(c, dict)]
    return []


def _effective(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each candidate resource as SkyPilot will read it (base fields + candidate fields)."""
    base = {k: v for k, v in res.items() if k not in ("any_of", "ordered")}
    cands = _candidates(res)
    return [{**base, **c} for c in cands] if cands else [base]


def _infra_of(res: Mapping[str, Any]) -> str | None:
    if res.get("infra"):
        return str(res["infra"])
    if res.get("cloud"):
        return "/".join(str(res[k]) for k in ("cloud", "region", "zone") if res.get(k))
    return None


def _image_values(value: Any) -> list[str]:
    """`docker:x`, or SkyPilot's per-region mapping `{null: docker:x}` -> image names."""
    values = list(value.values()) if isinstance(value, Mapping) else [value]
    return [str(v).removeprefix("docker:") for v in values if v]


def _accelerators(value: Any) -> list[tuple[str, float]]:
    """`A6000:2`, `A6000`, `{A6000: 2}`, `[A6000:2, L40S:2]` -> [(model, count)]."""
    if not value:
        return []
    if isinstance(value, Mapping):
        return [(str(k), float(v if v is not None else 1)) for k, v in value.items()]
    if isinstance(value, (list, tuple, set)):
        return [pair for item in value for pair in _accelerators(item)]
    text = str(value).strip().strip("{}")
    pairs = []
    for part in text.split(","):
        model, _, count = part.replace("'", "").replace('"', "").partition(":")
        if model.strip():
            try:
                pairs.append((model.strip(), float(count) if count.strip() else 1.0))
            except ValueError:
                pairs.append((model.strip(), 1.0))
    return pairs


def _lift_config_overrides(task: dict[str, Any]) -> None:
    """SkyPilot's `resources._cluster_config_overrides` -> deskgpu's top-level `config`."""
    res = _resources(task)
    lifted: dict[str, Any] = {}
    for part in [res, *_candidates(res)]:
        overrides = part.pop("_cluster_config_overrides", None)
        if isinstance(overrides, dict):
            lifted = _deep_merge(lifted, overrides)
    if lifted:
        task["config"] = _deep_merge(lifted, task.get("config") or {})


def lifted_config(task: Mapping[str, Any]) -> dict[str, Any]:
    """A task's `config` in deskgpu's form (SkyPilot's per-resource overrides lifted)."""
    t: dict[str, Any] = copy.deepcopy(dict(task))
    _lift_config_overrides(t)
    cfg = t.get("config")
    return cfg if isinstance(cfg, dict) else {}


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _reorder(d: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    head = {k: d[k] for k in order if k in d}
    return {**head, **{k: v for k, v in d.items() if k not in head}}


def _config_section(infra: str) -> str:
    """Task-level config key for the box's infra: `ssh` for SSH node pools, else `kubernetes`."""
    return "ssh" if infra.split("/", 1)[0] == "ssh" else "kubernetes"


def _may_reach_box(infra: str) -> bool:
    """The box's infra, or a wildcard (`*`, `*/...`) SkyPilot's optimizer may resolve to it."""
    head = infra.strip().lower().split("/", 1)[0]
    return head in ("", "*") or is_box_infra(head)


def _box_candidates(res: dict[str, Any], config: HostConfig) -> list[dict[str, Any]]:
    return [r for r in _effective(res) if _may_reach_box(_infra_of(r) or config.infra)]


def on_box(task: dict[str, Any], config: HostConfig) -> bool:
    """Some candidate resource may run on the box (its k3s or SSH node pool).

    Any, not all: `any_of: [{infra: aws}, {infra: k8s}]` may land on the box, so it gets the
    box's mounts and checks (the config sections are ignored by a cloud candidate).
    """
    return bool(_box_candidates(task.get("resources") or {}, config))


# ---------------------------------------------------------------------------------------------
# Applying the rules


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


def _merge_host_mounts(spec: dict[str, Any], config: HostConfig, user: str) -> None:
    """Ours replace any volume or mount of the same name; the user's others stay."""
    mounts, volumes = _our_mounts(config, user)
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        containers = [{}]
    spec["containers"] = containers
    first = containers[0]
    # SkyPilot merges volumeMounts by mountPath: ours replace whatever sits at our paths. The
    # user's other mounts of our volumes stay, for `check_house_rules` to judge (read-only
    # data, their own checkpoint subPath).
    paths = {m["mountPath"] for m in mounts}
    theirs = [
        m
        for m in first.get("volumeMounts") or []
        if not (isinstance(m, dict) and m.get("mountPath") in paths)
    ]
    first["volumeMounts"] = theirs + mounts
    theirs = [v for v in spec.get("volumes") or [] if v.get("name") not in _OUR_VOLUMES]
    spec["volumes"] = theirs + volumes


def apply_house_rules(
    task: Mapping[str, Any], config: HostConfig, user: str, kind: str
) -> dict[str, Any]:
    """A copy of `task` with the house rules applied for `user`; `kind` is batch or interactive.

    Adds the user prefix to the name; the box's infra and default image where none is
    asked for; owner labels; autodown within the box's idle limits for sessions (a user's
    `autostop: false` or `down: false` does not survive); `DESKGPU_*` envs; secret-looking
    envs moved to `secrets`; and on the box: `provision_timeout: -1` (queue, don't fail),
    Kueue's LocalQueue, and the standard `/data` and `/checkpoints/<user>` mounts.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    out: dict[str, Any] = copy.deepcopy(dict(task))
    who = safe_user(user)
    _lift_config_overrides(out)
    job = job_of(out.get("name"), user)
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
        _merge_host_mounts(spec, config, user)
        # The jobs' restricted identity (deskgpu.cluster): under `kubernetes` for SSH node pools
        # too (sky/clouds/kubernetes.py reads it there). A client's value stays, to be refused.
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


def idle_minutes_of(task: Mapping[str, Any]) -> int | None:
    """The autostop minutes a task carries (after `apply_house_rules`), if any."""
    for r in _effective(dict(task.get("resources") or {})):
        minutes = _minutes(r.get("autostop"))
        if minutes is not None:
            return minutes
    return None


# ---------------------------------------------------------------------------------------------
# Checking the rules


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
        found += _gpu_violations(box, int(t.get("num_nodes") or 1), config)
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
    candidates: list[dict[str, Any]], nodes: int, config: HostConfig
) -> list[Violation]:
    """`max_gpus` holds for every option SkyPilot might pick; the inventory needs one option
    that fits. Options: each candidate's accelerators, and each entry of an accelerator list
    or set (SkyPilot reads `[A6000:2, L40S:2]` as any of them, not all)."""
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
    if config.gpus:
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


def _within(path: str, root: str) -> bool:
    root = posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


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


# ---------------------------------------------------------------------------------------------
# Kubernetes / SSH sections of a task's `config` or of the request's SkyPilot config


# Pod spec keys a request may set; every other key is refused (hostNetwork, hostPID,
# serviceAccountName, runtimeClassName, nodeName, priorityClassName, schedulerName,
# initContainers, ephemeralContainers, resourceClaims, ...).
POD_SPEC_KEYS = frozenset(
    {
        "containers",
        "volumes",
        "securityContext",
        "tolerations",
        "nodeSelector",
        "affinity",
        "imagePullSecrets",
        "terminationGracePeriodSeconds",
        "dnsConfig",
        "enableServiceLinks",
    }
)
# Keys allowed only with these values (what Kubernetes does without them).
_POD_SPEC_DEFAULTS: dict[str, Any] = {
    "hostNetwork": False,
    "hostPID": False,
    "hostIPC": False,
    "shareProcessNamespace": False,
    "automountServiceAccountToken": False,
}
CONTAINER_KEYS = frozenset(
    {"name", "env", "volumeMounts", "resources", "securityContext", "workingDir", "ports"}
)
_POD_SECURITY_KEYS = frozenset(
    {
        "runAsUser",
        "runAsGroup",
        "runAsNonRoot",
        "fsGroup",
        "fsGroupChangePolicy",
        "supplementalGroups",
        "supplementalGroupsPolicy",
        "seccompProfile",
        "appArmorProfile",
    }
)
_CONTAINER_SECURITY_KEYS = frozenset(
    {
        "runAsUser",
        "runAsGroup",
        "runAsNonRoot",
        "readOnlyRootFilesystem",
        "allowPrivilegeEscalation",
        "privileged",
        "capabilities",
        "seccompProfile",
        "appArmorProfile",
        "procMount",
    }
)
_MOUNT_KEYS = frozenset({"name", "mountPath", "readOnly", "subPath", "recursiveReadOnly"})
# Label/annotation key prefixes a request may not set: deskgpu's owner labels, Kueue's queue
# and priority, SkyPilot's own; and annotations that switch off AppArmor or seccomp.
_RESERVED_META = re.compile(
    r"^(deskgpu\.io/|kueue\.x-k8s\.io/|skypilot|.*apparmor|.*seccomp)", re.IGNORECASE
)
_SECTIONS = ("kubernetes", "ssh")


def sky_config_violations(
    cfg: Mapping[str, Any], config: HostConfig, user: str, *, where: str
) -> list[Violation]:
    """Violations in the `kubernetes` / `ssh` sections of a SkyPilot config mapping.

    Used for a task's `config` and for the request's whole SkyPilot config (the client's
    `~/.sky/config.yaml` / `--config` is merged into the server's and its `pod_config` into
    every pod): `pod_config` (also per context), `remote_identity`, `custom_metadata`,
    `enable_docker`.
    """
    found: list[Violation] = []
    emptydirs: set[str] = set()
    pods: list[tuple[str, Mapping[str, Any]]] = []
    for section in _SECTIONS:
        body = cfg.get(section)
        if not isinstance(body, Mapping):
            continue
        scopes: list[tuple[str, Mapping[str, Any]]] = [(f"{where}.{section}", body)]
        contexts = body.get("context_configs")
        if isinstance(contexts, Mapping):
            scopes += [
                (f"{where}.{section}.context_configs.{ctx}", sub)
                for ctx, sub in contexts.items()
                if isinstance(sub, Mapping)
            ]
        for here, scope in scopes:
            found += _identity_violations(scope, here)
            meta = scope.get("custom_metadata")
            if meta is not None:
                found += _metadata_violations(meta, f"{here}.custom_metadata")
            pod = scope.get("pod_config")
            if pod is None:
                continue
            if not isinstance(pod, Mapping):
                found.append(_pod_key_violation(f"{here}.pod_config", "is not a mapping"))
                continue
            pods.append((f"{here}.pod_config", pod))
            spec = pod.get("spec")
            for v in (spec.get("volumes") if isinstance(spec, Mapping) else None) or []:
                if isinstance(v, Mapping) and set(v) == {"name", "emptyDir"}:
                    emptydirs.add(str(v["name"]))
    for here, pod in pods:
        found += _pod_config_violations(pod, here, config, user, emptydirs)
    return found


def _pod_key_violation(what: str, problem: str, fix: str | None = None) -> Violation:
    return Violation(
        "pod_config",
        f"{what} {problem}",
        fix
        or "remove it; a pod_config may set only "
        + ", ".join(sorted(POD_SPEC_KEYS))
        + " (see `deskgpu` README, House rules)",
    )


def _identity_violations(scope: Mapping[str, Any], where: str) -> list[Violation]:
    found: list[Violation] = []
    identity = scope.get("remote_identity")
    values = list(identity.values()) if isinstance(identity, Mapping) else [identity]
    bad = [v for v in values if v is not None and str(v) not in SAFE_REMOTE_IDENTITIES]
    if bad:
        found.append(
            Violation(
                "remote_identity",
                f"{where}.remote_identity {bad[0]!r} would run the job with the API server's "
                "Kubernetes credentials (LOCAL_CREDENTIALS) or a service account that may "
                "create pods (SERVICE_ACCOUNT, NO_UPLOAD, any other)",
                f"remove it; jobs run as the box's {JOB_SERVICE_ACCOUNT!r} service account",
            )
        )
    docker = scope.get("enable_docker")
    if docker not in (None, False):
        found.append(
            Violation(
                "privileged",
                f"{where}.enable_docker adds a privileged Docker-in-Docker sidecar (it could "
                "mount any disk of the host)",
                "remove it; build images elsewhere and run them with `image`",
            )
        )
    return found


def _metadata_violations(meta: Any, where: str) -> list[Violation]:
    if not isinstance(meta, Mapping):
        return [_pod_key_violation(where, "is not a mapping")]
    found: list[Violation] = []
    for key, value in meta.items():
        if key not in ("labels", "annotations"):
            found.append(
                _pod_key_violation(
                    f"{where}.{key}", "is not allowed", "set only labels/annotations"
                )
            )
            continue
        if not isinstance(value, Mapping):
            found.append(_pod_key_violation(f"{where}.{key}", "is not a mapping"))
            continue
        for name in value:
            if _RESERVED_META.match(str(name)):
                found.append(
                    Violation(
                        "pod_metadata",
                        f"{where}.{key} sets {name!r}: reserved for the box (owner, queue, "
                        "SkyPilot, AppArmor/seccomp)",
                        "remove it; deskgpu sets the owner and queue labels itself",
                    )
                )
    return found


def _pod_config_violations(
    pod: Mapping[str, Any], where: str, config: HostConfig, user: str, emptydirs: set[str]
) -> list[Violation]:
    found: list[Violation] = []
    for key in pod:
        if key not in ("apiVersion", "kind", "metadata", "spec"):
            found.append(_pod_key_violation(f"{where}.{key}", "is not allowed"))
    if pod.get("metadata") is not None:
        found += _metadata_violations(pod["metadata"], f"{where}.metadata")
    spec = pod.get("spec")
    if spec is None:
        return found
    if not isinstance(spec, Mapping):
        return [*found, _pod_key_violation(f"{where}.spec", "is not a mapping")]
    where = f"{where}.spec"
    for key, value in spec.items():
        if key in POD_SPEC_KEYS:
            continue
        if key in _POD_SPEC_DEFAULTS and value == _POD_SPEC_DEFAULTS[key]:
            continue
        if key in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"):
            found.append(
                Violation(
                    "privileged",
                    f"{where}.{key} set to {value!r} shares the host's network or processes with "
                    "the job",
                    f"remove {key}",
                )
            )
        elif key in ("serviceAccountName", "serviceAccount", "automountServiceAccountToken"):
            found.append(
                Violation(
                    "service_account",
                    f"{where}.{key}: {value!r} would give the job other Kubernetes credentials",
                    f"remove {key}; SkyPilot picks the pod's service account",
                )
            )
        else:
            found.append(_pod_key_violation(f"{where}.{key}", "is not allowed"))
    found += _security_violations(spec.get("securityContext"), where, _POD_SECURITY_KEYS)
    ours = {v["name"]: v for v in _our_mounts(config, user)[1]}
    volumes = spec.get("volumes")
    for i, v in enumerate(volumes if isinstance(volumes, list) else []):
        name = str(v.get("name")) if isinstance(v, Mapping) else f"[{i}]"
        what = f"{where}.volumes {name}"
        if not isinstance(v, Mapping):
            found.append(_pod_key_violation(what, "is not a mapping"))
        elif name in ours:
            if dict(v) != ours[name]:
                found.append(
                    Violation(
                        "host_mount",
                        f"{what} is named like the box's standard volume but is not it",
                        f"remove it; deskgpu adds {name} itself",
                    )
                )
        elif isinstance(v.get("hostPath"), Mapping):
            path = str(v["hostPath"].get("path") or "")
            found.append(_host_path_violation(path, False, f"{what} (hostPath)", config, user))
        elif set(v) != {"name", "emptyDir"}:
            found.append(
                _pod_key_violation(
                    what,
                    "is not an emptyDir",
                    "only emptyDir volumes may be added; data and checkpoints come from the "
                    f"standard volumes {DATA_VOLUME} and {CHECKPOINT_VOLUME}",
                )
            )
    if volumes is not None and not isinstance(volumes, list):
        found.append(_pod_key_violation(f"{where}.volumes", "is not a list"))
    containers = spec.get("containers")
    if containers is not None and not isinstance(containers, list):
        found.append(_pod_key_violation(f"{where}.containers", "is not a list"))
        containers = []
    for i, c in enumerate(containers or []):
        found += _container_violations(
            c, f"{where}.containers[{i}]", i, config, user, set(ours) | emptydirs
        )
    return found


def _security_violations(sc: Any, where: str, allowed: frozenset[str]) -> list[Violation]:
    if sc is None:
        return []
    where = f"{where}.securityContext"
    if not isinstance(sc, Mapping):
        return [_pod_key_violation(where, "is not a mapping")]
    found: list[Violation] = []
    fix = (
        "remove it; the GPUs come through the NVIDIA device plugin without privileges, and a "
        "securityContext may only restrict (runAsUser, runAsNonRoot, capabilities.drop, ...)"
    )
    for key, value in sc.items():
        problem: str | None = None
        if key not in allowed:
            problem = f"{key} is not allowed"
        elif key in ("privileged", "allowPrivilegeEscalation") and value is not False:
            problem = f"{key} set to {value!r}"
        elif key == "capabilities":
            adds = value.get("add") if isinstance(value, Mapping) else None
            if not isinstance(value, Mapping) or set(value) - {"add", "drop"}:
                problem = "capabilities may only drop"
            elif adds:
                problem = f"capabilities.add {list(adds)} (no capability may be added)"
        elif key in ("seccompProfile", "appArmorProfile"):
            kind = value.get("type") if isinstance(value, Mapping) else None
            if str(kind) not in ("RuntimeDefault", "Localhost") or set(value) - {
                "type",
                "localhostProfile",
            }:
                problem = f"{key} {value!r} (only RuntimeDefault or Localhost)"
        elif key == "procMount" and value != "Default":
            problem = f"procMount {value!r}"
        if problem:
            found.append(Violation("privileged", f"{where}: {problem}", fix))
    return found


def _container_violations(
    c: Any,
    where: str,
    index: int,
    config: HostConfig,
    user: str,
    known_volumes: set[str],
) -> list[Violation]:
    if not isinstance(c, Mapping):
        return [_pod_key_violation(where, "is not a mapping")]
    found: list[Violation] = []
    name = c.get("name")
    if index > 0 or (name is not None and name != MAIN_CONTAINER):
        found.append(
            _pod_key_violation(
                where,
                f"adds a container {name or ''} beside SkyPilot's {MAIN_CONTAINER}",
                "use one container entry without a name (it is merged into the job's "
                "container); sidecars would run unchecked images",
            )
        )
    for key in c:
        if key not in CONTAINER_KEYS:
            fix = (
                "use resources.image_id (checked against the box's image rules)"
                if key == "image"
                else "remove it"
            )
            found.append(_pod_key_violation(f"{where}.{key}", "is not allowed", fix))
    found += _security_violations(c.get("securityContext"), where, _CONTAINER_SECURITY_KEYS)
    found += _container_resource_violations(c.get("resources"), where)
    for e in c.get("env") or [] if isinstance(c.get("env"), list) else []:
        if not isinstance(e, Mapping):
            continue
        env_name = str(e.get("name") or "")
        if env_name.upper() in GPU_VISIBILITY_ENV:
            found.append(_gpu_env_violation(f"{where}.env {env_name}"))
        source = e.get("valueFrom")
        if isinstance(source, Mapping) and set(source) - {"fieldRef", "resourceFieldRef"}:
            found.append(
                _pod_key_violation(
                    f"{where}.env {env_name}.valueFrom",
                    "reads a Kubernetes Secret or ConfigMap",
                    "put secrets in SkyPilot `secrets:` (redacted) instead",
                )
            )
    mounts = c.get("volumeMounts")
    for m in mounts if isinstance(mounts, list) else []:
        found += _mount_violations(m, where, config, user, known_volumes)
    return found


def _container_resource_violations(resources: Any, where: str) -> list[Violation]:
    if resources is None:
        return []
    if not isinstance(resources, Mapping):
        return [_pod_key_violation(f"{where}.resources", "is not a mapping")]
    found: list[Violation] = []
    for part in ("limits", "requests"):
        amounts = resources.get(part)
        for key in amounts if isinstance(amounts, Mapping) else []:
            if not re.fullmatch(r"cpu|memory|ephemeral-storage|hugepages-.*", str(key)):
                found.append(
                    Violation(
                        "gpu_outside_queue",
                        f"{where}.resources.{part} asks for {key}; GPUs and devices come only "
                        "through `resources.accelerators`, where the queue and the limits see "
                        "them",
                        "remove it and ask with `accelerators:` / `--gpus`",
                    )
                )
    for key in resources:
        if key not in ("limits", "requests"):
            found.append(_pod_key_violation(f"{where}.resources.{key}", "is not allowed"))
    return found


def _mount_violations(
    m: Any, where: str, config: HostConfig, user: str, known_volumes: set[str]
) -> list[Violation]:
    if not isinstance(m, Mapping):
        return [_pod_key_violation(f"{where}.volumeMounts", "has an entry that is not a mapping")]
    found: list[Violation] = []
    name = str(m.get("name"))
    what = f"{where}.volumeMounts {name}"
    path = str(m.get("mountPath") or "")
    for key in m:
        if key not in _MOUNT_KEYS:
            found.append(_pod_key_violation(f"{what}.{key}", "is not allowed"))
    if name not in known_volumes:
        found.append(
            _pod_key_violation(
                what,
                "mounts a volume this request does not define",
                f"mount {DATA_VOLUME}, {CHECKPOINT_VOLUME} or an emptyDir you add",
            )
        )
    who = safe_user(user)
    if name == DATA_VOLUME and m.get("readOnly") is not True:
        found.append(
            Violation(
                "data_read_only",
                f"{what} mounts {config.data_root} without `readOnly: true`",
                f"add `readOnly: true`; write to {CHECKPOINT_MOUNT}/{who} instead",
            )
        )
    elif name == CHECKPOINT_VOLUME:
        sub = str(m.get("subPath") or "")
        parts = sub.split("/")
        if parts[0] != who or ".." in parts or sub.startswith("/"):
            found.append(
                Violation(
                    "host_mount",
                    f"{what} uses subPath {sub!r}; only {who!r} (your own checkpoints) may be "
                    "mounted",
                    f"use `subPath: {who}`, or drop the mount: deskgpu mounts it at "
                    f"{CHECKPOINT_MOUNT}/{who}",
                )
            )
    elif name not in _OUR_VOLUMES and _reserved(path):
        found.append(_reserved_violation(what, path))
    return found


def _gpu_env_violation(what: str) -> Violation:
    return Violation(
        "gpu_env",
        f"{what} sets which GPUs the job sees; Kubernetes hands out GPUs through the queue",
        "remove it and ask for GPUs with `accelerators:` / `--gpus`",
    )


def _task_env_violations(task: dict[str, Any]) -> list[Violation]:
    found: list[Violation] = []
    for key in ("envs", "secrets"):
        values = task.get(key)
        for name in values if isinstance(values, Mapping) else []:
            if str(name).upper() in GPU_VISIBILITY_ENV:
                found.append(_gpu_env_violation(f"{key} {name}"))
    return found


def _reserved(path: str) -> bool:
    norm = posixpath.normpath(path) if path else ""
    return _within(norm, DATA_MOUNT) or _within(norm, CHECKPOINT_MOUNT)


def _reserved_violation(what: str, path: str) -> Violation:
    return Violation(
        "reserved_mount",
        f"{what} targets {path}, inside {DATA_MOUNT} or {CHECKPOINT_MOUNT}, which every job "
        "mounts from the box's disks",
        f"read data from {DATA_MOUNT} directly, write checkpoints to $DESKGPU_CHECKPOINT_DIR, "
        "or mount it somewhere else",
    )


def _file_mount_violations(task: dict[str, Any]) -> list[Violation]:
    mounts = task.get("file_mounts") or {}
    return [
        _reserved_violation(f"file_mounts {dst}", str(dst)) for dst in mounts if _reserved(str(dst))
    ]


def _volume_violations(
    task: dict[str, Any], config: HostConfig, user: str, host_paths: Mapping[str, str | None]
) -> list[Violation]:
    found: list[Violation] = []
    box = on_box(task, config)
    for dst, vol in (task.get("volumes") or {}).items():
        if box and _reserved(str(dst)):
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
