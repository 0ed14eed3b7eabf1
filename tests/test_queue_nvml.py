"""The NVML reader. No GPU here, so: the real "no driver" path, plus failures injected through
a stand-in module that raises pynvml's own error classes (mocks only inject failures)."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pynvml
import pytest

from deskgpu import nvml


def test_no_nvidia_driver_is_a_clear_line_not_a_crash() -> None:
    view = nvml.read()
    if view.available:  # pragma: no cover - only on a GPU host
        pytest.skip("this host has an NVIDIA driver")
    assert view.error == nvml.NO_DRIVER
    assert view.gpus == []


class _Proc:
    def __init__(self, pid: int, used: int | None) -> None:
        self.pid = pid
        self.usedGpuMemory = used


def fake_nvml(
    gpus: list[dict[str, Any]],
    init_error: type[Exception] | None = None,
    system: dict[str, Any] | None = None,
) -> Any:
    """A pynvml stand-in over a table of readings.

    A reading that is an exception class raises it; an iterator gives its next value on each
    call (spaced samples, a GPU that goes mid-read); a dict is looked up by the call's extra
    arguments (ECC counter, retirement cause, threshold). `system` adds system-wide readings
    (an absent one is a binding that lacks the function). `queries` records (function, GPU).
    """
    mod = types.ModuleType("fake_pynvml")
    for name in dir(pynvml):
        if name.startswith("NVML"):  # the error classes and the constants (NVML_VOLATILE_ECC, ...)
            setattr(mod, name, getattr(pynvml, name))
    calls: list[str] = []
    queries: list[tuple[str, int]] = []
    mod.calls = calls  # type: ignore[attr-defined]
    mod.queries = queries  # type: ignore[attr-defined]

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error()

    def answer(value: Any, args: tuple[Any, ...] = ()) -> Any:
        if isinstance(value, Iterator):
            value = next(value)
        if isinstance(value, dict):
            value = value[args[0] if len(args) == 1 else args]
        if isinstance(value, type) and issubclass(value, Exception):
            raise value()
        return value

    def reading(attr: str, key: str) -> Any:
        def fn(handle: int, *args: Any) -> Any:
            queries.append((attr, handle))
            return answer(gpus[handle].get(key), args)

        return fn

    def system_reading(value: Any) -> Any:
        return lambda: answer(value)

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: "550.127.05"  # type: ignore[attr-defined]
    for attr, value in (system or {}).items():
        setattr(mod, attr, system_reading(value))
    mod.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    for attr, key in [
        ("nvmlDeviceGetUUID", "uuid"),
        ("nvmlDeviceGetName", "name"),
        ("nvmlDeviceGetMemoryInfo", "memory"),
        ("nvmlDeviceGetUtilizationRates", "util"),
        ("nvmlDeviceGetTemperature", "temp"),
        ("nvmlDeviceGetPowerUsage", "power_mw"),
        ("nvmlDeviceGetEnforcedPowerLimit", "limit_mw"),
        ("nvmlDeviceGetCurrentClocksEventReasons", "throttle"),
        ("nvmlDeviceGetCurrentClocksThrottleReasons", "throttle"),
        ("nvmlDeviceGetPersistenceMode", "persistence"),
        ("nvmlDeviceGetMigMode", "mig"),
        ("nvmlDeviceGetComputeRunningProcesses", "compute"),
        ("nvmlDeviceGetGraphicsRunningProcesses", "graphics"),
        # What doctor's health read adds.
        ("nvmlDeviceGetPciInfo", "pci"),
        ("nvmlDeviceGetEccMode", "ecc_mode"),
        ("nvmlDeviceGetTotalEccErrors", "ecc_errors"),
        ("nvmlDeviceGetRetiredPages", "retired_pages"),
        ("nvmlDeviceGetRetiredPagesPendingStatus", "retired_pending"),
        ("nvmlDeviceGetRemappedRows", "remapped_rows"),
        ("nvmlDeviceGetTemperatureThreshold", "thresholds"),
    ]:
        setattr(mod, attr, reading(attr, key))
    return mod


MIB = 1024 * 1024
A6000 = {
    "uuid": "GPU-0",
    "name": b"NVIDIA RTX A6000",
    "memory": types.SimpleNamespace(used=1024 * MIB, total=49140 * MIB),
    "util": types.SimpleNamespace(gpu=42),
    "temp": 61,
    "power_mw": 150_000,
    "limit_mw": 300_000,
    "throttle": 0x20 | 0x04,
    "persistence": 1,
    "mig": (0, 0),
    "compute": [_Proc(100, 1000 * MIB)],
    "graphics": [_Proc(100, 1000 * MIB), _Proc(200, None)],
}


def test_readings_named_and_converted_like_nvidia_smi() -> None:
    fake = fake_nvml([A6000])
    view = nvml.read(fake)
    gpu = view.gpus[0]
    assert view.available and view.driver_version == "550.127.05"
    assert (gpu.name, gpu.memory_used_mib, gpu.memory_total_mib) == (
        "NVIDIA RTX A6000",
        1024.0,
        49140.0,
    )
    assert (gpu.utilization_gpu_pct, gpu.temperature_c) == (42, 61)
    assert (gpu.power_draw_w, gpu.power_limit_w) == (150.0, 300.0)
    assert gpu.throttle_reasons == ["thermal", "power"]
    assert (gpu.persistence_mode, gpu.mig_mode) == (True, False)
    # PID 100 is both compute and graphics: once. PID 200: memory not reported -> None.
    assert [(p.pid, p.used_memory_mib, p.type) for p in gpu.processes] == [
        (100, 1000.0, "compute"),
        (200, None, "graphics"),
    ]
    assert fake.calls == ["init", "shutdown"]  # initialised per call, shut down after


def test_fields_not_supported_become_none() -> None:
    gpu = dict(A6000)
    for key in ("util", "power_mw", "limit_mw", "throttle", "persistence", "mig", "temp"):
        gpu[key] = pynvml.NVMLError_NotSupported
    gpu["graphics"] = pynvml.NVMLError_NoPermission
    read = nvml.read(fake_nvml([gpu])).gpus[0]
    assert read.utilization_gpu_pct is None and read.power_draw_w is None
    assert read.throttle_reasons is None and read.mig_mode is None and read.temperature_c is None
    assert read.memory_used_mib == 1024.0
    assert [p.pid for p in read.processes] == [100]


def test_gpu_fell_off_the_bus_is_a_row_that_says_so() -> None:
    lost = dict(A6000, memory=pynvml.NVMLError_GpuIsLost)
    view = nvml.read(fake_nvml([A6000, lost, A6000]))
    assert [g.lost for g in view.gpus] == [False, True, False]
    assert view.gpus[1].error == nvml.GPU_LOST and view.gpus[1].processes == []
    assert view.gpus[1].name == "NVIDIA RTX A6000"  # what was read before it went


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (pynvml.NVMLError_LibraryNotFound, "no NVIDIA driver"),
        (pynvml.NVMLError_DriverNotLoaded, "not loaded"),
        (pynvml.NVMLError_NoPermission, "no permission"),
        (pynvml.NVMLError_Unknown, "NVML failed to start"),
    ],
)
def test_init_failures_are_one_line(error: type[Exception], needle: str) -> None:
    view = nvml.read(fake_nvml([], init_error=error))
    assert not view.available and needle in (view.error or "")
