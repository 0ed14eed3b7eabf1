"""The files `telemetry:` adds to the server node's render: Prometheus and dcgm-exporter.

With `telemetry: {prometheus: URL}` in the host config, `queue` and `reap` read every node's
GPUs from that Prometheus (docs/telemetry.md). The server node's `setup render` then writes:

- `/etc/prometheus/prometheus.yml` for Debian's `prometheus` package: two scrape jobs,
  `dcgm-exporter` (port 9400, every node with GPUs) and `node-exporter` (port 9100, every node:
  its textfile collector serves `deskgpu observe --textfile`), one static target per node at
  its `address` (127.0.0.1 when it has none), labelled `node: <its k3s node name>`: the label
  deskgpu tells nodes apart by. A single box (no `nodes:`) is one node named `box_name`.
- `/etc/default/prometheus`: the package unit's `ARGS`, keeping samples for reap's window
  (`reap.retention` plus a margin, in days) and listening where `telemetry.prometheus` says.
- The values that make dcgm-exporter copy SkyPilot's pod labels onto every GPU series (its own
  Helm chart's, and the GPU Operator's `dcgmExporter` form).

Pure text from the host config. `render.py` puts the files into the server's list and its
install.sh; doctor's telemetry checks expect the same targets (`scrape_targets`).
"""

from __future__ import annotations

import ipaddress
import json
import math
import shlex
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import yaml

from deskgpu.config import HostConfig
from deskgpu.config.telemetry import (
    DCGM_EXPORTER_PORT,
    DCGM_JOB,
    DEFAULT_TEXTFILE_DIR,
    NODE_EXPORTER_JOB,
    NODE_EXPORTER_PORT,
    NODE_LABEL,
    Telemetry,
)

DOC = "docs/telemetry.md"
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"  # Debian's --config.file default
PROMETHEUS_DEFAULTS = "/etc/default/prometheus"  # the unit's EnvironmentFile: ARGS="..."
PROMETHEUS_UNIT = "prometheus.service"  # Debian's package `prometheus`
PROMETHEUS_PACKAGE = "prometheus"
NODE_EXPORTER_UNIT = "prometheus-node-exporter.service"  # Debian's `prometheus-node-exporter`
NODE_EXPORTER_PACKAGE = "prometheus-node-exporter"
DCGM_VALUES = "/etc/deskgpu/dcgm-exporter-values.yaml"
GPU_OPERATOR_VALUES = "/etc/deskgpu/gpu-operator-values.yaml"
# dcgm-exporter's chart has the `kubernetes:` keys from 4.6.0 (NVIDIA/dcgm-exporter tag
# 4.4.1-4.6.0); checked against 4.8.2 (tag 4.5.3-4.8.2, deployment/values.yaml).
DCGM_CHART_VERSION = "4.8.2"
DCGM_CHART_REPO = "https://nvidia.github.io/dcgm-exporter/helm-charts"
# The GPU Operator's ClusterPolicy has dcgmExporter.hostNetwork from v26.3.0 and
# enablePodLabels / podLabelAllowlistRegex from v26.7.0 (NVIDIA/gpu-operator PR #2406).
GPU_OPERATOR_VERSION = "v26.7.0"
GPU_OPERATOR_REPO = "https://helm.ngc.nvidia.com/nvidia"
LOCAL_HOST = "127.0.0.1"  # a node without `address:` (the server of a one-node cluster, a box)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Prometheus keeps reap's window and this many days more (a reap that ran late, a clock that
# jumped): it deletes a block only once all of it is older than the retention.
RETENTION_MARGIN_DAYS = 2
MAX_SCRAPE_TIMEOUT_S = 10  # Prometheus' default; never above the interval (promtool refuses)


@dataclass(frozen=True)
class ScrapeTarget:
    """One target of the rendered config: which job scrapes which node where."""

    job: str
    node: str  # the `node` label: the k3s node name (a single box: `box_name`)
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Problem:
    """Why `telemetry:` cannot be rendered: the key, what is wrong, and the fix."""

    path: tuple[str, ...]
    what: str
    fix: str


