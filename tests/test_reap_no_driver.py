"""`deskgpu reap` and `deskgpu observe` on a host with no NVIDIA driver (this box): one clean
line and exit 1, from the GPU half alone. SkyPilot is never asked: the endpoint below is a
real socket that counts connections (before, both commands imported SkyPilot and waited on
its API server, up to 30 s, before noticing there were no GPUs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deskgpu import nvml
from deskgpu import queue as survey
from deskgpu.config import HostConfig
from deskgpu.nvml import NO_DRIVER
from deskgpu.snapshot import NvmlView, SkyView

REAP_FIXTURES = Path(__file__).parent / "fixtures" / "reap"
ONE_LINE = f"deskgpu: no GPU readings: {NO_DRIVER}\n"

no_driver = pytest.mark.skipif(
    nvml.read().available, reason="this host has an NVIDIA driver: the no-driver path needs none"
)


class Listener:
    """An 'API server' that accepts and counts connections, and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture
def api_server() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.sock.close()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"box_name": "testbox", "state_dir": str(tmp_path / "state")}))
    return path


def deskgpu(*args: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SKYPILOT_API_SERVER_ENDPOINT": endpoint, "COLUMNS": "120"}
    exe = str(Path(sys.executable).with_name("deskgpu"))
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300)


@no_driver
@pytest.mark.parametrize(
    "args",
    [("reap",), ("reap", "--json"), ("reap", "--quiet"), ("observe",), ("observe", "--json")],
    ids=" ".join,
)
def test_no_driver_is_one_line_and_exit_1_without_asking_skypilot(
    args: tuple[str, ...], api_server: Listener, config_file: Path, tmp_path: Path
) -> None:
    result = deskgpu(*args, "--config", str(config_file), endpoint=api_server.url)
    assert result.returncode == 1
    assert result.stderr == ONE_LINE and result.stdout == ""
    assert api_server.connections == 0
    assert not (tmp_path / "state").exists()  # observe created no history


@no_driver
def test_no_driver_reap_yes_is_the_same_line(api_server: Listener, config_file: Path) -> None:
    result = deskgpu("reap", "--yes", "--config", str(config_file), endpoint=api_server.url)
    assert result.returncode == 1
    assert result.stderr == ONE_LINE and result.stdout == ""
    assert api_server.connections == 0


@no_driver
def test_recorded_evidence_needs_no_driver(api_server: Listener, config_file: Path) -> None:
    evidence = REAP_FIXTURES / "long_idle_debug_session.json"
    result = deskgpu(
        "reap", "--evidence", str(evidence), "--config", str(config_file), endpoint=api_server.url
    )
    assert result.returncode in (0, 3), result.stderr
    assert "no GPU readings" not in result.stderr and "Traceback" not in result.stderr
    assert api_server.connections == 0


def test_gpus_first_asks_skypilot_only_when_there_are_gpus() -> None:
    """What reap's and observe's live look does (`survey.take(require_gpus=True)`)."""
    asked: list[str] = []

    def sky(_config: HostConfig) -> SkyView:
        asked.append("sky")
        return SkyView(available=True)

    missing = survey.Sources(
        read_nvml=lambda: NvmlView(available=False, error=NO_DRIVER), fetch_sky=sky
    )
    snap = survey.take(HostConfig(), missing, require_gpus=True)
    assert asked == [] and not snap.sky.available and snap.nvml.error == NO_DRIVER
    present = survey.Sources(read_nvml=lambda: NvmlView(available=True), fetch_sky=sky)
    assert survey.take(HostConfig(), present, require_gpus=True).sky.available
    assert asked == ["sky"]
