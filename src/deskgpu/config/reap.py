"""The `reap:` section of the host config, parsed, with the documented defaults.

Every key is optional. Durations are written like `24h`, `30m`, `1d12h`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deskgpu.errors import SpecError
from deskgpu.units import parse_duration_s

if TYPE_CHECKING:  # the config holds these settings (HostConfig.reap_settings), not the reverse
    from deskgpu.config import HostConfig

# key in the host config -> (attribute, kind, default). docs/reap.md's table is generated from it.
KEYS: dict[str, tuple[str, str, Any]] = {
    "min_age": ("min_age_s", "duration", "24h"),
    "idle_window": ("idle_window_s", "duration", "6h"),
    "util_threshold_pct": ("util_threshold_pct", "number", 5),
    "min_vram_mib": ("min_vram_mib", "number", 1024),
    "cpu_busy_pct": ("cpu_busy_pct", "number?", 50),
    "grace": ("grace_s", "duration", "24h"),
    "stalled_batch_after": ("stalled_batch_after_s", "duration", "12h"),
    "max_sample_gap": ("max_sample_gap_s", "duration", "20m"),
    "live_window": ("live_window_s", "duration", "1m"),
    "live_interval": ("live_interval_s", "duration", "5s"),
    "retention": ("retention_s", "duration", "8d"),
    "warn_on_observe": ("warn_on_observe", "bool", True),
    "notify_command": ("notify_command", "argv", ()),
    "notify_timeout": ("notify_timeout_s", "duration", "30s"),
    "kill_timeout": ("kill_timeout_s", "duration", "10s"),
    "lock_timeout": ("lock_timeout_s", "duration", "5m"),
    "history_path": ("history_path", "path?", None),
    "audit_log": ("audit_log", "path?", None),
}


@dataclass(frozen=True)
class ReapSettings:
    """Thresholds of the zombie rule and where reap keeps its state."""

    min_age_s: int = 24 * 3600
    idle_window_s: int = 6 * 3600
    util_threshold_pct: float = 5.0
    min_vram_mib: float = 1024.0
    cpu_busy_pct: float | None = 50.0
    grace_s: int = 24 * 3600
    stalled_batch_after_s: int = 12 * 3600
    max_sample_gap_s: int = 20 * 60
    live_window_s: int = 60
    live_interval_s: int = 5
    retention_s: int = 8 * 86400
    warn_on_observe: bool = True
    notify_command: tuple[str, ...] = ()
    notify_timeout_s: int = 30
    kill_timeout_s: int = 10
    lock_timeout_s: int = 300
    history_path: str | None = None
    audit_log: str | None = None
    protected: tuple[str, ...] = ()  # the host config's top-level `protected`
    state_dir: str = "/var/lib/deskgpu"

    @property
    def history_file(self) -> Path:
        return Path(self.history_path or Path(self.state_dir) / "history.sqlite")

    @property
    def audit_file(self) -> Path:
        return Path(self.audit_log or Path(self.state_dir) / "reap-audit.jsonl")

    @property
    def lock_file(self) -> Path:
        return Path(self.state_dir) / "reap.lock"

    @property
    def evidence_dir(self) -> Path:
        return Path(self.state_dir) / "evidence"


def load_settings(config: HostConfig) -> ReapSettings:
    """Parse `config.reap`; every problem is one line of a `SpecError` (exit 2).

    `load_config` already refused a host config file with such problems, each at its line
    (`settings_problems`); these lines are for configs built in code.
    """
    settings, problems = settings_problems(config)
    if problems or settings is None:
        raise SpecError([f"host config: reap.{key}: {what}" for key, what in problems])
    return settings


def settings_problems(config: HostConfig) -> tuple[ReapSettings | None, list[tuple[str, str]]]:
    """The parsed `reap:` section, or the `(key, problem)` pairs that keep it from parsing."""
    raw = config.reap or {}
    problems: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in KEYS:
            problems.append((key, f"unknown key (known: {', '.join(KEYS)})"))
            continue
        attr, kind, _ = KEYS[key]
        try:
            values[attr] = _parse(kind, value)
        except ValueError as exc:
            problems.append((key, str(exc)))
    if problems:
        return None, problems
    settings = ReapSettings(**values, protected=tuple(config.protected), state_dir=config.state_dir)
    if settings.live_interval_s > settings.live_window_s:
        problems.append(("live_interval", "longer than reap.live_window"))
    if settings.max_sample_gap_s < 60:
        problems.append(("max_sample_gap", "shorter than a minute (observe runs every 5)"))
    return (None, problems) if problems else (settings, [])


def _parse(kind: str, value: Any) -> Any:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    if kind == "duration":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"expected a duration like `24h`, got {value!r}")
        seconds = value if isinstance(value, int) else parse_duration_s(value)
        if seconds < 1:
            raise ValueError("must be at least 1s")
        return int(seconds)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"expected a number >= 0, got {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind == "argv":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(
                "expected a command as a list of arguments, e.g. "
                "[/usr/local/bin/notify, '{owner}', '{message}']"
            )
        return tuple(value)
    if kind == "path":
        if not isinstance(value, str) or not value.startswith("/"):
            raise ValueError(f"expected an absolute path, got {value!r}")
        return value
    raise AssertionError(kind)  # pragma: no cover