def scrape_targets(config: HostConfig) -> list[ScrapeTarget]:
    """Every target, job by job, node by node in `nodes:` order: dcgm-exporter on each node
    with GPUs (a single box: always), node_exporter on each node."""
    if not config.nodes:
        hosts = [(config.box_name, LOCAL_HOST, True)]
    else:
        hosts = [(n.name, n.address or LOCAL_HOST, bool(n.gpus)) for n in config.nodes]
    dcgm = [
        ScrapeTarget(DCGM_JOB, name, host, DCGM_EXPORTER_PORT) for name, host, gpus in hosts if gpus
    ]
    node = [
        ScrapeTarget(NODE_EXPORTER_JOB, name, host, NODE_EXPORTER_PORT) for name, host, _ in hosts
    ]
    return dcgm + node


def textfile_dir(config: HostConfig) -> str | None:
    """Where the observe timers write `deskgpu.prom`: `metrics_textfile_dir`, else with
    `telemetry:` Debian's node_exporter textfile directory; None: no textfile."""
    if config.metrics_textfile_dir:
        return config.metrics_textfile_dir
    return DEFAULT_TEXTFILE_DIR if config.telemetry is not None else None


def retention_days(config: HostConfig) -> int:
    """Prometheus' retention: reap's window (`reap.retention`) in whole days, plus a margin."""
    return math.ceil(config.reap_settings.retention_s / 86400) + RETENTION_MARGIN_DAYS


def _seconds(value: float) -> str:
    return f"{max(1, math.ceil(value))}s"


