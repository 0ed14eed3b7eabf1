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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from deskgpu.config import HostConfig, is_box_infra
from deskgpu.identity import safe_user
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
_OUR_VOLUMES = (DATA_VOLUME, CHECKPOINT_VOLUME)

BATCH = "batch"  # a managed job: queued durably, no autostop (it ends when its run ends)
INTERACTIVE = "interactive"  # a cluster: holds its GPUs until torn down, so it autodowns
KINDS = (BATCH, INTERACTIVE)

RESERVED_ENV_PREFIX = "DESKGPU_"
UNNAMED = "unnamed"

# Env names whose values SkyPilot should treat as secrets (redacted in its dashboard and logs).
_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSW(OR)?D|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)", re.I
)
# Names SkyPilot's client generates for `sky launch` without `-c` (cluster_utils).
_GENERATED_CLUSTER = re.compile(r"^sky-[0-9a-f]{4}-")
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
    return f"{config.checkpoint_root.rstrip('/')}/{safe_user(user)}"


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


def on_box(task: dict[str, Any], config: HostConfig) -> bool:
    """Every candidate resource runs on the box (its k3s or SSH node pool)."""
    return all(
        is_box_infra(_infra_of(r) or config.infra) for r in _effective(task.get("resources") or {})
    )


# ---------------------------------------------------------------------------------------------
# Applying the rules


def host_mounts_pod_config(config: HostConfig, user: str) -> dict[str, Any]:
    """hostPath volumes: `/data` read-only, `/checkpoints/<user>` read-write.

    `file_mounts` would copy files into the pod and lose them with it; a hostPath
    volume writes straight to the host's disk (DESIGN.md, SkyPilot facts).
    """
    spec: dict[str, Any] = {}
    _merge_host_mounts(spec, config, user)
    return {"spec": spec}


