"""Durations and sizes, parsed and printed the way people write them."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^(?:(\d{1,9})d)?(?:(\d{1,9})h)?(?:(\d{1,9})m)?(?:(\d{1,9})s)?$")


def parse_duration_s(text: str) -> int:
    """`30m`, `2h`, `3d`, `1h30m`, `45s` -> seconds. Raises ValueError on anything else."""
    match = _DURATION.match(text.strip())
    if not text.strip() or not match or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r}")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def format_duration(seconds: float) -> str:
    """The two most significant units: `5d 3h`, `2h 10m`, `4m`, `12s`."""
    remaining = max(0, int(seconds))
    parts: list[tuple[int, str]] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, size)
        if count or parts:
            parts.append((count, unit))
    shown = [f"{count}{unit}" for count, unit in parts[:2] if count]
    return " ".join(shown) or "0s"


def format_mib(mib: float | None) -> str:
    """VRAM as people read it: `23.1 GiB`, `512 MiB`, `N/A`."""
    if mib is None:
        return "N/A"
    if mib >= 1024:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib:.0f} MiB"
