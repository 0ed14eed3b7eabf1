"""Reading SkyPilot task dicts in both forms: the one deskgpu writes (`config:` at the top,
`accelerators: A6000:2`) and the one `sky.Task.to_yaml_config()` returns
(`resources._cluster_config_overrides`, accelerators as a mapping, `image_id: {null: ...}`,
`any_of`/`ordered` candidates)."""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Mapping
from typing import Any

from deskgpu.config import HostConfig, is_box_infra
from deskgpu.house_rules.common import _STANDARD_MOUNTS, _minutes, _storage_mount

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


def own_standard_mounts(task: Mapping[str, Any]) -> list[str]:
    """The standard paths (`/data`, `/checkpoints`) at which the task mounts its own storage.

    Cloud parity both ways: a YAML written for the cloud mounts its bucket or SkyPilot volume
    at exactly `/data` or `/checkpoints`; on the box that mount takes the place of the standard
    one at that path (a copy into `/data` stays refused: it would write into read-only data).
    """
    found: list[str] = []
    for dst, value in (task.get("file_mounts") or {}).items():
        if posixpath.normpath(str(dst)) in _STANDARD_MOUNTS and _storage_mount(value):
            found.append(posixpath.normpath(str(dst)))
    for dst in task.get("volumes") or {}:
        if posixpath.normpath(str(dst)) in _STANDARD_MOUNTS:
            found.append(posixpath.normpath(str(dst)))
    return [p for p in _STANDARD_MOUNTS if p in found]


def idle_minutes_of(task: Mapping[str, Any]) -> int | None:
    """The autostop minutes a task carries (after `apply_house_rules`), if any."""
    for r in _effective(dict(task.get("resources") or {})):
        minutes = _minutes(r.get("autostop"))
        if minutes is not None:
            return minutes
    return None
