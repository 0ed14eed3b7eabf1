"""The host config: what the box is, where its roots are, and its house rules.

Read from `--config`, else `$DESKGPU_CONFIG`, else `/etc/deskgpu/config.yaml`; built-in
defaults when none exists. Nothing is read at import time.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deskgpu.config.doctor import DoctorSettings
from deskgpu.config.nodes import (
    SERVER,
    Node,
    SharedStorage,
    cluster_problems,
    nodes_from,
    storage_from,
    summed_gpus,
)
from deskgpu.config.telemetry import Telemetry, telemetry_from
from deskgpu.doctor.registry import BY_ID as CHECKS
from deskgpu.errors import SpecError
from deskgpu.units import parse_duration_s
from deskgpu.validate import load_schema, schema_problems
from deskgpu.yamlio import Located, read_located

if TYPE_CHECKING:
    from deskgpu.config.reap import ReapSettings

SYSTEM_CONFIG = Path("/etc/deskgpu/config.yaml")
CONFIG_ENV = "DESKGPU_CONFIG"


@dataclass(frozen=True)
class HostConfig:
    """Everything deskgpu knows about the box. Defaults match DESIGN.md."""

    box_name: str = "deskgpu"
    infra: str = "k8s"
    data_root: str = "/data"
    checkpoint_root: str = "/checkpoints"
    default_image: str | None = None
    gpus: dict[str, int] = field(default_factory=dict)  # with `nodes`: their sum
    nodes: tuple[Node, ...] = ()  # none: one box (deskgpu.config.nodes)
    storage: SharedStorage | None = None  # a NAS the nodes share; none: the server's NFS
    telemetry: Telemetry | None = None  # Prometheus over every node; none: NVML here
    api_server: str | None = None
    kueue_local_queue: str | None = None
    idle_timeout: str = "2h"
    max_idle_timeout: str = "3d"
    max_gpus_per_job: int | None = None
    images_allow: tuple[str, ...] = ()
    images_deny: tuple[str, ...] = ()
    admin_group: str | None = None
    trusted_frontends: tuple[str, ...] = ()
    shared_logs: bool = False
    frontend_gives_up_after: str = "4m"
    state_dir: str = "/var/lib/deskgpu"
    metrics_textfile_dir: str | None = None  # node_exporter's textfile directory
    protected: tuple[str, ...] = ()
    reap: dict[str, Any] = field(default_factory=dict)
    doctor: DoctorSettings = field(default_factory=DoctorSettings)
    source: str = "built-in defaults"

    def __post_init__(self) -> None:
        raw: object = self.doctor
        if isinstance(raw, dict):  # the `doctor:` mapping as written
            object.__setattr__(self, "doctor", DoctorSettings.from_mapping(raw))
        object.__setattr__(self, "nodes", nodes_from(self.nodes))
        object.__setattr__(self, "storage", storage_from(self.storage))
        object.__setattr__(self, "telemetry", telemetry_from(self.telemetry))
        if self.nodes:  # one source: the inventory is the nodes'
            object.__setattr__(self, "gpus", summed_gpus(self.nodes))

    @cached_property
    def reap_settings(self) -> ReapSettings:
        """The `reap:` section parsed, once per config (a `SpecError` if it does not parse:
        `load_config` has already refused such a file, at the line)."""
        from deskgpu.config.reap import load_settings

        return load_settings(self)

    @property
    def gpu_count(self) -> int:
        return sum(self.gpus.values())

    @property
    def idle_timeout_s(self) -> int:
        return parse_duration_s(self.idle_timeout)

    @property
    def frontend_gives_up_after_s(self) -> int:
        return parse_duration_s(self.frontend_gives_up_after)

    @property
    def max_idle_timeout_s(self) -> int:
        return parse_duration_s(self.max_idle_timeout)

    @property
    def on_box(self) -> bool:
        """True for the box's own Kubernetes (k3s) or SSH node pool infra."""
        return is_box_infra(self.infra)

    def describe_gpus(self) -> str:
        if not self.gpus:
            return "no GPU inventory in the host config"
        return ", ".join(f"{count}x {model}" for model, count in self.gpus.items())

    @property
    def server_node(self) -> Node | None:
        """The node running k3s's server and the API server (None: one box, no `nodes:`)."""
        return next((n for n in self.nodes if n.role == SERVER), None)

    def node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def describe_nodes(self) -> str:
        """`lab-a6000: 4x A6000; lab-h100-1: 8x H100`: what each node has."""
        return "; ".join(f"{n.name}: {n.describe_gpus()}" for n in self.nodes)


