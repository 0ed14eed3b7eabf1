"""Doctor's checks: pure functions of recorded `HostFacts` and the host config.

Each check returns `Check`s with an id (`component.name`), a status (ok/warn/fail/skip),
one line of detail and an exact fix (a command or a doc link). No I/O here: the same
checks judge live facts and facts recorded on another box.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from deskgpu.config import HostConfig
from deskgpu.doctor.facts import (
    CommandResult,
    FileFact,
    GpuReading,
    HostFacts,
    PathFact,
    ServerProcess,
)
from deskgpu.skyapi import DEFAULT_ENDPOINT

OK = "ok"
WARN = "warn"
FAIL = "fail"
SKIP = "skip"
STATUSES = (OK, WARN, FAIL, SKIP)

# Display order and titles.
COMPONENTS = {
    "driver": "NVIDIA driver",
    "docker": "Docker + NVIDIA Container Toolkit",
    "kubernetes": "k3s / Kubernetes",
    "skypilot": "SkyPilot",
    "golden_rule": "Golden rule",
    "storage": "Storage",
    "operations": "Operations",
}

SYSTEM_CONFIG_FILE = "/etc/deskgpu/config.yaml"
DOC_DRIVER = "https://docs.nvidia.com/datacenter/tesla/driver-installation-guide/"
DOC_TOOLKIT = (
    "https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html"
)
DOC_K8S_GPU = "https://docs.skypilot.co/en/latest/reference/kubernetes/kubernetes-setup.html"
DOC_API_SERVER = (
    "https://docs.skypilot.co/en/latest/reference/api-server/api-server-admin-deploy.html"
)
DOC_KUEUE = "https://kueue.sigs.k8s.io/docs/installation/"
DOC_ECC = "https://docs.nvidia.com/deploy/a100-gpu-mem-error-mgmt/index.html"

# NVML clocks event (throttle) reason bits, as in nvml.h.
HW_SLOWDOWN = 0x08
SW_THERMAL = 0x20
HW_THERMAL = 0x40
THERMAL_BITS = SW_THERMAL | HW_THERMAL

NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "glusterfs", "ceph", "lustre", "9p", "afs")
NETWORK_FUSE = ("sshfs", "s3fs", "gcsfuse", "rclone", "juicefs", "goofys", "glusterfs")

# Distributions that must never be in a host Python (they belong in images / uv envs).
_DRIFT_DIST = re.compile(
    r"^(torch|torchvision|torchaudio|tensorflow([-_].*)?|tf-nightly.*|keras|jax|jaxlib|"
    r"jax-cuda.*|cupy(-.*)?|nvidia-(?!ml-py).*|triton|xformers|flash-attn|onnxruntime-gpu|"
    r"paddlepaddle(-gpu)?|mxnet.*|tensorrt.*|pycuda|deepspeed|vllm)$"
)

DEFAULT_SCHEDULES = {
    "reap": r"\bdeskgpu\b.*\breap\b.*--yes",
    "observe": r"\bdeskgpu\b.*\b(observe|reap\b.*--observe|queue\b.*--record)",
}


@dataclass(frozen=True)
class Check:
    """One verdict. `fix` is the exact command or doc link that makes it ok."""

    id: str
    component: str
    status: str
    detail: str
    fix: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "component": self.component,
            "status": self.status,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class Settings:
    """The host config's `doctor:` section with its defaults (see the README)."""

    min_free_pct: float = 5.0
    warn_free_pct: float = 15.0
    max_temperature_c: int = 85
    require_ecc: bool = False
    require_admin_policy: bool = False
    research_group: str | None = None
    api_server_user: str | None = None
    skypilot_server_config: str | None = None
    schedules: tuple[tuple[str, str], ...] = tuple(DEFAULT_SCHEDULES.items())
    skip: tuple[str, ...] = ()
    probe_timeout_s: float = 4.0

    @classmethod
    def from_config(cls, config: HostConfig) -> Settings:
        d = config.doctor or {}
        schedules = dict(DEFAULT_SCHEDULES)
        schedules.update(d.get("schedules") or {})
        return cls(
            min_free_pct=float(d.get("min_free_pct", cls.min_free_pct)),
            warn_free_pct=float(d.get("warn_free_pct", cls.warn_free_pct)),
            max_temperature_c=int(d.get("max_temperature_c", cls.max_temperature_c)),
            require_ecc=bool(d.get("require_ecc", False)),
            require_admin_policy=bool(d.get("require_admin_policy", False)),
            research_group=d.get("research_group"),
            api_server_user=d.get("api_server_user"),
            skypilot_server_config=d.get("skypilot_server_config"),
            schedules=tuple(schedules.items()),
            skip=tuple(d.get("skip") or ()),
            probe_timeout_s=float(d.get("probe_timeout_s", cls.probe_timeout_s)),
        )


class _Component:
    """Makes the checks of one component: `_driver("ecc", WARN, detail, fix)`."""

    def __init__(self, component: str) -> None:
        self.component = component

    def __call__(self, name: str, status: str, detail: str, fix: str | None = None) -> Check:
        fix = fix if status in (WARN, FAIL) else None
        return Check(f"{self.component}.{name}", self.component, status, detail, fix)


def _config_file(config: HostConfig) -> str:
    return config.source if config.source.startswith("/") else SYSTEM_CONFIG_FILE


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------------------------------
# NVIDIA driver

_driver = _Component("driver")


