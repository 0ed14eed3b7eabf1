"""Doctor's second NVML look (`nvml.read_health`, via `probes.read_nvml`). No GPU here, so the
readings come from the pynvml stand-in in test_queue_nvml (pynvml's own error classes and
constants); the recorded doctor fixtures are replayed through it to show the live reader
produces the same facts, field for field."""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any

import pynvml
import pytest

from deskgpu import nvml
from deskgpu.config import load_config
from deskgpu.doctor.checks import run_checks
from deskgpu.doctor.facts import GpuReading, HostFacts, NvmlFacts
from deskgpu.doctor.probes import read_nvml
from tests.test_doctor_checks import BOX_CONFIG, FIXTURES
from tests.test_queue_nvml import MIB, fake_nvml

NotSupported = pynvml.NVMLError_NotSupported
UNC = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
SBE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
DBE = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
SLOWDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
SHUTDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
SYSTEM = {
    "nvmlSystemGetNVMLVersion": "12.550.90.07",
    "nvmlSystemGetCudaDriverVersion_v2": 12040,
}


def a100(**changes: Any) -> dict[str, Any]:
    """An ECC-on A100 (Ampere: remapped rows, no page retirement), three thermal looks."""
    gpu: dict[str, Any] = {
        "uuid": "GPU-a100",
        "name": b"NVIDIA A100-SXM4-80GB",
        "memory": types.SimpleNamespace(used=0, total=81920 * MIB),
        "util": types.SimpleNamespace(gpu=0),
        "limit_mw": 400_000,
        "persistence": 1,
        "mig": (0, 0),
        "compute": [],
        "graphics": [],
        "pci": types.SimpleNamespace(busId=b"00000000:07:00.0"),
        "ecc_mode": (1, 1),
        "ecc_errors": {
            (UNC, pynvml.NVML_VOLATILE_ECC): 0,
            (UNC, pynvml.NVML_AGGREGATE_ECC): 2,
        },
        "retired_pages": NotSupported,
        "retired_pending": NotSupported,
        "remapped_rows": (3, 1, 1, 0),  # a reset is pending
        "thresholds": {SLOWDOWN: 87, SHUTDOWN: 92},
        # First value: `read()`'s look; then one per sample.
        "temp": iter([70, 86, 88, 88]),
        "throttle": iter([0, 0x20, 0x20 | 0x40, 0x20]),
        "power_mw": iter([300_000, 350_000, 340_250, 330_000]),
    }
    gpu.update(changes)
    return gpu


def test_health_readings_named_and_converted_like_nvidia_smi() -> None:
    fake = fake_nvml([a100()], system=SYSTEM)
    facts = read_nvml(samples=3, interval_s=0.01, lib=fake)
    assert (facts.available, facts.error) == (True, None)
    assert (facts.nvml_version, facts.cuda_driver_version) == ("12.550.90.07", "12.4")
    gpu = facts.gpus[0]
    assert (gpu.name, gpu.pci_bus_id, gpu.error) == (
        "NVIDIA A100-SXM4-80GB",
        "00000000:07:00.0",
        None,
    )
    assert gpu.ecc_mode_current is True
    assert (gpu.ecc_errors_uncorrected_volatile, gpu.ecc_errors_uncorrected_aggregate) == (0, 2)
    assert (gpu.retired_pages_sbe, gpu.retired_pages_dbe, gpu.retired_pages_pending) == (
        None,
        None,
        None,
    )
    assert (
        gpu.remapped_rows_correctable,
        gpu.remapped_rows_uncorrectable,
        gpu.remapped_rows_pending,
        gpu.remapped_rows_failure,
    ) == (3, 1, True, False)
    assert (gpu.temperature_slowdown_c, gpu.temperature_shutdown_c) == (87, 92)
    # Thermal throttle in every sample, raw mask kept; power in W like power.draw.
    assert [(s.temperature_c, s.clocks_event_reasons, s.power_draw_w) for s in gpu.samples] == [
        (86, 0x20, 350.0),
        (88, 0x60, 340.2),
        (88, 0x20, 330.0),
    ]
    at = [s.at_s for s in gpu.samples]
    assert at[0] == 0.0 and at == sorted(at) and at[2] >= 0.02  # spaced interval_s apart
    assert gpu.temperature_c == 88
    # Two looks, each initialising NVML and shutting it down again.
    assert fake.calls == ["init", "shutdown", "init", "shutdown"]


def test_ecc_and_retirement_not_supported_become_none() -> None:
    # A consumer card: no ECC at all, no page retirement, no row remapping, no thresholds.
    gpu = a100(
        ecc_mode=NotSupported,
        retired_pages=NotSupported,
        remapped_rows=NotSupported,
        thresholds=pynvml.NVMLError_NoPermission,
    )
    fake = fake_nvml([gpu], system=SYSTEM)
    read = read_nvml(samples=1, interval_s=0, lib=fake).gpus[0]
    assert read.ecc_mode_current is None
    assert read.ecc_errors_uncorrected_volatile is None
    assert ("nvmlDeviceGetTotalEccErrors", 0) not in fake.queries  # not asked without ECC
    assert (read.retired_pages_sbe, read.remapped_rows_correctable) == (None, None)
    assert (read.temperature_slowdown_c, read.temperature_shutdown_c) == (None, None)
    assert read.pci_bus_id == "00000000:07:00.0" and read.error is None
    assert [(s.temperature_c, s.clocks_event_reasons) for s in read.samples] == [(86, 0x20)]


