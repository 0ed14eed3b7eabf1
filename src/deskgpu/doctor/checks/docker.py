"""Docker and the NVIDIA Container Toolkit: the daemon answers and has an NVIDIA runtime."""

from __future__ import annotations

import re
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.doctor.checks.base import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    _Component,
    _json,
)
from deskgpu.doctor.facts import (
    CommandResult,
    HostFacts,
)

DOC_TOOLKIT = (
    "https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html"
)

_docker = _Component("docker")


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
