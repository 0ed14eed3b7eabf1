"""GPU model names as the host config's inventory writes them (`A6000`), from what NVML says
(`NVIDIA RTX A6000`). Pure; doctor and submit share it."""

from __future__ import annotations

from collections.abc import Iterable

_VENDOR_WORDS = {
    "NVIDIA",
    "GEFORCE",
    "TESLA",
    "QUADRO",
    "RTX",
    "GPU",
    "PCIE",
    "SXM",
    "SXM4",
    "SXM5",
}


def model_key(name: str) -> str:
    """`NVIDIA RTX A6000` -> `A6000`, `NVIDIA H100 80GB HBM3` -> `H100`, `Tesla T4` -> `T4`,
    `NVIDIA GeForce RTX 4090` -> `RTX4090`."""
    words = [w for w in name.replace("-", " ").split() if w.upper() not in _VENDOR_WORDS]
    with_digits = [w for w in words if any(c.isdigit() for c in w) and not w.upper().endswith("GB")]
    if with_digits:
        key = with_digits[0]
        # `RTX 4090`, `RTX 6000 Ada`: the number alone is no model (SkyPilot says RTX4090).
        return f"RTX{key}" if key.isdigit() and "RTX" in name.upper() else key
    return words[-1] if words else "GPU"


def inventory(names: Iterable[str | None]) -> dict[str, int]:
    """`{model: count}` for the GPUs named (the host config's `gpus:` shape)."""
    counts: dict[str, int] = {}
    for name in names:
        key = model_key(name or "GPU")
        counts[key] = counts.get(key, 0) + 1
    return counts


def shown(counts: dict[str, int]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "}"