def test_pre_ampere_retired_pages_counted_by_cause() -> None:
    gpu = a100(
        retired_pages={SBE: [0x1000, 0x2000], DBE: [0x3000]},
        retired_pending=1,
        remapped_rows=NotSupported,
        ecc_mode=(0, 0),
    )
    read = read_nvml(samples=1, interval_s=0, lib=fake_nvml([gpu], system=SYSTEM)).gpus[0]
    assert (read.retired_pages_sbe, read.retired_pages_dbe, read.retired_pages_pending) == (
        2,
        1,
        True,
    )
    assert read.ecc_mode_current is False and read.ecc_errors_uncorrected_aggregate is None


def test_an_odd_nvml_error_costs_one_reading_not_the_rest() -> None:
    # `read()` fails whole on an unexpected NVML error; doctor's extras just miss that one.
    gpu = a100(remapped_rows=pynvml.NVMLError_InvalidArgument)
    read = read_nvml(samples=1, interval_s=0, lib=fake_nvml([gpu], system=SYSTEM)).gpus[0]
    assert read.remapped_rows_correctable is None
    assert (read.temperature_slowdown_c, read.ecc_errors_uncorrected_aggregate) == (87, 2)


def test_gpu_lost_on_the_first_look_is_not_asked_again() -> None:
    lost = a100(memory=pynvml.NVMLError_GpuIsLost)
    fake = fake_nvml([a100(), lost], system=SYSTEM)
    facts = read_nvml(samples=2, interval_s=0, lib=fake)
    assert [g.error for g in facts.gpus] == [None, nvml.GPU_LOST]
    assert facts.gpus[1].samples == [] and facts.gpus[1].pci_bus_id is None
    assert len(facts.gpus[0].samples) == 2
    asked_gpu1 = [fn for fn, handle in fake.queries if handle == 1]
    assert asked_gpu1 == ["nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo"]


def test_gpu_lost_between_the_looks_says_so() -> None:
    # Answered `read()`, then fell off the bus reading remapped rows: what came before stays.
    gpu = a100(remapped_rows=pynvml.NVMLError_GpuIsLost)
    fake = fake_nvml([gpu, a100()], system=SYSTEM)
    facts = read_nvml(samples=2, interval_s=0, lib=fake)
    lost = facts.gpus[0]
    assert lost.error == nvml.GPU_LOST
    assert (lost.pci_bus_id, lost.ecc_errors_uncorrected_aggregate) == ("00000000:07:00.0", 2)
    assert lost.temperature_slowdown_c is None and lost.samples == []
    assert facts.gpus[1].error is None and len(facts.gpus[1].samples) == 2
    after = fake.queries.index(("nvmlDeviceGetRemappedRows", 0))
    assert all(handle != 0 for _, handle in fake.queries[after + 1 :])


def test_gpu_lost_mid_sampling_keeps_the_samples_it_gave() -> None:
    gpu = a100(temp=iter([70, 86, pynvml.NVMLError_GpuIsLost]))
    facts = read_nvml(samples=3, interval_s=0, lib=fake_nvml([gpu], system=SYSTEM))
    read = facts.gpus[0]
    assert read.error == nvml.GPU_LOST
    assert [(s.temperature_c, s.clocks_event_reasons) for s in read.samples] == [(86, 0x20)]
    assert read.remapped_rows_correctable == 3


def test_older_binding_throttle_reasons_and_cuda_version() -> None:
    # nvidia-ml-py < 12.535: no ClocksEventReasons, no CudaDriverVersion_v2, no NVML version.
    fake = fake_nvml([a100()], system={"nvmlSystemGetCudaDriverVersion": 11080})
    del fake.nvmlDeviceGetCurrentClocksEventReasons
    facts = read_nvml(samples=2, interval_s=0, lib=fake)
    assert (facts.cuda_driver_version, facts.nvml_version) == ("11.8", None)
    assert [s.clocks_event_reasons for s in facts.gpus[0].samples] == [0x20, 0x60]


def test_nvml_gone_on_the_second_look_is_recorded() -> None:
    fake = fake_nvml([a100()], system=SYSTEM)
    first_init = fake.nvmlInit

    def init_once() -> None:
        first_init()
        if fake.calls.count("init") > 1:
            raise pynvml.NVMLError_DriverNotLoaded()

    fake.nvmlInit = init_once
    facts = read_nvml(samples=1, interval_s=0, lib=fake)
    assert facts.available and facts.gpus[0].name == "NVIDIA A100-SXM4-80GB"
    assert facts.error == "NVML failed on the second look: Driver Not Loaded"
    assert facts.gpus[0].samples == [] and facts.cuda_driver_version is None