# SkyPilot 0.14's infra names (sky.utils.registry.CLOUD_REGISTRY and its aliases); a test
# keeps this list equal to SkyPilot's, so `deskgpu submit` can tell `k9s` is none of them
# without importing SkyPilot.
KNOWN_INFRA = (
    "aws", "azure", "cudo", "digitalocean", "do", "fluidstack", "gcp", "hyperbolic", "ibm",
    "k8s", "kubernetes", "lambda", "mithril", "nebius", "oci", "paperspace", "primeintellect",
    "runpod", "scp", "seeweb", "shadeform", "slurm", "ssh", "vast", "verda", "vsphere", "yotta",
)  # fmt: skip


def is_box_infra(infra: str) -> bool:
    head = infra.split("/", 1)[0]
    return head in ("k8s", "kubernetes", "ssh")


def config_path(explicit: Path | None, environ: dict[str, str] | None = None) -> Path | None:
    """Which file to read; None means built-in defaults (no system config present)."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        return explicit
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def load_config(explicit: Path | None = None, environ: dict[str, str] | None = None) -> HostConfig:
    """Load and validate the host config; problems are a located `SpecError` (exit 2)."""
    path = config_path(explicit, environ)
    if path is None:
        return HostConfig()
    doc = read_located(path, empty_ok=True)  # an empty file: the built-in defaults
    login = _url_login(doc)
    if login:  # before the schema, whose message would quote the value, password and all
        raise SpecError([login])
    problems = schema_problems(doc, load_schema("hostconfig-v1.json"), "host config")
    if problems:
        raise SpecError(problems)
    problems = cluster_problems(doc)
    if problems:
        raise SpecError(problems)
    data: dict[str, Any] = dict(doc.data)
    images = data.pop("images", {}) or {}
    for key in ("idle_timeout", "max_idle_timeout"):
        if key in data and parse_duration_s(data[key]) < 60:
            raise SpecError([doc.problem((key,), "is shorter than a minute", "use e.g. `30m`")])
    for i, check_id in enumerate((data.get("doctor") or {}).get("skip") or ()):
        if check_id not in CHECKS:
            close = difflib.get_close_matches(check_id, list(CHECKS), n=1)
            hint = f"did you mean {close[0]}?" if close else "`deskgpu doctor --json` lists the ids"
            raise SpecError([doc.problem(("doctor", "skip", i), f"no check {check_id!r}", hint)])
    config = HostConfig(
        **{k: v for k, v in data.items() if k not in ("protected", "trusted_frontends")},
        protected=tuple(data.get("protected", ())),
        trusted_frontends=tuple(data.get("trusted_frontends") or ()),
        images_allow=tuple(images.get("allow", ())),
        images_deny=tuple(images.get("deny", ())),
        source=str(path),
    )
    from deskgpu.config.reap import settings_problems  # the reap section, located too

    _, reap_problems = settings_problems(config)
    if reap_problems:
        raise SpecError(
            [
                doc.problem(("reap", key) if key in (data.get("reap") or {}) else ("reap",), what)
                for key, what in reap_problems
            ]
        )
    data_root = Path(config.data_root)
    ckpt_root = Path(config.checkpoint_root)
    if data_root == ckpt_root or data_root in ckpt_root.parents or ckpt_root in data_root.parents:
        raise SpecError(
            [
                doc.problem(
                    ("checkpoint_root",) if "checkpoint_root" in data else ("data_root",),
                    f"checkpoint_root {config.checkpoint_root} and data_root {config.data_root} "
                    "overlap: every job could read everyone's checkpoints through /data",
                    "give them separate directories, e.g. /data and /checkpoints",
                )
            ]
        )
    tele = config.telemetry
    if tele is not None and tele.stale_after_s <= tele.scrape_interval_s:
        raise SpecError(
            [
                doc.problem(
                    ("telemetry", "stale_after"),
                    f"{tele.stale_after} is not longer than the scrape interval "
                    f"{tele.scrape_interval}: every node would read as stale between scrapes",
                    "make stale_after a few scrape intervals, e.g. `2m` for `15s`",
                )
            ]
        )
    if config.idle_timeout_s > config.max_idle_timeout_s:
        raise SpecError(
            [
                doc.problem(
                    ("idle_timeout",),
                    f"{config.idle_timeout} is longer than max_idle_timeout "
                    f"{config.max_idle_timeout}",
                    "lower idle_timeout or raise max_idle_timeout",
                )
            ]
        )
    return config


def _url_login(doc: Located) -> str | None:
    """A located problem for a `telemetry.prometheus` URL that carries a login, never
    quoting it: deskgpu sends no login, and its messages and evidence name the URL."""
    data = doc.data if isinstance(doc.data, dict) else {}
    tele = data.get("telemetry")
    url = tele.get("prometheus") if isinstance(tele, dict) else None
    if not isinstance(url, str) or "@" not in url.split("//", 1)[-1].split("/", 1)[0]:
        return None
    return doc.problem(
        ("telemetry", "prometheus"),
        "carries a login (user:password@): deskgpu sends none, and would show it in its "
        "messages and evidence",
        "remove it: keep Prometheus on the server's loopback or the lab's network "
        "(docs/telemetry.md)",
    )
