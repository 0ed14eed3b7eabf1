"""What every check module shares: `Check`, the statuses, the component titles and helpers.

A check is a pure function of recorded `HostFacts` and the host config. No I/O here: the same
checks judge live facts and facts recorded on another box.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from deskgpu.config import SYSTEM_CONFIG, HostConfig

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
    "cluster": "Cluster",
    "telemetry": "Telemetry (Prometheus)",
}

# Where doctor's fixes have the admin render the box's files (any scratch directory will do).
RENDER_OUT = "/tmp/box"  # noqa: S108 - a directory the admin types, not one deskgpu writes
RENDER = f"deskgpu setup render --out {RENDER_OUT}"
INSTALL = f"sudo sh {RENDER_OUT}/install.sh"


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


class _Component:
    """Makes the checks of one component: `_driver("ecc", WARN, detail, fix)`."""

    def __init__(self, component: str) -> None:
        self.component = component

    def __call__(self, name: str, status: str, detail: str, fix: str | None = None) -> Check:
        fix = fix if status in (WARN, FAIL) else None
        return Check(f"{self.component}.{name}", self.component, status, detail, fix)


def _json(text: str | None) -> Any:
    try:
        return json.loads(text or "")
    except ValueError:
        return None


def _config_file(config: HostConfig) -> str:
    return config.source if config.source.startswith("/") else str(SYSTEM_CONFIG)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
