"""`telemetry:`: the Prometheus `queue` and `reap` read every node's GPUs from answers, scrapes
each node's dcgm-exporter and node_exporter (fresh, within `stale_after`), and dcgm-exporter
copies SkyPilot's pod labels onto the GPU series (how a GPU is told to be a job's).

Without `telemetry:` each check is skipped, saying so: the box reads NVML, nothing to judge.
The targets expected are the ones `setup render` writes (`setup.telemetry.scrape_targets`).
"""

from __future__ import annotations

import re
from collections import defaultdict

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.doctor.checks.base import (
    FAIL,
    INSTALL,
    OK,
    RENDER,
    SKIP,
    WARN,
    Check,
    _Component,
    _config_file,
    _plural,
)
from deskgpu.doctor.facts import HostFacts, ScrapeTargetFact, TelemetryFacts

_telemetry = _Component("telemetry")
NAMES = ("prometheus", "targets", "pod_labels")
NO_TELEMETRY = "no `telemetry:` in the host config: queue and reap read this host's NVML"
# SkyPilot 0.14 names a cluster's pods `<name on cloud>-head` and `-worker<i>`
# (sky/provision/kubernetes/instance.py): a pod so named that lacks the copied labels is a
# SkyPilot pod dcgm-exporter did not label; others (doctor's own GPU pod) tell nothing.
SKYPILOT_POD = re.compile(r"-(head|worker[0-9]+)$")


