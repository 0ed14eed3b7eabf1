"""Shared fixtures: a private HOME for SkyPilot, the example host config, the real CLI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.apiserver import running_api_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HOST_CONFIG = EXAMPLES / "host-config.yaml"


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """SkyPilot writes under $HOME and may phone home: neither in tests."""
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("HOME", "SKYPILOT_DISABLE_USAGE_COLLECTION")}
    os.environ["HOME"] = str(home)
    os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
    os.environ.pop("DESKGPU_CONFIG", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    """Each test starts from the same environment and SkyPilot client state.

    deskgpu's CLI sets SkyPilot variables in os.environ (fine for a process that exits), and
    the SkyPilot SDK caches its server URL for the life of the process.
    """
    saved = dict(os.environ)
    _forget_skypilot_server_url()
    yield
    os.environ.clear()
    os.environ.update(saved)
    _forget_skypilot_server_url()


def _forget_skypilot_server_url() -> None:
    import sys

    common = sys.modules.get("sky.server.common")
    if common is not None:
        for name in ("get_server_url", "is_api_server_local"):
            getattr(common, name).cache_clear()


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def cli(runner: CliRunner, monkeypatch: pytest.MonkeyPatch):
    """Run the real CLI in-process; returns typer's Result (stdout and stderr kept apart)."""
    from deskgpu.cli import app

    monkeypatch.setenv("COLUMNS", "120")

    def run(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    return run


@pytest.fixture(scope="session")
def sky_api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real SkyPilot API server on 127.0.0.1 (no infra enabled), one for the whole session,
    on a free port with a private HOME (tests/apiserver.py); yields its URL."""
    with running_api_server(tmp_path_factory.mktemp("sky-server-home")) as url:
        yield url


@pytest.fixture(scope="session")
def _replay_server() -> Iterator[object]:
    from tests.skyreplay import replaying

    with replaying() as server:
        yield server


@pytest.fixture
def sky_replay(_replay_server, monkeypatch: pytest.MonkeyPatch):
    """A SkyPilot API server on 127.0.0.1 that replays recordings (`sky_replay.load(path)`).

    One server for the whole session: the SkyPilot SDK caches its server URL in-process.
    """
    monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", _replay_server.url)
    monkeypatch.setenv("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
    return _replay_server
