"""The host config's `telemetry:`: where `queue` and `reap` read the GPUs.

Absent, each command reads NVML on the host it runs on (one box; no Prometheus needed).
`telemetry: {prometheus: URL}` names the Prometheus that scrapes every node's dcgm-exporter
and node_exporter (`setup render` writes its config): `queue` and `reap` then read every
node's GPUs from its HTTP API. `stale_after` is how old a node's newest reading may be before
it is shown stale (and its GPUs count as unknown, never idle).

Imports nothing of deskgpu's but units: the config loader builds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deskgpu.units import parse_duration_s

NVML = "nvml"
PROMETHEUS = "prometheus"
SOURCES = (NVML, PROMETHEUS)
SOURCE_ENV = "DESKGPU_TELEMETRY"  # `nvml` reads this host only, whatever the config says

DEFAULT_STALE_AFTER = "2m"
DEFAULT_SCRAPE_INTERVAL = "15s"
# dcgm-exporter's port, and node_exporter's (its textfile collector serves deskgpu.prom).
DCGM_EXPORTER_PORT = 9400
NODE_EXPORTER_PORT = 9100
# The label the scrape config gives each target: the k3s node name (`nodes:`), the one way a
# series says which box it came from.
NODE_LABEL = "node"
DCGM_JOB = "dcgm-exporter"
# Debian's and Ubuntu's prometheus-node-exporter reads its textfile collector from here: each
# node's observe writes deskgpu.prom there when the host config names no metrics_textfile_dir.
DEFAULT_TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
NODE_EXPORTER_JOB = "node-exporter"


@dataclass(frozen=True)
class Telemetry:
    """`telemetry:` as written."""

    prometheus: str  # "http://127.0.0.1:9090"
    stale_after: str = DEFAULT_STALE_AFTER
    scrape_interval: str = DEFAULT_SCRAPE_INTERVAL

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Telemetry:
        return cls(
            prometheus=str(data["prometheus"]).rstrip("/"),
            stale_after=str(data.get("stale_after") or DEFAULT_STALE_AFTER),
            scrape_interval=str(data.get("scrape_interval") or DEFAULT_SCRAPE_INTERVAL),
        )

    def as_mapping(self) -> dict[str, Any]:
        return {
            "prometheus": self.prometheus,
            "stale_after": self.stale_after,
            "scrape_interval": self.scrape_interval,
        }

    @property
    def stale_after_s(self) -> float:
        return float(parse_duration_s(self.stale_after))

    @property
    def scrape_interval_s(self) -> float:
        return float(parse_duration_s(self.scrape_interval))


def telemetry_from(raw: Any) -> Telemetry | None:
    if raw is None or isinstance(raw, Telemetry):
        return raw
    return Telemetry.from_mapping(raw)


def source(telemetry: Telemetry | None, environ: Mapping[str, str] | None = None) -> str:
    """Where this command reads GPUs: Prometheus when the host config names one, unless
    `DESKGPU_TELEMETRY=nvml` asks for this host's own NVML (a node's `observe`, or a
    `reap --kill-unmanaged` that must see the very process it signals)."""
    import os

    env = os.environ if environ is None else environ
    if telemetry is None or env.get(SOURCE_ENV, "").strip().lower() == NVML:
        return NVML
    return PROMETHEUS