def test_read_health_alone_reads_every_gpu() -> None:
    fake = fake_nvml([a100(temp=iter([40])), a100(ecc_mode=NotSupported)], system=SYSTEM)
    health = nvml.read_health(samples=1, interval_s=0, lib=fake)
    assert health.available and [g.index for g in health.gpus] == [0, 1]
    assert [g.ecc_mode_current for g in health.gpus] == [True, None]
    assert health.gpus[0].samples[0].temperature_c == 40
    assert fake.calls == ["init", "shutdown"]


def test_no_driver_reads_no_health() -> None:
    health = nvml.read_health(
        samples=1, interval_s=0, lib=fake_nvml([], pynvml.NVMLError_LibraryNotFound)
    )
    assert not health.available and health.gpus == []
    assert health.error == str(pynvml.NVMLError_LibraryNotFound())


# ---------------------------------------------------------------------------------------
# The recorded boxes, replayed through the live reader.


def _stand_in(recorded: NvmlFacts) -> Any:
    def supported(value: Any) -> Any:
        return NotSupported if value is None else value

    def looks(first: Any, values: list[Any]) -> Any:
        return iter([supported(v) for v in [first, *values]])

    def entry(g: GpuReading) -> dict[str, Any]:
        temps = [s.temperature_c for s in g.samples]
        masks = [s.clocks_event_reasons for s in g.samples]
        draws = [
            None if s.power_draw_w is None else round(s.power_draw_w * 1000) for s in g.samples
        ]
        sbe, dbe = g.retired_pages_sbe, g.retired_pages_dbe
        rows = (
            g.remapped_rows_correctable,
            g.remapped_rows_uncorrectable,
            g.remapped_rows_pending,
            g.remapped_rows_failure,
        )
        return {
            "uuid": g.uuid,
            "name": (g.name or "").encode(),
            "memory": types.SimpleNamespace(used=0, total=round((g.memory_total_mib or 0) * MIB)),
            "util": types.SimpleNamespace(gpu=0),
            "limit_mw": supported(
                None if g.power_limit_w is None else round(g.power_limit_w * 1000)
            ),
            "persistence": supported(
                None if g.persistence_mode is None else int(g.persistence_mode)
            ),
            "mig": NotSupported,
            "compute": [],
            "graphics": [],
            "pci": types.SimpleNamespace(busId=(g.pci_bus_id or "").encode()),
            "ecc_mode": NotSupported
            if g.ecc_mode_current is None
            else (int(g.ecc_mode_current),) * 2,
            "ecc_errors": {
                (UNC, pynvml.NVML_VOLATILE_ECC): supported(g.ecc_errors_uncorrected_volatile),
                (UNC, pynvml.NVML_AGGREGATE_ECC): supported(g.ecc_errors_uncorrected_aggregate),
            },
            "retired_pages": NotSupported
            if sbe is None or dbe is None
            else {SBE: [0] * sbe, DBE: [0] * dbe},
            "retired_pending": supported(g.retired_pages_pending),
            "remapped_rows": NotSupported if None in rows else rows,
            "thresholds": {
                SLOWDOWN: supported(g.temperature_slowdown_c),
                SHUTDOWN: supported(g.temperature_shutdown_c),
            },
            "temp": looks(temps[0], temps),
            "throttle": looks(masks[0], masks),
            "power_mw": looks(draws[0], draws),
        }

    major, minor = (recorded.cuda_driver_version or "0.0").split(".")
    fake = fake_nvml(
        [entry(g) for g in recorded.gpus],
        system={
            "nvmlSystemGetNVMLVersion": recorded.nvml_version,
            "nvmlSystemGetCudaDriverVersion_v2": int(major) * 1000 + int(minor) * 10,
        },
    )
    fake.nvmlSystemGetDriverVersion = lambda: recorded.driver_version
    return fake


def _without_times(doc: dict[str, Any]) -> dict[str, Any]:
    for gpu in doc["gpus"]:
        for sample in gpu["samples"]:
            del sample["at_s"]
    return doc


RECORDED_WITH_GPUS = sorted(
    p.name for p in FIXTURES.glob("*.json") if json.loads(p.read_text())["nvml"]["available"]
)


@pytest.mark.parametrize("name", RECORDED_WITH_GPUS)
def test_recorded_box_replayed_through_the_live_reader_gives_the_same_facts(name: str) -> None:
    recorded = HostFacts.from_dict(json.loads((FIXTURES / name).read_text()))
    live = read_nvml(samples=3, interval_s=0, lib=_stand_in(recorded.nvml))
    assert _without_times(dataclasses.asdict(live)) == _without_times(
        dataclasses.asdict(recorded.nvml)
    )
    # And doctor reaches the same verdicts from them.
    config = load_config(BOX_CONFIG)
    replayed = dataclasses.replace(recorded, nvml=live)
    assert [(c.id, c.status, c.detail) for c in run_checks(replayed, config)] == [
        (c.id, c.status, c.detail) for c in run_checks(recorded, config)
    ]
