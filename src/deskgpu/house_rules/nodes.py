"""The house rules on a cluster of several boxes (the host config's `nodes:`).

A pod runs on one node, so a job may ask for at most what one node has, times its node count:
each of its `num_nodes` pods needs a node of its own with that many GPUs of the model, or, when
the job is pinned to a node (`nodeSelector: {kubernetes.io/hostname: <node>}` in its
pod_config, what a spec's `node:` becomes), that node holds all of them. Without `nodes:` the
box is one node and the older rules in `check.py` apply unchanged. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.config.nodes import Node
from deskgpu.house_rules.common import Violation
from deskgpu.kubenames import HOSTNAME_LABEL

_SECTIONS = ("kubernetes", "ssh")


def node_pin_config(config: HostConfig, node: str) -> dict[str, Any]:
    """A task's `config` pinning every pod of the job to `node` (its pod_config)."""
    section = "ssh" if config.infra.split("/", 1)[0] == "ssh" else "kubernetes"
    return {section: {"pod_config": {"spec": {"nodeSelector": {HOSTNAME_LABEL: node}}}}}


def _pod_configs(cfg: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for section in _SECTIONS:
        body = cfg.get(section)
        if not isinstance(body, Mapping):
            continue
        scopes = [body]
        contexts = body.get("context_configs")
        if isinstance(contexts, Mapping):
            scopes += [c for c in contexts.values() if isinstance(c, Mapping)]
        for scope in scopes:
            pod = scope.get("pod_config")
            if isinstance(pod, Mapping):
                yield pod


def pinned_node(cfg: Mapping[str, Any]) -> str | None:
    """The node a task's (lifted) config pins its pods to, if any."""
    for pod in _pod_configs(cfg):
        spec = pod.get("spec")
        selector = spec.get("nodeSelector") if isinstance(spec, Mapping) else None
        if isinstance(selector, Mapping) and selector.get(HOSTNAME_LABEL) is not None:
            return str(selector[HOSTNAME_LABEL])
    return None


def known_nodes(config: HostConfig) -> str:
    return ", ".join(n.name for n in config.nodes)


def unknown_node_violation(name: str, config: HostConfig, where: str) -> Violation:
    return Violation(
        "node",
        f"{where} pins the job to node {name!r}, which is not one of the cluster's nodes "
        f"({config.describe_nodes()})",
        f"pin it to one of {known_nodes(config)}, or leave the node to the scheduler",
    )


def _norm(model: str) -> str:
    return re.sub(r"[^a-z0-9]", "", model.lower())


def count_on(node: Node, model: str) -> int:
    """How many GPUs of `model` (any spelling SkyPilot accepts) `node` has."""
    return sum(n for m, n in node.gpus.items() if _norm(m) == _norm(model))


def fits(config: HostConfig, model: str, count: float, num_nodes: int, pin: str | None) -> bool:
    """`num_nodes` pods of `count` x `model` each can be placed on the cluster's nodes."""
    pinned = config.node(pin) if pin else None
    if pinned is not None:
        return count * num_nodes <= count_on(pinned, model)
    return sum(1 for n in config.nodes if count_on(n, model) >= count) >= num_nodes


def most_per_node(config: HostConfig, model: str) -> int:
    return max((count_on(n, model) for n in config.nodes), default=0)


def per_node_violation(
    config: HostConfig, options: Sequence[tuple[str, float]], num_nodes: int, pin: str | None
) -> Violation | None:
    """None when some option fits the nodes; else the refusal naming each node's GPUs."""
    if not options or any(fits(config, m, c, num_nodes, pin) for m, c in options):
        return None
    wanted = " or ".join(f"{m}:{c:g}" for m, c in options)
    pinned = config.node(pin) if pin else None
    if num_nodes > 1:
        wanted += f" on each of {num_nodes} nodes"
    if pinned is not None:
        return Violation(
            "gpu_inventory",
            f"asks for {wanted}, all on node {pinned.name}, which has "
            f"{pinned.describe_gpus()}: it would wait in the queue forever",
            f"ask for at most what {pinned.name} has, or pin another node "
            f"({config.describe_nodes()})",
        )
    model, count = options[0]
    best = most_per_node(config, model)
    enough = [n.name for n in config.nodes if count_on(n, model) >= count]
    if enough:  # few enough GPUs per node, too many nodes
        fix = (
            f"ask for at most `nodes: {len(enough)}` of {model}:{count:g} ({', '.join(enough)} "
            f"{'has' if len(enough) == 1 else 'have'} that many), or fewer GPUs per node"
        )
    elif best:
        holders = [n.name for n in config.nodes if count_on(n, model) == best]
        fix = (
            f"ask for at most {model}:{best} per node ({', '.join(holders)}), and spread a "
            "bigger job over nodes with `nodes: N` (num_nodes): a job gets at most what one "
            "node has, times its node count"
        )
    else:
        fix = f"ask for a model one of the nodes has, e.g. `--gpus {_first_model(config)}:1`"
    return Violation(
        "gpu_inventory",
        f"asks for {wanted}, but each of a job's pods runs on one node, and the nodes have "
        f"{config.describe_nodes()}: it would wait in the queue forever",
        fix,
    )


def _first_model(config: HostConfig) -> str:
    return next(iter(config.gpus), "A6000")
