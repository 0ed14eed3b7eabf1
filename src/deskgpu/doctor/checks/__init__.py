"""Doctor's checks: pure functions of recorded `HostFacts` and the host config.

One module per component; each returns `Check`s with an id (`component.name`), a status
(ok/warn/fail/skip), one line of detail and an exact fix (a command or a doc link). What each
check needs, and the order they are reported in, is `deskgpu.doctor.registry`; `run_checks`
applies it, so a check whose prerequisite did not pass is skipped, saying which.
"""

from __future__ import annotations

from collections.abc import Callable

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.doctor.checks.base import COMPONENTS, FAIL, OK, SKIP, STATUSES, WARN, Check
from deskgpu.doctor.checks.cluster import check_cluster, this_node
from deskgpu.doctor.checks.docker import check_docker
from deskgpu.doctor.checks.driver import check_driver, gpu_matches
from deskgpu.doctor.checks.golden_rule import check_golden_rule, drift_distributions
from deskgpu.doctor.checks.gpu_pod import check_gpu_pod
from deskgpu.doctor.checks.kubernetes import check_kubernetes
from deskgpu.doctor.checks.operations import check_operations
from deskgpu.doctor.checks.skypilot import SHARED_SERVER, check_skypilot, resolve_endpoint
from deskgpu.doctor.checks.storage import check_storage
from deskgpu.doctor.checks.telemetry import check_telemetry
from deskgpu.doctor.facts import HostFacts
from deskgpu.doctor.registry import (
    AGENT,
    ANY,
    CLUSTER,
    CLUSTER_ONLY,
    CLUSTER_SERVER,
    LOCAL_ROOTS,
    REGISTRY,
    SERVER,
    CheckSpec,
)
from deskgpu.setup.nodes import shared_mounts

__all__ = [
    "COMPONENTS",
    "FAIL",
    "OK",
    "SHARED_SERVER",
    "SKIP",
    "STATUSES",
    "WARN",
    "Check",
    "Settings",
    "drift_distributions",
    "gpu_matches",
    "resolve_endpoint",
    "run_checks",
]

CHECKS: tuple[Callable[[HostFacts, HostConfig, Settings], list[Check]], ...] = (
    check_driver,
    check_docker,
    check_kubernetes,
    check_gpu_pod,
    check_skypilot,
    check_golden_rule,
    check_storage,
    check_operations,
    check_cluster,
    check_telemetry,
)


def evaluate(facts: HostFacts, config: HostConfig, s: Settings) -> dict[str, Check]:
    """What each component's checks say, by id, before the registry is applied."""
    found: dict[str, Check] = {}
    for fn in CHECKS:
        for check in fn(facts, config, s):
            found[check.id] = check
    return found


def elsewhere(spec: CheckSpec, facts: HostFacts, config: HostConfig) -> str | None:
    """Why `spec` does not run on this host (None: it does). One box is its own server."""
    if not config.nodes:
        return None
    node = this_node(facts, config)
    role = node.role if node is not None else None
    server = config.server_node
    go = f"`sudo deskgpu doctor` on {server.name}" if server else "doctor on the server"
    if spec.on == ANY or spec.on == CLUSTER:
        return None
    if role is None:
        return "this host is none of the cluster's nodes (cluster.node)"
    if spec.on in (SERVER, CLUSTER_SERVER) and role != "server":
        return f"the server's check: {go}"
    if spec.on == AGENT and role != "agent":
        return "an agent's check (cluster.nodes lists the agents)"
    if spec.on == LOCAL_ROOTS and node is not None and shared_mounts(config, node):
        return "the roots are the cluster's NFS storage here (cluster.shared_storage)"
    return None


def run_checks(facts: HostFacts, config: HostConfig) -> list[Check]:
    """Every registered check, in registry order, with `needs` and `doctor.skip` applied; on
    a cluster, each where it runs (a single box reports none of the cluster's)."""
    s = config.doctor
    found = evaluate(facts, config, s)
    out: list[Check] = []
    status: dict[str, str] = {}
    for spec in REGISTRY:
        if spec.on in CLUSTER_ONLY and not config.nodes:
            continue
        unmet = [n for n in spec.needs if status.get(n) not in (OK, WARN)]
        away = elsewhere(spec, facts, config)
        if away is not None:
            check = Check(spec.id, spec.component, SKIP, away)
        elif spec.id in s.skip:
            check = Check(
                spec.id, spec.component, SKIP, "skipped by doctor.skip in the host config"
            )
        elif unmet:
            first = unmet[0]
            check = Check(
                spec.id, spec.component, SKIP, f"needs {first} to pass; it is {status.get(first)}"
            )
        elif spec.id in found:
            check = found[spec.id]
        else:  # a component that did not judge a registered check is a doctor bug
            check = Check(spec.id, spec.component, SKIP, "not evaluated (a doctor bug: report it)")
        status[spec.id] = check.status
        out.append(check)
    return out