def check_telemetry(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    del s
    if config.telemetry is None:
        return [_telemetry(name, SKIP, NO_TELEMETRY) for name in NAMES]
    fact = facts.telemetry
    if fact is None:
        why = "Prometheus was not probed (facts recorded without `telemetry:`; a rerun probes it)"
        return [_telemetry(name, SKIP, why) for name in NAMES]
    return [
        _check_prometheus(fact, config),
        _check_targets(fact, facts, config),
        _check_pod_labels(fact, config),
    ]


def _server_fix(config: HostConfig) -> str:
    server = config.server_node
    where = f" on {server.name}" if server else ""
    return (
        f"`sudo systemctl status prometheus`{where} (`sudo journalctl -u prometheus -n 50`); "
        f"telemetry.prometheus in {_config_file(config)} is its URL"
    )


def _render_fix(config: HostConfig) -> str:
    server = config.server_node
    render = RENDER.replace(" --out", f" --node {server.name} --out") if server else RENDER
    return f"`{render} && {INSTALL}` on the server node"


def _check_prometheus(fact: TelemetryFacts, config: HostConfig) -> Check:
    ready = fact.ready
    if ready is None or ready.error is not None:
        why = ready.error if ready is not None else "not asked"
        return _telemetry(
            "prometheus",
            FAIL,
            f"Prometheus at {fact.url} does not answer /-/ready: {why}",
            _server_fix(config),
        )
    if fact.query_error is not None:
        return _telemetry(
            "prometheus",
            FAIL,
            f"Prometheus at {fact.url} is ready but its query API failed: {fact.query_error}",
            _server_fix(config),
        )
    return _telemetry("prometheus", OK, f"Prometheus at {fact.url} is ready and answers queries")


def _age(now: float, target: ScrapeTargetFact) -> float | None:
    return None if target.last_scrape is None else max(0.0, now - target.last_scrape)


def _check_targets(fact: TelemetryFacts, facts: HostFacts, config: HostConfig) -> Check:
    from deskgpu.config.telemetry import DCGM_JOB, NODE_EXPORTER_JOB, NODE_LABEL
    from deskgpu.setup.telemetry import DCGM_VALUES, DOC, NODE_EXPORTER_PACKAGE, scrape_targets
    from deskgpu.units import format_duration

    tele = config.telemetry
    assert tele is not None
    if fact.targets is None:
        return _telemetry(
            "targets",
            FAIL,
            f"Prometheus at {fact.url} did not list its targets: {fact.targets_error}",
            _server_fix(config),
        )
    now = fact.server_time if fact.server_time is not None else facts.gathered_at
    jobs = (DCGM_JOB, NODE_EXPORTER_JOB)
    seen: dict[tuple[str, str], list[ScrapeTargetFact]] = defaultdict(list)
    for t in fact.targets:
        if t.job in jobs:
            seen[(t.job, t.labels.get(NODE_LABEL, ""))].append(t)
    expected = scrape_targets(config)
    problems: list[tuple[str, str]] = []  # (detail, fix)
    oldest = 0.0
    for want in expected:
        found = seen.get((want.job, want.node), [])
        if not found:
            problems.append(
                (
                    f"{want.node}: no {want.job} target (Prometheus does not run the rendered "
                    "config)",
                    _render_fix(config),
                )
            )
            continue
        for t in found:
            where = f"{want.node} {want.job} ({t.labels.get('instance', want.address)})"
            age = _age(now, t)
            if t.health != "up":
                error = t.last_error or "no error given"
                if want.job == DCGM_JOB:
                    fix = (
                        f"on {want.node}: is dcgm-exporter running there (`sudo k3s kubectl get "
                        "pods -A -o wide | grep dcgm-exporter`), installed with "
                        f"{DCGM_VALUES} ({DOC}), its port {want.port} open to the server?"
                    )
                else:
                    fix = (
                        f"on {want.node}: `sudo systemctl status {NODE_EXPORTER_PACKAGE}` "
                        f"(`sudo apt-get install {NODE_EXPORTER_PACKAGE}`), its port "
                        f"{want.port} open to the server"
                    )
                problems.append((f"{where} is {t.health}: {error}", fix))
            elif age is None:
                problems.append((f"{where} was never scraped", _server_fix(config)))
            elif age > tele.stale_after_s:
                problems.append(
                    (
                        f"{where} last scraped {format_duration(age)} ago (stale_after "
                        f"{tele.stale_after})",
                        _server_fix(config),
                    )
                )
            else:
                oldest = max(oldest, age)
    wanted = {(w.job, w.node) for w in expected}
    extra = [
        f"{job} {t.labels.get('instance', '?')} "
        + (f"(node {node})" if node else f"(no `{NODE_LABEL}` label)")
        for (job, node), found in sorted(seen.items())
        if (job, node) not in wanted
        for t in found
    ]
    nodes = list(dict.fromkeys(w.node for w in expected))
    if problems:
        detail = "; ".join(d for d, _ in problems)
        if extra:
            detail += f"; also not in the host config: {', '.join(extra)}"
        return _telemetry("targets", FAIL, detail, problems[0][1])
    ok = (
        f"{_plural(len(nodes), 'node')} ({', '.join(nodes)}): {len(expected)} targets up, the "
        f"oldest scraped {format_duration(oldest)} ago (stale_after {tele.stale_after})"
    )
    if extra:
        return _telemetry(
            "targets",
            WARN,
            f"{ok}; not in the host config: {', '.join(extra)} (its GPUs count on no node)",
            f"add the node to `nodes:`, or drop the target: {_render_fix(config)}",
        )
    return _telemetry("targets", OK, ok)


def _check_pod_labels(fact: TelemetryFacts, config: HostConfig) -> Check:
    from deskgpu.config.telemetry import NODE_LABEL
    from deskgpu.setup.telemetry import DCGM_VALUES, DOC, GPU_OPERATOR_VALUES
    from deskgpu.telemetry.gpus import POD_CLUSTER_LABELS, POD_USER_LABEL

    if fact.pod_series is None:
        return _telemetry(
            "pod_labels",
            FAIL,
            f"Prometheus at {fact.url} did not answer the GPU series query: "
            f"{fact.pod_series_error}",
            _server_fix(config),
        )
    pods: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for labels in fact.pod_series:
        key = (labels.get(NODE_LABEL, ""), labels.get("namespace", ""), labels.get("pod", ""))
        pods[key].append(labels)
    if not pods:
        return _telemetry(
            "pod_labels",
            SKIP,
            "no GPU is allocated to a pod right now: cannot tell whether dcgm-exporter copies "
            "SkyPilot's pod labels until a job runs",
        )

    def name(key: tuple[str, str, str]) -> str:
        node, namespace, pod = key
        return f"{namespace or '?'}/{pod}" + (f" on {node}" if node else "")

    def has(key: tuple[str, str, str], wanted: tuple[str, ...]) -> bool:
        return all(any(s.get(k) for k in wanted) for s in pods[key])

    labelled = [k for k in pods if has(k, POD_CLUSTER_LABELS)]
    skypilot = [k for k in pods if k in labelled or SKYPILOT_POD.search(k[2])]
    if not skypilot:
        return _telemetry(
            "pod_labels",
            SKIP,
            f"only pods that are not SkyPilot's hold GPUs ({', '.join(map(name, pods))}): "
            "cannot tell until a job runs",
        )
    copied = " or ".join(f"`{k}`" for k in POD_CLUSTER_LABELS)
    apply = (
        f"install dcgm-exporter with {DCGM_VALUES} (pod labels on, SkyPilot's allowed; its "
        f"first lines give the helm command), or the GPU Operator with {GPU_OPERATOR_VALUES} "
        f"({DOC})"
    )
    bare = [k for k in skypilot if k not in labelled]
    if bare:
        return _telemetry(
            "pod_labels",
            FAIL,
            f"dcgm-exporter's GPU series of {_plural(len(bare), 'SkyPilot pod')} carry no "
            f"{copied}: {', '.join(map(name, bare))} (queue and reap cannot tell whose job "
            "holds those GPUs)",
            apply,
        )
    no_user = [k for k in skypilot if not has(k, (POD_USER_LABEL,))]
    held = f"{_plural(len(skypilot), 'SkyPilot pod')} ({', '.join(map(name, skypilot))})"
    if no_user:
        return _telemetry(
            "pod_labels",
            WARN,
            f"{held} carry their cluster's name, but {', '.join(map(name, no_user))} no "
            f"`{POD_USER_LABEL}`",
            apply,
        )
    return _telemetry("pod_labels", OK, f"{held}: their GPU series carry the cluster and the user")
