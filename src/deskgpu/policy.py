"""The house rules as a SkyPilot admin policy, for every request reaching the shared API server.

In the API server's config: `admin_policy: deskgpu.policy.HouseRules`. Whoever submits
(`sky launch`, `sky jobs launch`, Transformer Lab, `deskgpu submit`), the request's task
goes through the same `house_rules.apply_house_rules` that `deskgpu submit --dry-run`
prints, then `check_house_rules`; a broken rule rejects the request with the rule's name
and how to comply.

This module runs inside the API server and imports `sky` at the top, which is why nothing
in deskgpu's CLI imports it. It reads the host config per request (`$DESKGPU_CONFIG`, else
`/etc/deskgpu/config.yaml`), so an edited config applies without a server restart.
"""

from __future__ import annotations

import copy
import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sky
from sky import exceptions as sky_exceptions

from deskgpu.config import HostConfig, load_config
from deskgpu.errors import DeskgpuError
from deskgpu.house_rules import (
    BATCH,
    INTERACTIVE,
    Violation,
    apply_house_rules,
    check_house_rules,
    cluster_name_violation,
    lifted_config,
    sky_config_violations,
)
from deskgpu.labels import LABEL_USER

# What each SkyPilot request is, for the house rules (sky/server/requests/request_names.py).
_BATCH_REQUESTS = {
    "jobs.launch",
    "jobs.launch_cluster",
    "jobs.pool_apply",
    "serve.up",
    "serve.update",
    "serve.launch_replica",
}
_SESSION_REQUESTS = {"launch"}
_CHECK_ONLY_REQUESTS = {"exec"}  # runs on an existing cluster: its resources are fixed
# SkyPilot's own controllers: not shaped, and only their Kubernetes config is checked (a
# user's pod_config must not ride along on a controller pod).
_PASS_REQUESTS = {"jobs.launch_controller", "serve.launch_controller"}
# Relaunches by SkyPilot's controllers of a task this policy already shaped: the owner is the
# one recorded then, not the controller's account.
_RELAUNCH_REQUESTS = {"jobs.launch_cluster", "serve.launch_replica"}


@dataclass(frozen=True)
class Decision:
    """How a request is treated: mutate as `kind`, only check, or leave alone."""

    kind: str | None  # BATCH or INTERACTIVE when the task is shaped
    check: bool = True
    check_cluster_name: bool = False


def decide(request_name: str, has_request_options: bool) -> Decision:
    """`sky jobs launch` is batch; every `sky launch` cluster is a session (it holds its GPUs
    until torn down, run or no run); `sky exec` is only checked."""
    if request_name in _PASS_REQUESTS:
        return Decision(kind=None, check=False)
    if request_name in _BATCH_REQUESTS:
        return Decision(kind=BATCH)
    if request_name in _SESSION_REQUESTS:
        return Decision(kind=INTERACTIVE, check_cluster_name=True)
    if request_name in _CHECK_ONLY_REQUESTS:
        # `sky exec NAME`: NAME must be the user's own cluster too.
        return Decision(kind=None, check_cluster_name=True)
    # `validate` / `optimize` ahead of a launch carry request options (and its cluster name);
    # ahead of a jobs launch or an exec they carry none.
    if has_request_options:
        return Decision(kind=INTERACTIVE, check_cluster_name=True)
    return Decision(kind=BATCH)


def request_user(
    request_name: str, user_name: str | None, task_labels: Mapping[str, Any] | None
) -> str:
    """Whose request this is: the API server's user, or the recorded owner on a relaunch."""
    recorded = (task_labels or {}).get(LABEL_USER)
    if request_name in _RELAUNCH_REQUESTS and recorded:
        return str(recorded)
    if user_name:
        return user_name
    if recorded:
        return str(recorded)
    return os.environ.get("SKYPILOT_USER") or getpass.getuser()


