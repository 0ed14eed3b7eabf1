"""`deskgpu queue` live: on this GPU-less box, against no API server and a real one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deskgpu import nvml
from deskgpu import queue as survey
from deskgpu.config import HostConfig
from deskgpu.snapshot import NvmlView, SkyView, Snapshot

SNAPSHOTS = Path(__file__).parent / "fixtures" / "snapshots"
HAS_DRIVER = nvml.read().available
no_driver = pytest.mark.skipif(HAS_DRIVER, reason="describes a host with no NVIDIA driver")


def recorded(name: str) -> Snapshot:
    return Snapshot.from_dict(json.loads((SNAPSHOTS / f"{name}.json").read_text()))


def deskgpu(*args: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in its own process: the SkyPilot SDK caches its server URL in-process,
    so an in-process call against a dead endpoint would poison later tests."""
    import os

    env = {**os.environ, "SKYPILOT_API_SERVER_ENDPOINT": endpoint, "COLUMNS": "120"}
    exe = str(Path(sys.executable).with_name("deskgpu"))
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300)


@no_driver
def test_no_gpu_and_no_api_server_exits_1_with_two_clear_lines(hermetic) -> None:
    result = deskgpu("queue", endpoint=hermetic.dead.url)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert "no NVIDIA driver" in lines[0]
    assert lines[1].startswith("deskgpu: SkyPilot: ") and "unreachable" in lines[1]
    assert "GPUs unknown" in result.stdout


@no_driver
def test_no_gpu_and_no_api_server_json_still_prints_the_document(hermetic) -> None:
    result = deskgpu("queue", "--json", endpoint=hermetic.dead.url)
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["nvml"]["available"] is False and doc["sky"]["available"] is False
    assert doc["summary"]["gpus_total"] is None


def test_gpu_table_appears_when_skypilot_is_unreachable(cli, monkeypatch) -> None:
    _fake_live(monkeypatch, "sky_unreachable")  # recorded halves: GPUs yes, SkyPilot no
    result = cli("queue")
    assert result.exit_code == 0
    assert "RTX A6000" in result.stdout and "1 of 2 GPUs free" in result.stdout
    assert result.stderr.count("\n") == 1 and "unreachable" in result.stderr


def test_gpu_half_is_painted_before_waiting_on_skypilot() -> None:
    painted = threading.Event()
    order: list[str] = []

    def slow_sky(_config: HostConfig) -> SkyView:
        assert painted.wait(10), "SkyPilot was awaited before the GPU half was painted"
        order.append("sky")
        return SkyView(available=True)

    def paint(_snap: Snapshot) -> None:
        order.append("gpus")
        painted.set()

    sources = survey.Sources(read_nvml=lambda: NvmlView(available=True), fetch_sky=slow_sky)
    snap = survey.take(HostConfig(), sources, on_gpus=paint)
    assert order == ["gpus", "sky"] and snap.sky.available


def test_skypilot_that_never_answers_is_a_line_not_a_hang() -> None:
    release = threading.Event()
    entered = threading.Event()

    def hang(_config: HostConfig) -> SkyView:
        entered.set()
        release.wait(60)  # answers only once the test has its snapshot
        raise AssertionError("too late")

    sources = survey.Sources(read_nvml=lambda: NvmlView(available=True), fetch_sky=hang)
    try:
        snap = survey.take(HostConfig(), sources, sky_timeout_s=0.2)
        # take() returned while SkyPilot was still asked and had not answered: no hang.
        assert entered.is_set() and not release.is_set()
    finally:
        release.set()
    assert not snap.sky.available and "did not answer within 0.2 s" in (snap.sky.error or "")


def test_skypilot_bug_is_data_not_a_traceback() -> None:
    def broken(_config: HostConfig) -> SkyView:
        raise KeyError("handle")

    sources = survey.Sources(read_nvml=lambda: NvmlView(available=True), fetch_sky=broken)
    snap = survey.take(HostConfig(), sources)
    assert "KeyError" in (snap.sky.error or "")


def _fake_live(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Live sources replaced by a recorded snapshot's halves (no sky import, no NVML)."""
    from deskgpu import nvml
    from deskgpu.skypilot import sdk as skyapi

    snap = recorded(name)
    monkeypatch.setattr(nvml, "read", lambda: snap.nvml)
    monkeypatch.setattr(skyapi, "fetch_queue", lambda _config, **_kw: snap.sky)


def test_watch_json_prints_one_document_per_refresh(cli, monkeypatch) -> None:
    _fake_live(monkeypatch, "busy_box")
    ticks = iter([None])

    def sleep(_s: float) -> None:
        if next(ticks, "stop") == "stop":
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    result = cli("queue", "--watch", "--json")
    assert result.exit_code == 0
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(docs) == 2 and docs[0]["summary"]["queued"] == 3


def test_watch_table_refreshes_until_ctrl_c(cli, monkeypatch, tmp_path: Path) -> None:
    _fake_live(monkeypatch, "busy_box")

    def sleep(_s: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    out = tmp_path / "last.json"
    result = cli("queue", "--watch", "--record", str(out))
    assert result.exit_code == 0
    assert "2 of 4 GPUs free · 3 queued · 1 zombie suspect" in result.stdout
    assert Snapshot.from_dict(json.loads(out.read_text())).sky.jobs


def test_record_to_an_unwritable_place_is_a_usage_error(cli, tmp_path: Path) -> None:
    result = cli(
        "queue",
        "--snapshot",
        str(SNAPSHOTS / "busy_box.json"),
        "--record",
        str(tmp_path / "missing-dir" / "x.json"),
    )
    assert result.exit_code == 2 and "to write the snapshot in" in result.stderr


def test_help_and_core_imports_stay_light() -> None:
    code = (
        "import sys, deskgpu.cli, deskgpu.cli.queue, deskgpu.queue, deskgpu.snapshot, "
        "deskgpu.attribution, deskgpu.nvml, deskgpu.skypilot.sdk;"
        "bad = [m for m in ('sky', 'pynvml', 'kubernetes') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.apiserver
def test_real_api_server_and_no_gpu(sky_api_server: str, tmp_path: Path) -> None:
    """The whole CLI in a subprocess against a real local API server (no infra, no jobs)."""
    record = tmp_path / "seen.json"
    # The fixture warmed the server up; a loaded 2-core machine may still answer slowly.
    result = deskgpu(
        "queue", "--json", "--record", str(record), "--timeout", "240", endpoint=sky_api_server
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["sky"]["available"] is True, doc["sky"]
    assert doc["sky"]["jobs"] == [] and doc["sky"]["endpoint"] == sky_api_server
    assert "Traceback" not in result.stderr
    assert json.loads(record.read_text()) == doc
    tables = deskgpu("queue", endpoint=sky_api_server)
    assert tables.returncode == 0, tables.stderr
    assert "0 queued · 0 zombie suspects" in tables.stdout
    assert "Jobs: none queued or running" in tables.stdout
    if not HAS_DRIVER:
        assert "no NVIDIA driver" in result.stderr
        assert "GPUs unknown · 0 queued" in tables.stdout
