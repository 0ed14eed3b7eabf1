"""The NVIDIA driver: NVML loads, the GPUs match the inventory, ECC, thermals."""

from __future__ import annotations

import re

from deskgpu import gpumodels
from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.doctor.checks.base import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    _Component,
    _config_file,
)
from deskgpu.doctor.checks.cluster import local_gpus
from deskgpu.doctor.facts import (
    GpuReading,
    HostFacts,
)

DOC_DRIVER = "https://docs.nvidia.com/datacenter/tesla/driver-installation-guide/"
DOC_ECC = "https://docs.nvidia.com/deploy/a100-gpu-mem-error-mgmt/index.html"

# NVML clocks event (throttle) reason bits, as in nvml.h.
HW_SLOWDOWN = 0x08
SW_THERMAL = 0x20
HW_THERMAL = 0x40
THERMAL_BITS = SW_THERMAL | HW_THERMAL

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
    inventory = local_gpus(facts, config)  # on a cluster: this node's `gpus:`
    if not inventory:
        example = _inventory_example(gpus)
        return _driver(
            "gpus",
            WARN,
            f"found {seen}; the host config has no GPU inventory to compare with",
            f"add `gpus: {example}` to {_config_file(config)}",
        )
    problems = []
    for model, count in inventory.items():
        have = sum(1 for g in gpus if g.name and gpu_matches(model, g.name))
        if have != count:
            problems.append(f"{have}x {model} (config says {count})")
    unmatched = [g for g in gpus if not any(gpu_matches(m, g.name or "") for m in inventory)]
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
    shown = ", ".join(f"{count}x {model}" for model, count in inventory.items())
    return _driver("gpus", OK, f"{seen} (matches the inventory: {shown})")


def _inventory_example(gpus: list[GpuReading]) -> str:
    return gpumodels.shown(gpumodels.inventory(g.name for g in gpus))


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