def check_driver(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    nvml = facts.nvml
    if not nvml.available:
        out = [
            _driver(
                "nvml",
                FAIL,
                f"NVML does not load: {nvml.error or 'unknown error'}",
                f"install the NVIDIA driver and reboot: `sudo ubuntu-drivers install --gpgpu` "
                f"(Ubuntu) or {DOC_DRIVER}",
            )
        ]
        for name in ("gpus", "persistence", "ecc", "thermal"):
            out.append(_driver(name, SKIP, "no NVML: nothing to read"))
        return out
    versions = f"driver {nvml.driver_version or '?'}"
    if nvml.cuda_driver_version:
        versions += f", supports CUDA {nvml.cuda_driver_version}"
    out = [_driver("nvml", OK, versions)]
    out.append(_check_inventory(facts, config))
    usable = [g for g in nvml.gpus if not g.error]
    out.append(_check_persistence(usable))
    out.append(_check_ecc(usable, s))
    out.append(_check_thermal(usable, s))
    return out


def gpu_matches(model: str, name: str) -> bool:
    """Does inventory key `A6000` / `A100-80GB` describe NVML's `NVIDIA RTX A6000`?"""
    tokens = {t for t in re.split(r"[\s_\-]+", name.upper()) if t}
    want = [t for t in re.split(r"[\s_\-]+", model.upper()) if t]
    if want and all(t in tokens for t in want):
        return True
    squash = re.sub(r"[^A-Z0-9]", "", model.upper())
    return bool(squash) and squash in re.sub(r"[^A-Z0-9]", "", name.upper())


def _describe(gpus: list[GpuReading]) -> str:
    names: dict[str, int] = {}
    for g in gpus:
        key = g.name or "unknown GPU"
        names[key] = names.get(key, 0) + 1
    return ", ".join(f"{n}x {name}" for name, n in names.items()) or "no GPUs"


def _check_inventory(facts: HostFacts, config: HostConfig) -> Check:
    gpus = facts.nvml.gpus
    lost = [g for g in gpus if g.error]
    if lost:
        first = lost[0]
        return _driver(
            "gpus",
            FAIL,
            f"GPU {', '.join(str(g.index) for g in lost)}: {first.error}",
            "check `sudo dmesg | grep -i xid` and reboot; reseat or RMA a GPU that stays lost",
        )
    seen = _describe(gpus)
    if not config.gpus:
        example = _inventory_example(gpus)
        return _driver(
            "gpus",
            WARN,
            f"found {seen}; the host config has no GPU inventory to compare with",
            f"add `gpus: {example}` to {_config_file(config)}",
        )
    problems = []
    for model, count in config.gpus.items():
        have = sum(1 for g in gpus if g.name and gpu_matches(model, g.name))
        if have != count:
            problems.append(f"{have}x {model} (config says {count})")
    unmatched = [g for g in gpus if not any(gpu_matches(m, g.name or "") for m in config.gpus)]
    if unmatched:
        problems.append(f"{_describe(unmatched)} not in the inventory")
    if problems:
        return _driver(
            "gpus",
            FAIL,
            f"found {seen}: " + "; ".join(problems),
            "a GPU missing from `nvidia-smi -L` needs a reseat/reboot "
            "(`sudo dmesg | grep -i xid`); "
            f"if the box changed, fix `gpus:` in {_config_file(config)}",
        )
    return _driver("gpus", OK, f"{seen} (matches the inventory: {config.describe_gpus()})")


def _inventory_example(gpus: list[GpuReading]) -> str:
    counts: dict[str, int] = {}
    for g in gpus:
        words = (g.name or "GPU").replace("NVIDIA", "").split()
        key = next((w for w in words if any(c.isdigit() for c in w)), words[-1] if words else "GPU")
        counts[key] = counts.get(key, 0) + 1
    return "{" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "}"


def _check_persistence(gpus: list[GpuReading]) -> Check:
    known = [g for g in gpus if g.persistence_mode is not None]
    if not known:
        return _driver("persistence", SKIP, "persistence mode not reported")
    off = [g for g in known if not g.persistence_mode]
    if off:
        return _driver(
            "persistence",
            WARN,
            f"persistence mode off on GPU {', '.join(str(g.index) for g in off)}: every NVML "
            "client and job start re-initialises the GPUs",
            "`sudo systemctl enable --now nvidia-persistenced` (or `sudo nvidia-smi -pm 1`)",
        )
    return _driver("persistence", OK, f"on for all {len(known)} GPUs")


def _check_ecc(gpus: list[GpuReading], s: Settings) -> Check:
    fails: list[str] = []
    warns: list[str] = []
    off: list[int] = []
    notes: list[str] = []
    for g in gpus:
        tag = f"GPU {g.index}"
        if g.remapped_rows_failure:
            fails.append(f"{tag}: row remapping failed")
        if g.ecc_errors_uncorrected_volatile:
            fails.append(f"{tag}: {g.ecc_errors_uncorrected_volatile} uncorrectable ECC errors")
        if g.remapped_rows_pending or g.retired_pages_pending:
            warns.append(f"{tag}: page retirement/row remap pending a GPU reset")
        if g.retired_pages_dbe:
            warns.append(f"{tag}: {g.retired_pages_dbe} pages retired for double-bit errors")
        if g.remapped_rows_uncorrectable:
            notes.append(f"{tag}: {g.remapped_rows_uncorrectable} rows remapped")
        if g.ecc_mode_current is False:
            off.append(g.index)
    if fails:
        return _driver(
            "ecc",
            FAIL,
            "; ".join(fails + warns),
            f"drain the GPU and reset it (`sudo nvidia-smi -r -i <index>`); if it recurs, RMA "
            f"it ({DOC_ECC})",
        )
    if warns:
        return _driver(
            "ecc",
            WARN,
            "; ".join(warns),
            "when the GPU is idle: `sudo nvidia-smi -r -i <index>` (or reboot the box)",
        )
    if off and s.require_ecc:
        return _driver(
            "ecc",
            WARN,
            f"ECC off on GPU {', '.join(map(str, off))} (doctor.require_ecc is set)",
            "`sudo nvidia-smi -e 1` then reboot",
        )
    if all(g.ecc_mode_current is None for g in gpus):
        return _driver("ecc", OK, "no ECC support reported; no retired pages or remapped rows")
    detail = "no uncorrectable errors, nothing pending"
    if off:
        detail += f"; ECC off on GPU {', '.join(map(str, off))} (workstation default)"
    if notes:
        detail += "; " + "; ".join(notes)
    return _driver("ecc", OK, detail)


def _check_thermal(gpus: list[GpuReading], s: Settings) -> Check:
    sampled = [g for g in gpus if g.samples]
    if not sampled:
        return _driver("thermal", SKIP, "no temperature or throttle readings")
    fails: list[str] = []
    warns: list[str] = []
    for g in sampled:
        masks = [x.clocks_event_reasons for x in g.samples if x.clocks_event_reasons is not None]
        thermal = sum(1 for m in masks if m & THERMAL_BITS)
        hw = sum(1 for m in masks if m & HW_SLOWDOWN)
        temp = g.temperature_c
        where = f"GPU {g.index} at {temp}C" if temp is not None else f"GPU {g.index}"
        if masks and thermal == len(masks) and len(masks) >= 2:
            fails.append(f"{where}: thermal slowdown in {thermal}/{len(masks)} samples")
        elif thermal:
            warns.append(f"{where}: thermal slowdown in {thermal}/{len(masks)} samples")
        elif masks and hw == len(masks):
            warns.append(f"{where}: hardware slowdown (power brake or overheating) in every sample")
        elif temp is not None and temp >= s.max_temperature_c:
            warns.append(f"{where} (doctor.max_temperature_c is {s.max_temperature_c})")
    fix = (
        "improve airflow/cooling now (`nvidia-smi -q -d TEMPERATURE,PERFORMANCE`): check fans, "
        "filters, room temperature; a full box dissipates ~300 W per GPU"
    )
    if fails:
        return _driver("thermal", FAIL, "; ".join(fails + warns) + ": clocks are cut", fix)
    if warns:
        return _driver("thermal", WARN, "; ".join(warns), fix)
    temps = [g.temperature_c for g in sampled if g.temperature_c is not None]
    hottest = f"hottest {max(temps)}C" if temps else "no temperatures"
    return _driver("thermal", OK, f"no thermal slowdown; {hottest}")


# ---------------------------------------------------------------------------------------
# Docker + NVIDIA Container Toolkit

_docker = _Component("docker")


def _json(text: str | None) -> Any:
    try:
        return json.loads(text or "")
    except ValueError:
        return None


def _permission_denied(result: CommandResult) -> bool:
    return "permission denied" in (result.stderr + result.stdout).lower()


def check_docker(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    out: list[Check] = []
    version = facts.command("docker_version")
    info = facts.command("docker_info")
    if version is None or version.missing:
        out.append(
            _docker(
                "cli",
                FAIL,
                "`docker` is not installed",
                "install Docker Engine: https://docs.docker.com/engine/install/",
            )
        )
    elif version.ok:
        out.append(_docker("cli", OK, version.stdout.strip()))
    else:
        out.append(_docker("cli", FAIL, version.first_error_line(), "reinstall Docker Engine"))

    daemon_up = False
    runtimes: dict[str, Any] = {}
    info_doc = _json(info.stdout) if info else None
    if info is None or info.missing:
        out.append(_docker("daemon", SKIP, "no docker CLI to ask"))
    elif info.timed_out:
        out.append(
            _docker(
                "daemon",
                FAIL,
                f"`docker info` hung for {info.elapsed_s:.0f} s: the daemon is stuck",
                "`sudo systemctl restart docker` (logs: `journalctl -u docker -n 50`)",
            )
        )
    elif info.ok and isinstance(info_doc, dict):
        daemon_up = True
        runtimes = info_doc.get("Runtimes") or {}
        out.append(
            _docker(
                "daemon",
                OK,
                f"daemon {info_doc.get('ServerVersion') or '?'} reachable, default runtime "
                f"{info_doc.get('DefaultRuntime') or '?'}",
            )
        )
    elif _permission_denied(info):
        out.append(
            _docker(
                "daemon",
                SKIP,
                f"cannot see the daemon: {facts.user or 'this user'} may not use the docker "
                "socket (rerun as root: `sudo deskgpu doctor`)",
            )
        )
    else:
        out.append(
            _docker(
                "daemon",
                FAIL,
                info.first_error_line(),
                "`sudo systemctl enable --now docker` (logs: `journalctl -u docker -n 50`)",
            )
        )
    out.append(_check_nvidia_runtime(facts, daemon_up, runtimes, info_doc))
    ctk = facts.command("nvidia_ctk_version")
    if ctk is None or ctk.missing:
        out.append(
            _docker(
                "toolkit",
                FAIL,
                "`nvidia-ctk` not found: the NVIDIA Container Toolkit is not installed, so "
                "containers get no GPUs",
                f"install nvidia-container-toolkit: {DOC_TOOLKIT}",
            )
        )
    elif ctk.ok:
        match = re.search(r"version\s+(\S+)", ctk.stdout)
        out.append(
            _docker(
                "toolkit",
                OK,
                f"NVIDIA Container Toolkit {match.group(1) if match else ctk.stdout.strip()}",
            )
        )
    else:
        out.append(_docker("toolkit", FAIL, ctk.first_error_line(), f"reinstall it: {DOC_TOOLKIT}"))
    return out


def _cdi_specs(facts: HostFacts) -> list[str]:
    specs = []
    for key, fact in facts.files.items():
        if not key.startswith("cdi:") or fact.entries is not None:
            continue
        text = fact.text or ""
        if "nvidia.com/gpu" in text or "nvidia" in fact.path.rsplit("/", 1)[-1].lower():
            specs.append(fact.path)
    return sorted(specs)


def _check_nvidia_runtime(
    facts: HostFacts, daemon_up: bool, runtimes: dict[str, Any], info_doc: Any
) -> Check:
    daemon_json = facts.file("docker_daemon_json")
    configured = _json(daemon_json.text if daemon_json else None)
    in_json = isinstance(configured, dict) and "nvidia" in (configured.get("runtimes") or {})
    cdi = _cdi_specs(facts)
    fix = (
        "`sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker` "
        "(CDI: `sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`)"
    )
    cdi_note = f"; CDI spec {', '.join(cdi)}" if cdi else ""
    if daemon_up:
        if "nvidia" in runtimes:
            path = (runtimes.get("nvidia") or {}).get("path", "nvidia-container-runtime")
            return _docker("nvidia_runtime", OK, f"`nvidia` runtime registered ({path}){cdi_note}")
        if cdi:
            return _docker("nvidia_runtime", OK, f"CDI spec {', '.join(cdi)}")
        if in_json:
            return _docker(
                "nvidia_runtime",
                WARN,
                "daemon.json names the `nvidia` runtime but the running daemon does not have it",
                "`sudo systemctl restart docker`",
            )
        return _docker(
            "nvidia_runtime",
            FAIL,
            "no `nvidia` runtime and no NVIDIA CDI spec: `docker run --gpus all` gets no GPUs",
            fix,
        )
    if in_json or cdi:
        where = "`nvidia` runtime in /etc/docker/daemon.json" if in_json else ""
        where = ", ".join(x for x in (where, ", ".join(cdi)) if x)
        return _docker(
            "nvidia_runtime", OK, f"configured ({where}); daemon not reachable to confirm"
        )
    if daemon_json is not None and daemon_json.error:
        return _docker(
            "nvidia_runtime", SKIP, f"cannot read {daemon_json.path}: {daemon_json.error}"
        )
    return _docker(
        "nvidia_runtime",
        FAIL,
        "no `nvidia` runtime in /etc/docker/daemon.json and no NVIDIA CDI spec in /etc/cdi",
        fix,
    )


# ---------------------------------------------------------------------------------------
# k3s / Kubernetes

_k8s = _Component("kubernetes")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_LABELS = (
    "nvidia.com/gpu.product",
    "skypilot.co/accelerator",
    "cloud.google.com/gke-accelerator",
)


def check_kubernetes(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    context = facts.command("kube_context")
    names = ("nodes", "gpu_allocatable", "device_plugin", "gpu_labels")
    if context is None or context.missing:
        return [
            _k8s(
                "context",
                FAIL,
                "neither `kubectl` nor `k3s` found: no Kubernetes on this host",
                "install k3s: `curl -sfL https://get.k3s.io | sh -` then set up GPUs: "
                + DOC_K8S_GPU,
            ),
            *(_k8s(n, SKIP, "no Kubernetes context") for n in names),
        ]
    if not context.ok:
        text = (context.stderr + context.stdout).lower()
        if "permission denied" in text:
            first = _k8s(
                "context",
                SKIP,
                f"cannot read the kubeconfig as {facts.user or 'this user'}: "
                f"{context.first_error_line()} (rerun as root: `sudo deskgpu doctor`)",
            )
        else:
            first = _k8s(
                "context",
                FAIL,
                f"no usable kube context: {context.first_error_line()}",
                "start k3s (`sudo systemctl enable --now k3s`) and point kubectl at it: "
                "`export KUBECONFIG=/etc/rancher/k3s/k3s.yaml`",
            )
        return [first, *(_k8s(n, SKIP, "no Kubernetes context") for n in names)]
    current = context.stdout.strip()
    out = [_check_context_name(current, config)]
    nodes_cmd = facts.command("kube_nodes")
    nodes_doc = _json(nodes_cmd.stdout) if nodes_cmd and nodes_cmd.ok else None
    if nodes_cmd is None:
        return [*out, *(_k8s(n, SKIP, "nodes were not listed") for n in names)]
    if not isinstance(nodes_doc, dict):
        why = nodes_cmd.first_error_line()
        hung = nodes_cmd.timed_out
        out.append(
            _k8s(
                "nodes",
                FAIL,
                f"the kube API did not answer: {why}" if hung else f"cannot list nodes: {why}",
                "`sudo systemctl status k3s` / `sudo journalctl -u k3s -n 50`",
            )
        )
        return [*out, *(_k8s(n, SKIP, "nodes were not listed") for n in names[1:])]
    nodes = nodes_doc.get("items") or []
    out.append(_check_nodes(nodes))
    physical = len(facts.nvml.gpus) if facts.nvml.available else config.gpu_count
    allocatable = _check_allocatable(nodes, physical)
    out.append(allocatable)
    out.append(_check_device_plugin(facts, allocatable.status == OK))
    out.append(_check_gpu_labels(nodes, facts, config))
    return out


def _check_context_name(current: str, config: HostConfig) -> Check:
    wanted = (
        config.infra.split("/", 1)[1] if config.infra.startswith(("k8s/", "kubernetes/")) else None
    )
    if wanted and wanted != current:
        return _k8s(
            "context",
            WARN,
            f"kubectl's current context is {current!r}; the host config's infra uses {wanted!r}",
            f"`kubectl config use-context {wanted}`",
        )
    return _k8s("context", OK, f"current context {current!r}")


def _node_ready(node: dict[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status")) == "True"
    return False


def _node_name(node: dict[str, Any]) -> str:
    return str((node.get("metadata") or {}).get("name", "?"))


def _check_nodes(nodes: list[dict[str, Any]]) -> Check:
    if not nodes:
        return _k8s("nodes", FAIL, "the cluster has no nodes", "`sudo systemctl restart k3s`")
    not_ready = [_node_name(n) for n in nodes if not _node_ready(n)]
    if not_ready:
        return _k8s(
            "nodes",
            FAIL,
            f"node {', '.join(not_ready)} not Ready",
            f"`kubectl describe node {not_ready[0]}` and `sudo journalctl -u k3s -n 50`",
        )
    first = nodes[0]
    version = ((first.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", "?")
    return _k8s(
        "nodes", OK, f"{_plural(len(nodes), 'node')} Ready ({_node_name(first)}, {version})"
    )


def _gpu_count(node: dict[str, Any], key: str) -> int:
    value = ((node.get("status") or {}).get(key) or {}).get(GPU_RESOURCE, 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _check_allocatable(nodes: list[dict[str, Any]], physical: int) -> Check:
    per_node = {_node_name(n): _gpu_count(n, "allocatable") for n in nodes}
    total = sum(per_node.values())
    shown = ", ".join(f"{name}: {n}" for name, n in per_node.items())
    fix = (
        "install the NVIDIA device plugin (k3s picks up the nvidia runtime once the container "
        f"toolkit is installed: `sudo systemctl restart k3s`); see {DOC_K8S_GPU}"
    )
    if total == 0:
        return _k8s(
            "gpu_allocatable",
            FAIL,
            f"no node advertises {GPU_RESOURCE} ({shown}): SkyPilot cannot place GPU jobs",
            fix,
        )
    if physical and total != physical:
        return _k8s(
            "gpu_allocatable",
            FAIL,
            f"nodes advertise {total} {GPU_RESOURCE} ({shown}); the box has {physical} GPUs",
            "restart the device plugin pods (`kubectl -n kube-system rollout restart ds "
            "nvidia-device-plugin-daemonset`) and check `nvidia-smi -L`",
        )
    return _k8s("gpu_allocatable", OK, f"{GPU_RESOURCE} allocatable: {shown}")


def _check_device_plugin(facts: HostFacts, allocatable_ok: bool) -> Check:
    cmd = facts.command("kube_daemonsets")
    doc = _json(cmd.stdout) if cmd and cmd.ok else None
    if not isinstance(doc, dict):
        why = cmd.first_error_line() if cmd else "daemonsets were not listed"
        return _k8s("device_plugin", SKIP, f"cannot list daemonsets: {why}")
    plugins = []
    for ds in doc.get("items") or []:
        meta = ds.get("metadata") or {}
        name = str(meta.get("name", ""))
        if "nvidia-device-plugin" not in name:
            continue
        status = ds.get("status") or {}
        plugins.append(
            (
                f"{meta.get('namespace', '?')}/{name}",
                int(status.get("numberReady", 0)),
                int(status.get("desiredNumberScheduled", 0)),
            )
        )
    if not plugins:
        return _k8s(
            "device_plugin",
            WARN if allocatable_ok else FAIL,
            "no nvidia-device-plugin daemonset (device plugin or GPU operator) found",
            f"install the NVIDIA device plugin or GPU operator: {DOC_K8S_GPU}",
        )
    bad = [p for p in plugins if p[1] < max(1, p[2])]
    shown = ", ".join(f"{n} {r}/{d} ready" for n, r, d in plugins)
    if bad:
        ns, _, name = bad[0][0].partition("/")
        return _k8s(
            "device_plugin",
            FAIL,
            shown,
            f"`kubectl -n {ns} describe ds {name}` and `kubectl -n {ns} logs ds/{name}`",
        )
    return _k8s("device_plugin", OK, shown)


def _check_gpu_labels(nodes: list[dict[str, Any]], facts: HostFacts, config: HostConfig) -> Check:
    gpu_nodes = [n for n in nodes if _gpu_count(n, "allocatable") > 0] or nodes
    found: list[tuple[str, list[str]]] = []
    missing: list[tuple[str, list[str]]] = []
    for node in gpu_nodes:
        labels = (node.get("metadata") or {}).get("labels") or {}
        have = [f"{k}={labels[k]}" for k in GPU_LABELS if k in labels]
        (found if have else missing).append((_node_name(node), have))
    if missing:
        model = next(iter(config.gpus), None) or "<gpu-type>"
        first = missing[0][0]
        return _k8s(
            "gpu_labels",
            WARN,
            f"node {', '.join(n for n, _ in missing)} has no GPU product label: SkyPilot "
            "cannot match `accelerators: TYPE:N` to it",
            f"`kubectl label node {first} skypilot.co/accelerator={model.lower()}` (or deploy "
            "NVIDIA GPU Feature Discovery)",
        )
    return _k8s("gpu_labels", OK, "; ".join(f"{n}: {', '.join(h)}" for n, h in found))


# ---------------------------------------------------------------------------------------
# SkyPilot

_sky = _Component("skypilot")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")  # noqa: S104 - names, not binds


def resolve_endpoint(
    env: dict[str, str], config: HostConfig, client_config_text: str | None
) -> tuple[str, str]:
    """The API server endpoint a deskgpu/SkyPilot client on this host talks to, and why."""
    if env.get("SKYPILOT_API_SERVER_ENDPOINT"):
        return env["SKYPILOT_API_SERVER_ENDPOINT"], "env SKYPILOT_API_SERVER_ENDPOINT"
    if config.api_server:
        return config.api_server, "host config api_server"
    endpoint = _yaml_get(client_config_text, ("api_server", "endpoint"))
    if isinstance(endpoint, str) and endpoint:
        return endpoint, "~/.sky/config.yaml api_server.endpoint"
    return DEFAULT_ENDPOINT, "default"


def _yaml_get(text: str | None, path: tuple[str, ...]) -> Any:
    if not text:
        return None
    try:
        node: Any = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _endpoint_port(endpoint: str) -> tuple[str, int]:
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.hostname or "", port


def check_skypilot(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    sky = facts.sky
    out: list[Check] = []
    if sky.version:
        out.append(_sky("installed", OK, f"skypilot {sky.version}"))
    else:
        out.append(
            _sky(
                "installed",
                FAIL,
                "skypilot is not installed next to deskgpu",
                "reinstall deskgpu with its dependencies (`uv tool install --reinstall deskgpu`)",
            )
        )
    endpoint = sky.endpoint or DEFAULT_ENDPOINT
    out.append(_check_endpoint(facts, config))
    out.append(_check_health(facts, endpoint))
    out.append(_check_shared(facts, config, s, endpoint))
    out.append(_check_infra(facts, config))
    out.append(_check_policy(facts, s))
    out.append(_check_hardening(facts, config, s))
    out.append(_check_kueue(facts, config))
    return out


# How to run the one shared server: the unit `deskgpu setup render` writes, which binds
# 127.0.0.1 (`sky api start --deploy` would bind 0.0.0.0: an unauthenticated server on every
# interface).
SHARED_SERVER = (
    "the rendered skypilot-api.service (`deskgpu setup render --out /tmp/box`, then "
    "`sudo sh /tmp/box/install.sh`; it binds 127.0.0.1)"
)


def _check_endpoint(facts: HostFacts, config: HostConfig) -> Check:
    sky = facts.sky
    source = sky.endpoint_source or "default"
    start_shared = (
        f"run ONE shared server as a service, {SHARED_SERVER}, then set "
        f"`api_server: <its URL>` in {_config_file(config)} and export "
        "SKYPILOT_API_SERVER_ENDPOINT in /etc/profile.d/skypilot.sh"
    )
    if source == "default":
        return _sky(
            "endpoint",
            FAIL,
            f"no shared API server configured: each user's SDK would auto-start a private "
            f"server at {DEFAULT_ENDPOINT} that sees only their own jobs",
            start_shared,
        )
    env_endpoint = facts.env.get("SKYPILOT_API_SERVER_ENDPOINT")
    if (
        env_endpoint
        and config.api_server
        and env_endpoint.rstrip("/") != config.api_server.rstrip("/")
    ):
        return _sky(
            "endpoint",
            WARN,
            f"SKYPILOT_API_SERVER_ENDPOINT={env_endpoint} overrides the box's shared server "
            f"{config.api_server}: this user's jobs go elsewhere",
            f"`export SKYPILOT_API_SERVER_ENDPOINT={config.api_server}` (or unset it)",
        )
    return _sky("endpoint", OK, f"{sky.endpoint} ({source})")


def _check_health(facts: HostFacts, endpoint: str) -> Check:
    health = facts.sky.health
    if health is None:
        return _sky("api_server", SKIP, "the API server was not probed")
    if health.status_code != 200 or health.body is None:
        why = health.error or f"HTTP {health.status_code}"
        return _sky(
            "api_server",
            FAIL,
            f"no SkyPilot API server answers at {endpoint}: {why}",
            "start the shared server (`sudo systemctl start skypilot-api`; not installed yet: "
            f"{SHARED_SERVER}); see {DOC_API_SERVER}",
        )
    body = _json(health.body)
    if not isinstance(body, dict):
        return _sky(
            "api_server", FAIL, f"{endpoint}/api/health is not SkyPilot JSON", DOC_API_SERVER
        )
    status = str(body.get("status", "?"))
    version = body.get("version") or "?"
    detail = f"{status}, SkyPilot {version} (API {body.get('api_version', '?')}) at {endpoint}"
    if status != "healthy":
        return _sky(
            "api_server",
            WARN,
            detail,
            "log in (`sky api login`) or check the server's logs (`sky api logs`)",
        )
    client = facts.sky.version
    if client and version != "?" and client != version:
        return _sky(
            "api_server",
            WARN,
            f"{detail}; this host's client is {client}",
            f"install the same SkyPilot on both sides (`pip install skypilot=={version}` in "
            "deskgpu's env, or upgrade the server)",
        )
    return _sky("api_server", OK, detail)


def _is_human(proc: ServerProcess) -> bool:
    """A regular login account (UID_MIN is 1000 on Debian/Ubuntu/Fedora)."""
    return proc.uid is not None and 1000 <= proc.uid < 65534


def _owner(proc: ServerProcess) -> str:
    return proc.user or (f"uid {proc.uid}" if proc.uid is not None else "?")


def _check_shared(facts: HostFacts, config: HostConfig, s: Settings, endpoint: str) -> Check:
    host, port = _endpoint_port(endpoint)
    local = host in _LOCAL_HOSTS or host == (facts.hostname or "\0")
    serving = [p for p in facts.sky.processes if local and p.port == port]
    others = [p for p in facts.sky.processes if p not in serving]
    stray = [p for p in others if _is_human(p)]
    stray_note = ""
    if stray:
        stray_note = "; private servers also run: " + ", ".join(
            f"{_owner(p)} (pid {p.pid}, port {p.port})" for p in stray
        )
    stop_private = (
        "as that user: `sky api stop`, then `export SKYPILOT_API_SERVER_ENDPOINT="
        f"{config.api_server or '<shared URL>'}`; run one shared server as a service account: "
        f"{SHARED_SERVER}"
    )
    if serving:
        proc = serving[0]
        private = (s.api_server_user and proc.user != s.api_server_user) or (
            not s.api_server_user and _is_human(proc) and not proc.deploy
        )
        state = f", state in {proc.home}/.sky/api_server" if proc.home else ""
        if private:
            expected = (
                f" (doctor.api_server_user is {s.api_server_user})" if s.api_server_user else ""
            )
            return _sky(
                "shared_server",
                FAIL,
                f"the server on port {port} is {_owner(proc)}'s private one (pid {proc.pid}"
                f"{', no --deploy' if not proc.deploy else ''}{state}){expected}: other users' "
                "jobs are invisible to it" + stray_note,
                stop_private,
            )
        if stray:
            return _sky(
                "shared_server",
                WARN,
                f"{_owner(proc)} serves port {port}" + stray_note,
                stop_private,
            )
        if not proc.deploy:
            return _sky(
                "shared_server",
                WARN,
                f"{_owner(proc)} (pid {proc.pid}) serves port {port} without --deploy: sized "
                "for one user",
                f"stop it (`sky api stop` as {_owner(proc)}) and run {SHARED_SERVER}",
            )
        return _sky(
            "shared_server",
            OK,
            f"{_owner(proc)} (pid {proc.pid}) serves port {port} with --deploy",
        )
    state_dir = facts.sky.private_state_dir
    mine = state_dir is not None and state_dir.exists and (facts.uid or 0) >= 1000
    if stray or mine:
        what = stray_note.lstrip("; ") if stray else ""
        if mine:
            what = ", ".join(
                x
                for x in (what, f"{facts.user} has a private server's state in ~/.sky/api_server")
                if x
            )
        return _sky("shared_server", WARN, what, stop_private)
    if not local:
        return _sky("shared_server", OK, f"remote server {host}:{port}, not a per-user one")
    if facts.sky.health and facts.sky.health.status_code == 200:
        return _sky(
            "shared_server",
            OK,
            f"no server process visible for port {port} (in a container, or hidden without "
            f"root); no private per-user servers seen{_others_note(others)}",
        )
    return _sky("shared_server", SKIP, f"no server runs on port {port}{_others_note(others)}")


def _others_note(others: list[ServerProcess]) -> str:
    """Servers on other ports (tests, experiments): worth a mention, not a verdict."""
    if not others:
        return ""
    shown = ", ".join(f"{_owner(p)} pid {p.pid} port {p.port}" for p in others[:3])
    more = f" (+{len(others) - 3} more)" if len(others) > 3 else ""
    return f"; other API servers on this host: {shown}{more}"


def _check_infra(facts: HostFacts, config: HostConfig) -> Check:
    sky = facts.sky
    wanted = "ssh" if config.infra.startswith("ssh") else "kubernetes"
    if sky.enabled_infra is None:
        if sky.enabled_infra_error:
            return _sky(
                "infra", WARN, f"could not ask the server: {sky.enabled_infra_error}", "`sky check`"
            )
        return _sky("infra", SKIP, "no API server to ask")
    enabled = [x.lower() for x in sky.enabled_infra]
    if any(x.split("/", 1)[0] == wanted for x in enabled):
        return _sky("infra", OK, f"enabled on the server: {', '.join(sky.enabled_infra)}")
    return _sky(
        "infra",
        FAIL,
        f"{wanted} is not enabled on the API server (enabled: "
        f"{', '.join(sky.enabled_infra) or 'nothing'}): jobs cannot reach the box's GPUs",
        f"on the server, as its user: `sky check {wanted}`",
    )


def _admin_policy(fact: FileFact) -> Any:
    return _yaml_get(fact.text, ("admin_policy",))


def _check_policy(facts: HostFacts, s: Settings) -> Check:
    configs = facts.sky.server_configs
    readable = [f for f in configs if f.text is not None]
    policies = [(f.path, _admin_policy(f)) for f in readable]
    ours = [(p, v) for p, v in policies if isinstance(v, str) and v.startswith("deskgpu.")]
    if ours:
        return _sky("admin_policy", OK, f"admin_policy: {ours[0][1]} ({ours[0][0]})")
    other = [(p, v) for p, v in policies if v]
    if not s.require_admin_policy:
        seen = f"; {other[0][0]} has admin_policy: {other[0][1]}" if other else ""
        return _sky(
            "admin_policy",
            SKIP,
            f"not required by the host config (doctor.require_admin_policy){seen}",
        )
    where = (
        readable[0].path if readable else s.skypilot_server_config
    ) or "the server's ~/.sky/config.yaml"
    fix = (
        f"add `admin_policy: deskgpu.policy.<Class>` (see the README) to {where}, then "
        "restart the API server"
    )
    if other:
        return _sky(
            "admin_policy",
            FAIL,
            f"{other[0][0]} has admin_policy: {other[0][1]}, not deskgpu's",
            fix,
        )
    if readable:
        return _sky(
            "admin_policy",
            FAIL,
            f"no admin_policy in {', '.join(f.path for f in readable)}: house rules are not "
            "enforced for plain `sky launch`",
            fix,
        )
    hidden = [f"{f.path} ({f.error})" for f in configs if f.error]
    return _sky(
        "admin_policy",
        WARN,
        "could not read the API server's config"
        + (f": {', '.join(hidden)}" if hidden else " (not found)"),
        "set doctor.skypilot_server_config to its config.yaml, or rerun as root",
    )


GUARD_FIX = (
    "install the server plugin `deskgpu setup render` writes ({path}: "
    "`plugins: [{{class: deskgpu.policy.Guard}}]`), then `sudo systemctl restart skypilot-api`"
)


def _check_hardening(facts: HostFacts, config: HostConfig, s: Settings) -> Check:
    """The running server has deskgpu's guard: no request can switch the house rules off."""
    health = facts.sky.health
    guard = facts.sky.guard
    path = s.skypilot_server_config or "/var/lib/skypilot/.sky/config.yaml"
    plugins = str(Path(path).with_name("plugins.yaml"))
    fix = GUARD_FIX.format(path=plugins)
    if health is None or health.status_code != 200 or guard is None:
        return _sky("hardening", SKIP, "the API server did not answer (skypilot.api_server)")
    if guard.status_code == 404:
        if not s.require_admin_policy:
            return _sky(
                "hardening",
                SKIP,
                "the server runs without deskgpu's guard; not required by the host config "
                "(doctor.require_admin_policy)",
            )
        return _sky(
            "hardening",
            FAIL,
            "the server runs without deskgpu's guard: any client can switch the house rules "
            "off (SKYPILOT_CONFIG in its environment, admin_policy in its config) and claim "
            "to be the jobs controller",
            fix,
        )
    body = _json(guard.body) if guard.status_code == 200 and guard.body else None
    if not isinstance(body, dict) or body.get("guard") != "active":
        why = guard.error or f"HTTP {guard.status_code}"
        return _sky("hardening", FAIL, f"the guard did not say it is active ({why})", fix)
    policy = str(body.get("admin_policy") or "")
    enforced = body.get("host_config")
    if not policy.startswith("deskgpu."):
        return _sky(
            "hardening",
            FAIL,
            f"the guard pins admin policy {policy or '(none)'}, not deskgpu's",
            fix,
        )
    detail = (
        f"guard active: {policy} whatever a request sends; host config "
        f"{enforced or '(built-in defaults)'}"
    )
    mine = config.source if config.source.startswith("/") else None
    if mine and enforced and str(enforced) != mine:
        return _sky(
            "hardening",
            WARN,
            f"{detail}, but this doctor run read {mine}: the server enforces other rules",
            f"start the server with DESKGPU_CONFIG={mine} (`deskgpu setup render --config "
            f"{mine}`), or run doctor with --config {enforced}",
        )
    return _sky("hardening", OK, detail)


def _check_kueue(facts: HostFacts, config: HostConfig) -> Check:
    queue = config.kueue_local_queue
    if not queue:
        return _sky("kueue", SKIP, "kueue_local_queue not set in the host config")
    cmd = facts.command("kube_localqueues")
    if cmd is None:
        return _sky("kueue", SKIP, "Kubernetes not reachable: cannot look for Kueue")
    if not cmd.ok:
        text = (cmd.stderr + cmd.stdout).lower()
        if "doesn't have a resource type" in text or "no matches for kind" in text:
            return _sky(
                "kueue",
                FAIL,
                f"Kueue is not installed (no LocalQueue resource) but the host config uses "
                f"LocalQueue {queue!r}",
                f"install Kueue ({DOC_KUEUE}) and create LocalQueue {queue!r}",
            )
        return _sky("kueue", FAIL, f"cannot list LocalQueues: {cmd.first_error_line()}", DOC_KUEUE)
    doc = _json(cmd.stdout)
    items = doc.get("items", []) if isinstance(doc, dict) else []
    names = [
        f"{(i.get('metadata') or {}).get('namespace', '?')}/{(i.get('metadata') or {}).get('name')}"
        for i in items
    ]
    match = [n for n in names if n.split("/", 1)[1] == queue]
    if match:
        return _sky("kueue", OK, f"LocalQueue {match[0]}")
    return _sky(
        "kueue",
        FAIL,
        f"no LocalQueue named {queue!r} (found: {', '.join(names) or 'none'})",
        f"create LocalQueue {queue!r} in the namespace SkyPilot uses ({DOC_KUEUE})",
    )


# ---------------------------------------------------------------------------------------
# Golden rule drift

_golden = _Component("golden_rule")


def _dist_name(entry: str) -> str:
    return re.sub(r"[-_.]+", "-", entry.split("==", 1)[0]).lower()


def drift_distributions(distributions: Iterable[str]) -> list[str]:
    """The ML frameworks and CUDA wheels among `name==version` entries."""
    found = [d for d in distributions if _DRIFT_DIST.match(_dist_name(d))]
    return sorted(found, key=lambda d: (_dist_name(d).startswith("nvidia-"), _dist_name(d)))


def check_golden_rule(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    return [_check_host_python(facts), _check_cuda_toolkit(facts), _check_conda(facts)]


def _check_host_python(facts: HostFacts) -> Check:
    found = []
    names: list[str] = []
    user_scope = False
    for site in facts.python_sites:
        drift = drift_distributions(site.distributions)
        if not drift:
            continue
        user_scope = user_scope or site.scope == "user"
        names.extend(_dist_name(d) for d in drift)
        shown = ", ".join(d.replace("==", " ") for d in drift[:4])
        more = f" (+{len(drift) - 4} more)" if len(drift) > 4 else ""
        found.append(f"{shown}{more} in {site.path}")
    if found:
        unique = list(dict.fromkeys(names))
        fix = f"`sudo python3 -m pip uninstall -y {' '.join(unique)}`"
        if user_scope:
            fix += f" (user site: `python3 -m pip uninstall -y --user {' '.join(unique)}`)"
        return _golden(
            "host_python",
            WARN,
            "; ".join(found) + ": ML frameworks/CUDA libraries in the host's Python",
            fix + "; jobs get them from their image or uv env",
        )
    n = len(facts.python_sites)
    return _golden(
        "host_python",
        OK,
        f"no ML frameworks or CUDA wheels in {_plural(n, 'host site-packages dir')}",
    )


def _version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or "")[:2])


def _check_cuda_toolkit(facts: HostFacts) -> Check:
    real = [t for t in facts.cuda_toolkits if not t.symlink_to]
    links = [t for t in facts.cuda_toolkits if t.symlink_to]
    if not facts.cuda_toolkits and not facts.nvcc_on_path:
        return _golden("cuda_toolkit", OK, "no CUDA toolkit under /usr/local")
    parts = []
    for t in real or facts.cuda_toolkits:
        what = f"CUDA {t.version or '?'} at {t.path}" + (" (nvcc)" if t.has_nvcc else "")
        parts.append(what)
    parts.extend(f"{t.path} -> {t.symlink_to}" for t in links)
    if facts.nvcc_on_path and not any(facts.nvcc_on_path.startswith(t.path) for t in real):
        parts.append(f"nvcc on PATH at {facts.nvcc_on_path}")
    driver_cuda = facts.nvml.cuda_driver_version
    newer = [
        t
        for t in real
        if driver_cuda and t.version and _version_tuple(t.version) > _version_tuple(driver_cuda)
    ]
    if newer:
        parts.append(f"newer than the driver supports (CUDA {driver_cuda})")
    paths = " ".join(t.path for t in real) or "/usr/local/cuda*"
    return _golden(
        "cuda_toolkit",
        WARN,
        "; ".join(parts) + ": a CUDA toolkit on the host",
        f"remove it (`sudo apt-get remove --purge 'cuda-toolkit-*'`, or `sudo rm -rf {paths}` "
        "for a runfile install); jobs get CUDA from their image",
    )


def _check_conda(facts: HostFacts) -> Check:
    if not facts.conda_installs:
        return _golden("conda", OK, "no conda installs in shared paths")
    return _golden(
        "conda",
        WARN,
        f"conda in shared paths: {', '.join(facts.conda_installs)}",
        f"remove it once no one depends on it (`sudo rm -rf {facts.conda_installs[0]}`); "
        "researchers use container images or uv",
    )


# ---------------------------------------------------------------------------------------
# Storage

_storage = _Component("storage")


def _gib(n: int) -> str:
    if n >= 2**40:
        return f"{n / 2**40:.1f} TiB"
    return f"{n / 2**30:.1f} GiB"


def check_storage(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    data = facts.storage.get("data") or PathFact(path=config.data_root)
    ckpt = facts.storage.get("checkpoints") or PathFact(path=config.checkpoint_root)
    return [
        _check_root("data", data, "data_root", s, writable=False),
        _check_root("checkpoints", ckpt, "checkpoint_root", s, writable=True),
        _check_free_space([data, ckpt], s),
        _check_local_disk([data, ckpt], config),
    ]


def _check_root(name: str, fact: PathFact, key: str, s: Settings, writable: bool) -> Check:
    """`writable` is the checkpoint root: jobs write `<root>/<user>` through a kubelet subPath.

    The root itself must be root's alone: anyone who can write it can plant
    `ln -s / <root>/<user>` and turn that user's read-write mount into the host's `/`.
    """
    if not fact.exists:
        why = f" ({fact.error})" if fact.error else ""
        return _storage(
            name,
            FAIL,
            f"{fact.path} does not exist{why}",
            f"`sudo install -d -o root -g root -m 0755 {fact.path}` on a local disk "
            f"(or set {key} in the host config)",
        )
    if not fact.is_dir:
        return _storage(name, FAIL, f"{fact.path} is not a directory", f"set {key} to a directory")
    mode = fact.mode or 0
    shown = f"{fact.path} {oct(mode)[2:]:>04} {fact.owner}:{fact.group}"
    if not writable:
        group = s.research_group
        if not mode & 0o005 and not (group and fact.group == group and mode & 0o050):
            return _storage(
                name,
                WARN,
                f"{shown}: researchers cannot read it",
                f"`sudo chmod o+rx {fact.path}`",
            )
        return _storage(name, OK, shown)
    if mode & 0o022 or fact.owner not in ("root", None):
        who = (
            "everyone"
            if mode & 0o002
            else (f"group {fact.group}" if mode & 0o020 else f"its owner {fact.owner}")
        )
        return _storage(
            name,
            FAIL,
            f"{shown}: {who} can write it, so a symlink planted as <root>/<user> would give that "
            "user's jobs the host's files",
            f"`sudo chown root:root {fact.path} && sudo chmod 0755 {fact.path}`; give each "
            f"researcher `sudo install -d -o <user> -m 0755 {fact.path.rstrip('/')}/<user>`",
        )
    return _storage(name, OK, f"{shown}: root's alone; jobs write <root>/<user> through a subPath")


def _check_free_space(roots: list[PathFact], s: Settings) -> Check:
    parts: list[str] = []
    worst = OK
    low: list[str] = []
    for root in roots:
        if not root.exists or not root.total_bytes or root.free_bytes is None:
            continue
        pct = 100.0 * root.free_bytes / root.total_bytes
        parts.append(f"{root.path} {_gib(root.free_bytes)} free ({pct:.0f}%)")
        if pct < s.min_free_pct:
            worst = FAIL
            low.append(root.path)
        elif pct < s.warn_free_pct:
            worst = WARN if worst == OK else worst
            low.append(root.path)
    if not parts:
        return _storage("free_space", SKIP, "no storage root to measure")
    detail = ", ".join(parts)
    if worst != OK:
        threshold = s.min_free_pct if worst == FAIL else s.warn_free_pct
        return _storage(
            "free_space",
            worst,
            f"{detail}: below {threshold:g}%",
            f"`sudo du -xh --max-depth=2 {low[0]} | sort -h | tail` and prune old checkpoints",
        )
    return _storage("free_space", OK, detail)


def _check_local_disk(roots: list[PathFact], config: HostConfig) -> Check:
    seen: list[str] = []
    remote: list[str] = []
    memory: list[str] = []
    for root in roots:
        if not root.exists or not root.fstype:
            continue
        fs = root.fstype
        where = f"{root.path} on {root.mount_source or '?'} ({fs})"
        seen.append(where)
        if fs in NETWORK_FS or (fs.startswith("fuse.") and fs[5:] in NETWORK_FUSE):
            remote.append(where)
        elif fs in ("tmpfs", "ramfs", "overlay"):
            memory.append(where)
    if remote:
        return _storage(
            "local_disk",
            WARN,
            f"{'; '.join(remote)}: a network mount, slow for data and checkpoints",
            "mount the local NVMe there (or point data_root/checkpoint_root at it)",
        )
    if memory:
        return _storage(
            "local_disk",
            WARN,
            f"{'; '.join(memory)}: not a persistent local disk",
            "mount the local NVMe there (or point data_root/checkpoint_root at it)",
        )
    if not seen:
        return _storage("local_disk", SKIP, "no storage root to inspect")
    return _storage("local_disk", OK, "; ".join(seen))


# ---------------------------------------------------------------------------------------
# Operations

_ops = _Component("operations")
_CRON_ENV = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")


def _cron_lines(text: str | None) -> list[str]:
    lines = []
    for line in (text or "").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not _CRON_ENV.match(stripped):
            lines.append(stripped)
    return lines


def _unit_exec(text: str | None) -> list[str]:
    return [
        line.split("=", 1)[1].strip()
        for line in (text or "").splitlines()
        if line.strip().startswith("ExecStart")
    ]


def _timer_for(service_path: str, facts: HostFacts) -> FileFact | None:
    """The .timer that starts `service_path` (same stem, or `Unit=` naming it)."""
    base = service_path.rsplit("/", 1)[-1]
    stem = base.removesuffix(".service")
    for key, fact in facts.files.items():
        if not key.startswith("systemd:") or not fact.path.endswith(".timer"):
            continue
        name = fact.path.rsplit("/", 1)[-1]
        if name == f"{stem}.timer" or re.search(
            rf"^\s*Unit\s*=\s*{re.escape(base)}\s*$", fact.text or "", re.M
        ):
            return fact
    return None


def check_operations(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    schedules = dict(s.schedules)
    return [
        _check_schedule(
            facts,
            "reap_scheduled",
            "the weekly reap",
            schedules["reap"],
            "0 4 * * 1 root deskgpu reap --yes",
        ),
        _check_schedule(
            facts,
            "observe_scheduled",
            "the periodic observation",
            schedules["observe"],
            "*/10 * * * * root deskgpu reap --observe",
        ),
    ]


def _check_schedule(facts: HostFacts, name: str, what: str, pattern: str, example: str) -> Check:
    rx = re.compile(pattern)
    for key, fact in sorted(facts.files.items()):
        if key.startswith("cron:"):
            for line in _cron_lines(fact.text):
                if rx.search(line):
                    return _ops(name, OK, f"cron {fact.path}: `{line}`")
    crontab = facts.command("crontab")
    if crontab and crontab.ok:
        for line in _cron_lines(crontab.stdout):
            if rx.search(line):
                return _ops(name, OK, f"{facts.user}'s crontab: `{line}`")
    timers = facts.command("systemctl_timers")
    for key, fact in sorted(facts.files.items()):
        if not key.startswith("systemd:") or not fact.path.endswith(".service"):
            continue
        if not any(rx.search(cmd) for cmd in _unit_exec(fact.text)):
            continue
        timer = _timer_for(fact.path, facts)
        if timer is None:
            continue
        tname = timer.path.rsplit("/", 1)[-1]
        if timers and timers.ok and tname not in timers.stdout:
            return _ops(
                name,
                WARN,
                f"{tname} exists but is not active",
                f"`sudo systemctl enable --now {tname}`",
            )
        note = "" if timers and timers.ok else " (systemd not running here: not confirmed active)"
        return _ops(name, OK, f"systemd {tname} runs {fact.path.rsplit('/', 1)[-1]}{note}")
    hidden = ""
    spool = facts.file("cron_spool")
    if spool is not None and spool.error:
        hidden = " (other users' crontabs not visible without root)"
    return _ops(
        name,
        WARN,
        f"no cron entry or systemd timer runs {what} (doctor.schedules){hidden}",
        f"`echo '{example}' | sudo tee /etc/cron.d/deskgpu-{name.split('_')[0]}`",
    )


# ---------------------------------------------------------------------------------------

CHECKS: tuple[Callable[[HostFacts, HostConfig, Settings], list[Check]], ...] = (
    check_driver,
    check_docker,
    check_kubernetes,
    check_skypilot,
    check_golden_rule,
    check_storage,
    check_operations,
)


def run_checks(facts: HostFacts, config: HostConfig) -> list[Check]:
    """Every check, in component order; ids in `doctor.skip` become `skip`."""
    s = Settings.from_config(config)
    out: list[Check] = []
    for fn in CHECKS:
        for check in fn(facts, config, s):
            if check.id in s.skip:
                check = Check(
                    check.id, check.component, SKIP, "skipped by doctor.skip in the host config"
                )
            out.append(check)
    return out
