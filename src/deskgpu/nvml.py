"""The only module that imports `pynvml` (nvidia-ml-py), and only inside functions.

`read()` initialises NVML, reads every GPU and the processes on it into plain
`snapshot` data, and shuts NVML down again: nothing happens at import time, and a test
or a long `--watch` never inherits a stale NVML handle. Every reading goes through
`_reading()`, which turns "not supported" / "no permission" into `None`; a lost GPU
becomes a row that says so (gpustat and nvitop learned both the hard way).

`read_health()` is doctor's second, slower look: ECC, retired pages, remapped rows,
slowdown thresholds and a few spaced thermal samples per GPU, as plain `Health` data.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------------------------
# Health: doctor's second look. Readings are named like `nvidia-smi --query-gpu=` fields.


@dataclass
class HealthSample:
    """One look at a GPU's thermals."""

    at_s: float  # seconds since the first sample
    temperature_c: int | None = None  # temperature.gpu
    clocks_event_reasons: int | None = None  # clocks_event_reasons.active (raw NVML bitmask)
    power_draw_w: float | None = None  # power.draw


@dataclass
class GpuHealth:
    """One GPU's health readings; `None` is "this GPU cannot say"."""

    index: int
    lost: bool = False  # stopped answering mid-read: readings after that point are missing
    pci_bus_id: str | None = None  # pci.bus_id
    ecc_mode_current: bool | None = None  # ecc.mode.current
    ecc_errors_uncorrected_volatile: int | None = None  # ecc.errors.uncorrected.volatile.total
    ecc_errors_uncorrected_aggregate: int | None = None  # ecc.errors.uncorrected.aggregate.total
    retired_pages_sbe: int | None = None  # retired_pages.sbe
    retired_pages_dbe: int | None = None  # retired_pages.dbe
    retired_pages_pending: bool | None = None  # retired_pages.pending
    remapped_rows_correctable: int | None = None  # remapped_rows.correctable
    remapped_rows_uncorrectable: int | None = None  # remapped_rows.uncorrectable
    remapped_rows_pending: bool | None = None  # remapped_rows.pending
    remapped_rows_failure: bool | None = None  # remapped_rows.failure
    temperature_slowdown_c: int | None = None  # the slowdown threshold
    temperature_shutdown_c: int | None = None  # the shutdown threshold
    samples: list[HealthSample] = field(default_factory=list)


@dataclass
class Health:
    """What `read_health()` saw; `available` is False (with `error`) when NVML did not start."""

    available: bool = False
    error: str | None = None
    nvml_version: str | None = None
    cuda_driver_version: str | None = None  # the CUDA version the driver supports, "12.4"
    gpus: list[GpuHealth] = field(default_factory=list)