def shape_task_config(
    task_config: Mapping[str, Any],
    config: HostConfig,
    *,
    request_name: str,
    user: str,
    cluster_name: str | None = None,
    has_request_options: bool = False,
    volume_host_paths: Mapping[str, str | None] | None = None,
) -> tuple[dict[str, Any], list[Violation]]:
    """The policy without SkyPilot objects: a task dict in, the shaped dict and violations out."""
    decision = decide(request_name, has_request_options)
    shaped = dict(task_config)
    if decision.kind is not None:
        if not shaped.get("name") and cluster_name:
            shaped["name"] = cluster_name
        shaped = apply_house_rules(shaped, config, user, decision.kind)
    found: list[Violation] = []
    if decision.check:
        found = check_house_rules(shaped, config, user, volume_host_paths=volume_host_paths)
    else:
        found = sky_config_violations(lifted_config(shaped), config, user, where="config")
    if decision.check_cluster_name:
        bad = cluster_name_violation(cluster_name, user)
        if bad:
            found.insert(0, bad)
    return shaped, found


def rejection_text(violations: list[Violation], config: HostConfig) -> str:
    lines = [f"rejected by the house rules of {config.box_name}:"]
    lines += [f"  - {v}" for v in violations]
    lines.append("  (see `deskgpu submit --dry-run` for a job shaped to fit; rules come from ")
    lines[-1] += f"{config.source})"
    return "\n".join(lines)


def _labels(task_config: Mapping[str, Any]) -> dict[str, Any]:
    res = task_config.get("resources") or {}
    labels = dict(res.get("labels") or {})
    for key in ("any_of", "ordered"):
        for cand in res.get(key) or []:
            labels.update((cand or {}).get("labels") or {})
    return labels


def _volume_host_paths(task_config: Mapping[str, Any]) -> dict[str, str | None]:
    """Host paths of the registered volumes the task names (server-side state)."""
    names: set[str] = set()
    for vol in (task_config.get("volumes") or {}).values():
        name = vol if isinstance(vol, str) else (vol or {}).get("name")
        if name:
            names.add(str(name))
    if not names:
        return {}
    found: dict[str, str | None] = {}
    try:
        from sky import global_user_state
    except ImportError:  # pragma: no cover - part of every SkyPilot install
        return found
    for name in names:
        try:
            record = global_user_state.get_volume_by_name(name)
        except Exception:  # noqa: S112 - an unknown volume is SkyPilot's to report, after us
            continue
        handle = (record or {}).get("handle")
        vtype = str(getattr(handle, "type", "") or "")
        cfg = getattr(handle, "config", None) or {}
        found[name] = str(cfg.get("host_path")) if "hostpath" in vtype and cfg else None
    return found


def _reject(text: str) -> Exception:
    return sky_exceptions.UserRequestRejectedByPolicy(text)


def mutate(user_request: Any, config: HostConfig) -> Any:
    """`validate_and_mutate` with the host config given (tests pass their own)."""
    name = getattr(user_request.request_name, "value", str(user_request.request_name))
    options = user_request.request_options
    task = user_request.task
    original = task.to_yaml_config()
    user = request_user(
        name,
        getattr(user_request.user, "name", None) if user_request.user else None,
        _labels(original),
    )
    shaped, violations = shape_task_config(
        original,
        config,
        request_name=name,
        user=user,
        cluster_name=getattr(options, "cluster_name", None) if options else None,
        has_request_options=options is not None,
        volume_host_paths=_volume_host_paths(original),
    )
    # The request's SkyPilot config: the server's merged with the client's `~/.sky/config.yaml`
    # / `--config`, whose `kubernetes.pod_config` SkyPilot folds into every pod it creates.
    violations += sky_config_violations(
        dict(user_request.skypilot_config or {}), config, user, where="SkyPilot config"
    )
    if violations:
        raise _reject(rejection_text(violations, config))
    if decide(name, options is not None).kind is None:
        return sky.MutatedUserRequest(task=task, skypilot_config=user_request.skypilot_config)
    new_task = sky.Task.from_yaml_config(copy.deepcopy(shaped))
    # Not serialized by to_yaml_config; restored the way SkyPilot's RESTful policy does.
    new_task.managed_job_dag = task.managed_job_dag
    new_task.service_name = task.service_name
    return sky.MutatedUserRequest(task=new_task, skypilot_config=user_request.skypilot_config)


class HouseRules(sky.AdminPolicy):
    """deskgpu's house rules for every SkyPilot request on the box."""

    @classmethod
    def validate_and_mutate(cls, user_request: Any) -> Any:
        try:
            config = load_config()
        except DeskgpuError as exc:
            raise _reject(
                "the box's deskgpu host config is broken, so no request can be checked: "
                + "; ".join(exc.lines())
                + " (ask the admin to run `deskgpu doctor`)"
            ) from None
        return mutate(user_request, config)
