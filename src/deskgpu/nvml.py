"""The only module that imports `pynvml` (nvidia-ml-py), and only inside functions.

`read()` initialises NVML, reads every GPU and the processes on it into plain
`snapshot` data, and shuts NVML down again: nothing happens at import time, and a test
or a long `--watch` never inherits a stale NVML handle. Every reading goes through
`_reading()`, which turns "not supported" / "no permission" into `None`; a lost GPU
becomes a row that says so (gpustat and nvitop learned both the hard way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from deskgpu.snapshot import (
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_POWER,
    THROTTLE_THERMAL,
    Gpu,
    GpuProcess,
    NvmlView,
)

T = TypeVar("T")
_MIB = 1024 * 1024

NO_DRIVER = "no NVIDIA driver on this host (libnvidia-ml.so not found): GPU table unavailable"
GPU_LOST = "GPU is lost (fell off the bus?): see `dmesg` for Xid 79; the host needs a reboot"


class _Lost(Exception):
    """The GPU stopped answering mid-read."""


def read(lib: ModuleType | None = None) -> NvmlView:
    """Every GPU and its processes, or an `NvmlView` that says why there are none.

    `lib` replaces the `pynvml` module only to inject failures NVML cannot produce here.
    """
    if lib is None:
        try:
            import pynvml as real
        except ImportError:  # pragma: no cover - nvidia-ml-py is a hard dependency
            return NvmlView(available=False, error="nvidia-ml-py is not installed")
        lib = real
    pynvml: ModuleType = lib
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NvmlView(available=False, error=_init_error(pynvml, exc))
    try:
        return _read_all(pynvml)
    except pynvml.NVMLError as exc:
        return NvmlView(available=False, error=f"NVML failed: {exc}")
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _init_error(pynvml: ModuleType, exc: Exception) -> str:
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return NO_DRIVER
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "the NVIDIA driver is not loaded (`nvidia-smi` fails too?): GPU table unavailable"
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "no permission to open the NVIDIA devices (/dev/nvidia*): GPU table unavailable"
    return f"NVML failed to start ({exc}): GPU table unavailable"


def _read_all(pynvml: ModuleType) -> NvmlView:
    driver = _text(_reading(pynvml, pynvml.nvmlSystemGetDriverVersion))
    count = int(pynvml.nvmlDeviceGetCount())
    view = NvmlView(available=True, driver_version=driver)
    for index in range(count):
        view.gpus.append(_read_gpu(pynvml, index))
    return view


def _read_gpu(pynvml: ModuleType, index: int) -> Gpu:
    gpu = Gpu(index=index)
    try:
        handle = _reading(pynvml, pynvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            gpu.error = "NVML returned no handle for this GPU"
            return gpu
        gpu.uuid = _text(_reading(pynvml, pynvml.nvmlDeviceGetUUID, handle))
        gpu.name = _text(_reading(pynvml, pynvml.nvmlDeviceGetName, handle))
        memory = _reading(pynvml, pynvml.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            gpu.memory_used_mib = round(memory.used / _MIB, 1)
            gpu.memory_total_mib = round(memory.total / _MIB, 1)
        rates = _reading(pynvml, pynvml.nvmlDeviceGetUtilizationRates, handle)
        gpu.utilization_gpu_pct = None if rates is None else int(rates.gpu)
        temp = _reading(pynvml, pynvml.nvmlDeviceGetTemperature, handle, 0)  # NVML_TEMPERATURE_GPU
        gpu.temperature_c = None if temp is None else int(temp)
        draw = _reading(pynvml, pynvml.nvmlDeviceGetPowerUsage, handle)
        gpu.power_draw_w = None if draw is None else round(draw / 1000, 1)
        limit = _reading(pynvml, pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        gpu.power_limit_w = None if limit is None else round(limit / 1000, 1)
        gpu.throttle_reasons = _throttle(pynvml, handle)
        persistence = _reading(pynvml, pynvml.nvmlDeviceGetPersistenceMode, handle)
        gpu.persistence_mode = None if persistence is None else bool(persistence)
        mig = _reading(pynvml, pynvml.nvmlDeviceGetMigMode, handle)
        gpu.mig_mode = None if mig is None else bool(mig[0])
        gpu.processes = _processes(pynvml, handle)
    except _Lost:
        gpu.lost = True
        gpu.error = GPU_LOST
        gpu.processes = []
    return gpu


def _reading(pynvml: ModuleType, fn: Callable[..., T], *args: Any) -> T | None:
    """One NVML query: a value, `None` when the GPU cannot say, `_Lost` when it is gone."""
    try:
        return fn(*args)
    except pynvml.NVMLError_GpuIsLost:
        raise _Lost() from None
    except (
        pynvml.NVMLError_NotSupported,
        pynvml.NVMLError_NoPermission,
        pynvml.NVMLError_FunctionNotFound,
        pynvml.NVMLError_NotFound,
        pynvml.NVMLError_Unknown,
    ):
        return None


def _throttle(pynvml: ModuleType, handle: Any) -> list[str] | None:
    getter = (
        getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons  # nvidia-ml-py < 12.535
    )
    mask = _reading(pynvml, getter, handle)
    if mask is None:
        return None
    reasons = []
    if mask & (0x20 | 0x40):  # SwThermalSlowdown | HwThermalSlowdown
        reasons.append(THROTTLE_THERMAL)
    if mask & (0x04 | 0x80):  # SwPowerCap | HwPowerBrakeSlowdown
        reasons.append(THROTTLE_POWER)
    if mask & 0x08:  # HwSlowdown
        reasons.append(THROTTLE_HW_SLOWDOWN)
    return reasons


def _processes(pynvml: ModuleType, handle: Any) -> list[GpuProcess]:
    """Compute then graphics processes; one PID once per GPU (`--query-compute-apps`)."""
    found: dict[int, GpuProcess] = {}
    for kind, getter in (
        ("compute", pynvml.nvmlDeviceGetComputeRunningProcesses),
        ("graphics", pynvml.nvmlDeviceGetGraphicsRunningProcesses),
    ):
        for proc in _reading(pynvml, getter, handle) or []:
            pid = int(proc.pid)
            used = getattr(proc, "usedGpuMemory", None)
            mib = None if used is None else round(used / _MIB, 1)
            if pid in found:
                continue
            found[pid] = GpuProcess(pid=pid, used_memory_mib=mib, type=kind)
    return list(found.values())


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