def read_health(
    samples: int = 3,
    interval_s: float = 0.5,
    indices: Collection[int] | None = None,
    lib: ModuleType | None = None,
) -> Health:
    """ECC, retirement, thresholds and `samples` thermal looks `interval_s` apart, per GPU.

    `indices` limits the read to those GPUs (doctor passes the ones `read()` found healthy);
    `None` reads every GPU. `lib` replaces `pynvml` only to inject failures. Never raises.
    """
    if lib is None:
        try:
            import pynvml as real
        except ImportError:  # pragma: no cover - nvidia-ml-py is a hard dependency
            return Health(error="nvidia-ml-py is not installed")
        lib = real
    pynvml: ModuleType = lib
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Health(error=str(exc))
    try:
        return _read_health(pynvml, samples, interval_s, indices)
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _read_health(
    pynvml: ModuleType, samples: int, interval_s: float, indices: Collection[int] | None
) -> Health:
    health = Health(available=True)
    health.nvml_version = _text(_optional(pynvml, "nvmlSystemGetNVMLVersion"))
    cuda = _optional(pynvml, "nvmlSystemGetCudaDriverVersion_v2") or _optional(
        pynvml, "nvmlSystemGetCudaDriverVersion"
    )
    if isinstance(cuda, int) and cuda > 0:
        health.cuda_driver_version = f"{cuda // 1000}.{(cuda % 1000) // 10}"
    if indices is None:
        indices = range(int(_optional(pynvml, "nvmlDeviceGetCount") or 0))
    handles: list[tuple[GpuHealth, Any]] = []
    for index in indices:
        gpu = GpuHealth(index=index)
        health.gpus.append(gpu)
        try:
            handle = _optional(pynvml, "nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                continue
            _read_gpu_health(pynvml, gpu, handle)
        except _Lost:
            gpu.lost = True
            continue
        handles.append((gpu, handle))
    start = time.monotonic()
    for n in range(max(1, samples)):
        if n:
            time.sleep(interval_s)
        at = round(time.monotonic() - start, 2)
        for gpu, handle in handles:
            if gpu.lost:
                continue
            try:
                gpu.samples.append(_sample(pynvml, handle, at))
            except _Lost:
                gpu.lost = True
    return health


def _read_gpu_health(pynvml: ModuleType, gpu: GpuHealth, handle: Any) -> None:
    pci = _optional(pynvml, "nvmlDeviceGetPciInfo", handle)
    gpu.pci_bus_id = _text(getattr(pci, "busId", None))
    ecc = _optional(pynvml, "nvmlDeviceGetEccMode", handle)  # (current, pending)
    gpu.ecc_mode_current = None if ecc is None else bool(ecc[0])
    if gpu.ecc_mode_current:
        unc = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        gpu.ecc_errors_uncorrected_volatile = _int(
            _optional(pynvml, "nvmlDeviceGetTotalEccErrors", handle, unc, pynvml.NVML_VOLATILE_ECC)
        )
        gpu.ecc_errors_uncorrected_aggregate = _int(
            _optional(pynvml, "nvmlDeviceGetTotalEccErrors", handle, unc, pynvml.NVML_AGGREGATE_ECC)
        )
    sbe = _optional(
        pynvml,
        "nvmlDeviceGetRetiredPages",
        handle,
        pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
    )
    dbe = _optional(
        pynvml,
        "nvmlDeviceGetRetiredPages",
        handle,
        pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
    )
    gpu.retired_pages_sbe = None if sbe is None else len(sbe)
    gpu.retired_pages_dbe = None if dbe is None else len(dbe)
    pending = _optional(pynvml, "nvmlDeviceGetRetiredPagesPendingStatus", handle)
    gpu.retired_pages_pending = None if pending is None else bool(pending)
    rows = _optional(pynvml, "nvmlDeviceGetRemappedRows", handle)
    if rows is not None:
        corr, unc_rows, is_pending, failure = rows
        gpu.remapped_rows_correctable = int(corr)
        gpu.remapped_rows_uncorrectable = int(unc_rows)
        gpu.remapped_rows_pending = bool(is_pending)
        gpu.remapped_rows_failure = bool(failure)
    gpu.temperature_slowdown_c = _int(
        _optional(
            pynvml,
            "nvmlDeviceGetTemperatureThreshold",
            handle,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
        )
    )
    gpu.temperature_shutdown_c = _int(
        _optional(
            pynvml,
            "nvmlDeviceGetTemperatureThreshold",
            handle,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,
        )
    )


def _sample(pynvml: ModuleType, handle: Any, at: float) -> HealthSample:
    reasons = _optional(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", handle)
    if reasons is None:  # nvidia-ml-py < 12.535 names it "throttle reasons"
        reasons = _optional(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", handle)
    temp = _optional(pynvml, "nvmlDeviceGetTemperature", handle, pynvml.NVML_TEMPERATURE_GPU)
    power = _optional(pynvml, "nvmlDeviceGetPowerUsage", handle)
    return HealthSample(
        at_s=at,
        temperature_c=_int(temp),
        clocks_event_reasons=_int(reasons),
        power_draw_w=None if power is None else round(power / 1000, 1),
    )


def _optional(pynvml: ModuleType, name: str, *args: Any) -> Any:
    """A health reading through `_reading()`; one this binding or GPU lacks is `None`.

    Unlike `read()`'s table, any other NVML error is also `None` here: these readings are
    extras, and one odd answer must not cost doctor the rest. A lost GPU still raises `_Lost`.
    """
    fn = getattr(pynvml, name, None)
    if fn is None:
        return None
    try:
        return _reading(pynvml, fn, *args)  # a lost GPU raises `_Lost` through here
    except pynvml.NVMLError:
        return None


def _int(value: Any) -> int | None:
    return None if value is None else int(value)
