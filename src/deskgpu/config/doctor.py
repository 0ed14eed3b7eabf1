"""The host config's `doctor:` section as one typed object: doctor's checks and probes and
`deskgpu setup render` all read it from `HostConfig.doctor`.

The JSON schema (`schemas/hostconfig-v1.json`) has already checked each key's type and range;
`doctor.skip` ids are checked against the check registry by the config loader. Imports nothing
from deskgpu: the config loader builds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

# Keys older host configs may still carry; accepted and ignored (`deskgpu doctor` says so).
RETIRED = {
    "schedules": "doctor.schedules is no longer read: a schedule counts when its command "
    "parses with deskgpu's own CLI to the one `deskgpu setup render` writes; delete the key",
}


@dataclass(frozen=True)
class DoctorSettings:
    """`doctor:` with its defaults (docs/doctor.md's table is generated from them)."""

    min_free_pct: float = 5.0
    warn_free_pct: float = 15.0
    max_temperature_c: int = 85
    require_ecc: bool = False
    require_admin_policy: bool = False
    research_group: str | None = None
    api_server_user: str | None = None
    skypilot_server_config: str | None = None
    skip: tuple[str, ...] = ()
    conda_paths: tuple[str, ...] = ()
    probe_timeout_s: float = 4.0
    retired: tuple[str, ...] = ()  # RETIRED keys the config still has

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> DoctorSettings:
        d = dict(data or {})
        retired = tuple(k for k in RETIRED if d.pop(k, None) is not None)
        known = {f.name for f in fields(cls)} - {"retired"}
        unknown = sorted(set(d) - known)
        if unknown:  # the schema refuses these first; a caller passing a dict gets told too
            raise ValueError(f"unknown doctor setting(s): {', '.join(unknown)}")
        return cls(
            min_free_pct=float(d.get("min_free_pct", cls.min_free_pct)),
            warn_free_pct=float(d.get("warn_free_pct", cls.warn_free_pct)),
            max_temperature_c=int(d.get("max_temperature_c", cls.max_temperature_c)),
            require_ecc=bool(d.get("require_ecc", False)),
            require_admin_policy=bool(d.get("require_admin_policy", False)),
            research_group=d.get("research_group") or None,
            api_server_user=d.get("api_server_user") or None,
            skypilot_server_config=d.get("skypilot_server_config") or None,
            skip=tuple(d.get("skip") or ()),
            conda_paths=tuple(d.get("conda_paths") or ()),
            probe_timeout_s=float(d.get("probe_timeout_s", cls.probe_timeout_s)),
            retired=retired,
        )

    def as_mapping(self) -> dict[str, Any]:
        """The settings that differ from the defaults, as a `doctor:` section would say them."""
        default = DoctorSettings()
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "retired" and value != getattr(default, f.name):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


Settings = DoctorSettings  # what the checks call it