def _our_mounts(config: HostConfig, user: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    mounts: list[dict[str, Any]] = [
        {"name": DATA_VOLUME, "mountPath": DATA_MOUNT, "readOnly": True},
        {"name": CHECKPOINT_VOLUME, "mountPath": f"{CHECKPOINT_MOUNT}/{safe_user(user)}"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": DATA_VOLUME, "hostPath": {"path": config.data_root, "type": "Directory"}},
        {
            "name": CHECKPOINT_VOLUME,
            "hostPath": {"path": user_checkpoint_root(config, user), "type": "DirectoryOrCreate"},
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
    theirs = [m for m in first.get("volumeMounts") or [] if m.get("name") not in _OUR_VOLUMES]
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

    infra = _infra_of(_effective(out["resources"])[0]) or config.infra
    if on_box(out, config):
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
        if config.kueue_local_queue:
            kueue = section.get("kueue")
            kueue = kueue if isinstance(kueue, dict) else {}
            kueue["local_queue_name"] = config.kueue_local_queue
            section["kueue"] = kueue
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
    """
    t: dict[str, Any] = copy.deepcopy(dict(task))
    _lift_config_overrides(t)
    found: list[Violation] = []
    effective = _effective(t.get("resources") or {})
    box = on_box(t, config)
    if box:
        found += _gpu_violations(effective, int(t.get("num_nodes") or 1), config)
    found += _image_violations(effective, config)
    if box:
        found += _pod_violations(t, config, user)
        found += _file_mount_violations(t)
        found += _volume_violations(t, config, user, volume_host_paths or {})
    return found


def _norm_model(model: str) -> str:
    return re.sub(r"[^a-z0-9]", "", model.lower())


def _gpu_violations(
    effective: list[dict[str, Any]], nodes: int, config: HostConfig
) -> list[Violation]:
    asks = [_accelerators(r.get("accelerators")) for r in effective]
    asks = [a for a in asks if a]
    if not asks:
        return []
    found = []
    limit = config.max_gpus_per_job
    over = [(m, c * nodes) for a in asks for m, c in a if limit is not None and c * nodes > limit]
    if over and limit is not None:
        model, total = over[0]
        found.append(
            Violation(
                "max_gpus",
                f"asks for {total:g}x {model}; the house rule is at most {limit} GPUs per request",
                f"ask for at most {limit}, e.g. `--gpus {model}:{limit}`, or talk to the "
                "box's admin",
            )
        )
    if config.gpus:
        inventory = {_norm_model(m): n for m, n in config.gpus.items()}

        def fits(model: str, count: float) -> bool:
            have = inventory.get(_norm_model(model))
            return have is not None and count * nodes <= have

        if not any(all(fits(m, c) for m, c in a) for a in asks):
            wanted = " or ".join(",".join(f"{m}:{c:g}" for m, c in a) for a in asks)
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
) -> Violation | None:
    """A host path may be (inside) the data root read-only, or the user's own checkpoints."""
    norm = posixpath.normpath("/" + path.lstrip("/")) if path.startswith("/") else path
    mine = user_checkpoint_root(config, user)
    standard = (
        f"every job already gets {config.data_root} read-only at {DATA_MOUNT} and {mine} "
        f"read-write at {CHECKPOINT_MOUNT}/{safe_user(user)}"
    )
    if not norm.startswith("/"):
        return Violation("host_mount", f"{what} mounts a relative host path {path!r}", standard)
    if _within(norm, mine):
        return None
    if _within(norm, config.data_root):
        if writable:
            return Violation(
                "data_read_only",
                f"{what} mounts {norm} read-write; {config.data_root} is read-only in jobs",
                f"mount it with `readOnly: true`, or write to {CHECKPOINT_MOUNT}/"
                f"{safe_user(user)} instead",
            )
        return None
    if _within(norm, config.checkpoint_root):
        return Violation(
            "host_mount",
            f"{what} mounts {norm}: another user's checkpoints",
            f"mount only your own; {standard}",
        )
    return Violation(
        "host_mount",
        f"{what} mounts {norm} from the host, outside the box's roots {config.data_root} "
        f"and {mine}",
        f"remove it: {standard}; ask the admin to put shared data under {config.data_root}",
    )


def _pod_specs(task: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cfg = task.get("config") or {}
    for section in ("kubernetes", "ssh"):
        pod = (cfg.get(section) or {}).get("pod_config") or {}
        spec = pod.get("spec") if isinstance(pod, dict) else None
        if isinstance(spec, dict):
            yield section, spec


def _pod_violations(task: dict[str, Any], config: HostConfig, user: str) -> list[Violation]:
    found: list[Violation] = []
    ours = {v["name"]: v for v in _our_mounts(config, user)[1]}
    for section, spec in _pod_specs(task):
        where = f"config.{section}.pod_config"
        containers = [
            c
            for key in ("containers", "initContainers")
            for c in spec.get(key) or []
            if isinstance(c, dict)
        ]
        writable: dict[str, bool] = {}
        for c in containers:
            for m in c.get("volumeMounts") or []:
                name = str(m.get("name"))
                writable[name] = writable.get(name, False) or not m.get("readOnly", False)
                mount_path = str(m.get("mountPath") or "")
                if name not in _OUR_VOLUMES and _reserved(mount_path):
                    found.append(_reserved_violation(f"{where} volumeMount {name}", mount_path))
            security = c.get("securityContext") or {}
            adds = {str(x).upper() for x in (security.get("capabilities") or {}).get("add") or []}
            if security.get("privileged") or adds & {"SYS_ADMIN", "ALL"}:
                found.append(
                    Violation(
                        "privileged",
                        f"{where}: container {c.get('name') or '[0]'} asks to be privileged "
                        "(it could mount any disk of the host)",
                        "remove securityContext.privileged and capabilities; the GPUs come "
                        "through the NVIDIA device plugin without them",
                    )
                )
        for key in ("hostPID", "hostIPC"):
            if spec.get(key):
                found.append(
                    Violation(
                        "privileged",
                        f"{where}: {key}: true shares the host's processes with the job",
                        f"remove {key}",
                    )
                )
        for v in spec.get("volumes") or []:
            if not isinstance(v, dict) or not isinstance(v.get("hostPath"), dict):
                continue
            name = str(v.get("name"))
            if name in ours and v == ours[name]:
                continue
            path = str(v["hostPath"].get("path") or "")
            bad = _host_path_violation(
                path, writable.get(name, True), f"{where} hostPath volume {name}", config, user
            )
            if bad:
                found.append(bad)
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
    for dst, vol in (task.get("volumes") or {}).items():
        if _reserved(str(dst)):
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
            bad = _host_path_violation(path, writable, what, config, user)
            if bad:
                found.append(bad)
    for mount in task.get("volume_mounts") or []:
        vc = (mount or {}).get("volume_config") or {}
        host_path = (vc.get("config") or {}).get("host_path")
        if vc.get("type") == "k8s-hostpath" and not host_path:
            host_path = vc.get("name_on_cloud")
        if host_path:
            bad = _host_path_violation(
                str(host_path), True, f"volume {mount.get('volume_name')}", config, user
            )
            if bad:
                found.append(bad)
    return found


def cluster_name_violation(name: str | None, user: str) -> Violation | None:
    """A `sky launch -c NAME` cluster must carry its owner's prefix (names are global)."""
    if not name or _GENERATED_CLUSTER.match(name):
        return None
    who = safe_user(user)
    if name.startswith(f"{who}-"):
        return None
    return Violation(
        "cluster_name",
        f"cluster name {name!r} does not start with {who}-; cluster names are shared by "
        "everyone on this box",
        f"name it {user_prefixed(name, user)}: `sky launch -c {user_prefixed(name, user)} "
        "...`, or use `deskgpu submit`",
    )