def listen_address(config: HostConfig) -> tuple[str | None, list[Problem]]:
    """Prometheus' `--web.listen-address` from `telemetry.prometheus`, or why it cannot be.

    Loopback listens on loopback. On a cluster, the server node's address (or name) listens on
    that address (a name: every interface), so the other nodes' `deskgpu queue` reach it too.
    Any other host is not the Prometheus this render writes: refused."""
    tele = _telemetry(config)
    url = urlparse(tele.prometheus)
    path = ("telemetry", "prometheus")
    host = (url.hostname or "").lower()
    try:
        port = url.port
    except ValueError:
        port = None
    server = config.server_node
    mine = [*LOOPBACK, *((server.address or "", server.name.lower()) if server else ())]
    mine = [h for h in mine if h]
    good = host if host in mine else (server.address if server and server.address else None)
    example = f"http://{good or LOCAL_HOST}:9090"
    problems = []
    if url.scheme != "http":
        problems.append(
            Problem(
                path,
                f"{tele.prometheus}: setup render writes a plain-HTTP Prometheus (no TLS config)",
                f"use http://, e.g. {example}",
            )
        )
    if port is None or port < 1024:
        problems.append(
            Problem(
                path,
                f"{tele.prometheus} names no port of 1024 or above: Debian's prometheus.service "
                "runs as the prometheus account, which cannot listen on "
                f"{'port 80' if port is None else f'port {port}'}",
                f"name the port, e.g. {example}",
            )
        )
    if host not in mine:
        where = (
            f"the server node {server.name} ({server.address or 'no address'}) or loopback"
            if server
            else "loopback (a single box: every reader is on it)"
        )
        problems.append(
            Problem(
                path,
                f"{tele.prometheus}: {host or 'no host'} is not {where}, where setup render "
                "puts Prometheus",
                f"use {example}",
            )
        )
    if problems or port is None:
        return None, problems
    if host in ("127.0.0.1", "localhost"):
        return f"127.0.0.1:{port}", []
    if host == "::1":
        return f"[::1]:{port}", []
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f":{port}", []  # a name may resolve to loopback here (Debian's 127.0.1.1)
    return (f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"), []


def notes(config: HostConfig) -> list[str]:
    """What the admin should know about the rendered telemetry."""
    tele = _telemetry(config)
    out = []
    host = (urlparse(tele.prometheus).hostname or "").lower()
    if config.nodes and host in LOOPBACK:
        server = config.server_node
        address = server.address if server and server.address else "<server address>"
        out.append(
            f"telemetry.prometheus {tele.prometheus} is on loopback: only the server node's "
            f"deskgpu queue and reap can read it; name http://{address}:<port> for the other "
            "nodes' too"
        )
    gpuless = [n.name for n in config.nodes if not n.gpus]
    if gpuless:
        out.append(
            f"no dcgm-exporter target for {', '.join(gpuless)}: no GPUs in its `nodes:` entry"
        )
    return out


def _telemetry(config: HostConfig) -> Telemetry:
    tele = config.telemetry
    if tele is None:
        raise ValueError("the host config has no telemetry:")
    return tele


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def prometheus_config(config: HostConfig) -> dict[str, Any]:
    """prometheus.yml: the two jobs, one static target per node with its `node` label."""
    tele = _telemetry(config)
    interval = tele.scrape_interval_s
    targets = scrape_targets(config)

    def job(name: str) -> dict[str, Any]:
        return {
            "job_name": name,
            "static_configs": [
                {"targets": [t.address], "labels": {NODE_LABEL: t.node}}
                for t in targets
                if t.job == name
            ],
        }

    return {
        "global": {
            "scrape_interval": _seconds(interval),
            "scrape_timeout": _seconds(min(interval, MAX_SCRAPE_TIMEOUT_S)),
            "evaluation_interval": _seconds(interval),
        },
        "scrape_configs": [job(DCGM_JOB), job(NODE_EXPORTER_JOB)],
    }


def prometheus_yml(config: HostConfig, header: str) -> str:
    about = [
        f"Prometheus for deskgpu's telemetry ({DOC}): every node's dcgm-exporter",
        f"(:{DCGM_EXPORTER_PORT}) and node_exporter (:{NODE_EXPORTER_PORT}, whose textfile "
        "collector serves",
        f"`deskgpu observe --textfile`). Each target's `{NODE_LABEL}` label is its k3s node name "
        "from",
        "`nodes:`: deskgpu tells the nodes apart by it. install.sh checks the file with",
        "`promtool check config`.",
    ]
    return header + "".join(f"# {line}\n" for line in about) + _yaml(prometheus_config(config))


def prometheus_args(config: HostConfig, listen: str) -> list[str]:
    return [
        f"--storage.tsdb.retention.time={retention_days(config)}d",
        f"--web.listen-address={listen}",
    ]


def prometheus_defaults(config: HostConfig, header: str, listen: str) -> str:
    """/etc/default/prometheus: Debian's unit runs `/usr/bin/prometheus $ARGS`."""
    days = config.reap_settings.retention_s / 86400
    lines = [
        header.rstrip("\n"),
        f"# Debian's {PROMETHEUS_UNIT} reads this file (EnvironmentFile) and runs",
        "# `/usr/bin/prometheus $ARGS`; the config file and storage path are the package's own",
        f"# ({PROMETHEUS_CONFIG}, /var/lib/prometheus/metrics2/).",
        f"# Retention: reap reads back reap.retention ({days:g} days) from Prometheus, kept with a",
        f"# margin of {RETENTION_MARGIN_DAYS} days. Listens where telemetry.prometheus says.",
        f'ARGS="{" ".join(prometheus_args(config, listen))}"',
    ]
    return "\n".join(lines) + "\n"


def _allowlist() -> str:
    from deskgpu.telemetry.gpus import POD_LABEL_ALLOWLIST  # the reader's own: one source

    return POD_LABEL_ALLOWLIST


def _gpu_node_selector(config: HostConfig) -> dict[str, str]:
    """On a cluster, dcgm-exporter runs only where install.sh put the GPU label."""
    from deskgpu.setup.nodes import GPU_PRESENT_LABEL

    return {GPU_PRESENT_LABEL: "true"} if config.nodes else {}


def dcgm_values(config: HostConfig) -> dict[str, Any]:
    """dcgm-exporter's own Helm chart (4.6.0 or later)."""
    doc: dict[str, Any] = {
        "hostNetwork": True,
        "runtimeClassName": "nvidia",
        "kubernetes": {
            "enablePodLabels": True,
            "podLabelAllowlistRegex": [_allowlist()],
            "rbac": {"create": True},
        },
        "serviceMonitor": {"enabled": False},
    }
    selector = _gpu_node_selector(config)
    if selector:
        doc["nodeSelector"] = selector
    return doc


def gpu_operator_values(config: HostConfig) -> dict[str, Any]:
    """The GPU Operator's chart (v26.7.0 or later): ClusterPolicy `spec.dcgmExporter`."""
    del config
    return {
        "driver": {"enabled": False},
        "toolkit": {"enabled": False},
        "devicePlugin": {"enabled": False},
        "dcgmExporter": {
            "enabled": True,
            "hostNetwork": True,
            "enablePodLabels": True,
            "podLabelAllowlistRegex": [_allowlist()],
            "serviceMonitor": {"enabled": False},
        },
    }


def _helm(*args: str) -> str:
    return "sudo helm --kubeconfig /etc/rancher/k3s/k3s.yaml " + " ".join(args)


def dcgm_values_yaml(config: HostConfig, header: str) -> str:
    about = [
        f"dcgm-exporter's Helm chart, {DCGM_CHART_VERSION} (the `kubernetes:` keys need 4.6.0 or "
        "later). From the server node:",
        f"  {_helm('repo add gpu-helm-charts', DCGM_CHART_REPO)}",
        f"  {_helm('upgrade --install dcgm-exporter gpu-helm-charts/dcgm-exporter')} \\",
        f"    --version {DCGM_CHART_VERSION} --namespace dcgm-exporter --create-namespace "
        f"-f {DCGM_VALUES}",
        "hostNetwork: each node's exporter answers on the node's own address, where",
        f"{PROMETHEUS_CONFIG} scrapes it (:{DCGM_EXPORTER_PORT}).",
        "kubernetes.enablePodLabels + podLabelAllowlistRegex: the GPU series of a pod carry",
        "SkyPilot's pod labels (skypilot-cluster-name -> skypilot_cluster_name): how deskgpu",
        "knows whose job holds a GPU. rbac.create: the exporter may read pods.",
        "runtimeClassName nvidia: the exporter sees the GPUs (as the device plugin does).",
        "No ServiceMonitor: Prometheus scrapes statically, not through the Prometheus Operator.",
        f"Or the GPU Operator instead: {GPU_OPERATOR_VALUES} ({DOC}).",
    ]
    return header + "".join(f"# {line}\n" for line in about) + _yaml(dcgm_values(config))


def gpu_operator_values_yaml(config: HostConfig, header: str) -> str:
    values = gpu_operator_values(config)
    spec = {k: v for k, v in values["dcgmExporter"].items() if k != "enabled"}
    about = [
        f"The GPU Operator's Helm chart instead of {DCGM_VALUES}: {GPU_OPERATOR_VERSION} or "
        "later (its",
        "ClusterPolicy's dcgmExporter.enablePodLabels and podLabelAllowlistRegex). The driver,",
        "the container toolkit and the device plugin are the box's own (docs/setup.md, steps 1,",
        "2 and 6); the operator adds dcgm-exporter only. From the server node:",
        f"  {_helm('repo add nvidia', GPU_OPERATOR_REPO)}",
        f"  {_helm('upgrade --install gpu-operator nvidia/gpu-operator')} \\",
        f"    --version {GPU_OPERATOR_VERSION} --namespace gpu-operator --create-namespace "
        f"-f {GPU_OPERATOR_VALUES}",
        "On an operator already installed, the same keys go into its ClusterPolicy:",
        "  sudo k3s kubectl patch clusterpolicy cluster-policy --type merge -p "
        + shlex.quote(json.dumps({"spec": {"dcgmExporter": spec}}, separators=(",", ":"))),
    ]
    return header + "".join(f"# {line}\n" for line in about) + _yaml(values)
