"""Shared fixtures and the suite's hermetic guarantees.

Every test gets its own HOME, a host config of its own and a SkyPilot API server endpoint on
a dead loopback port (bound for the session, never listening: connections are refused at
once), unless it asks for `sky_api_server`, a real server this session started on a free
port. Nothing reaches a server the suite did not start: at the end of the run the session
fails if anything connected to the box's production port (127.0.0.1:46580), or if a process
the suite started (anything with a HOME under the session's temporary directory) is still
running.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from typer.testing import CliRunner

from tests.apiserver import BackgroundApiServer
from tests.guards import PortRecorder, leftover_processes

# Property tests and fuzzers check the same examples on every run (CI is not a lottery);
# `DESKGPU_HYPOTHESIS=explore uv run pytest ...` draws new ones to hunt for bugs.
hypothesis_settings.register_profile("deskgpu", derandomize=True, database=None)
hypothesis_settings.register_profile("explore", derandomize=False, max_examples=2000)
hypothesis_settings.load_profile(os.environ.get("DESKGPU_HYPOTHESIS", "deskgpu"))

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HOST_CONFIG = EXAMPLES / "host-config.yaml"

# The developer's own settings must not reach the suite: an endpoint or SkyPilot config in
# the shell would point tests at a real server, a KUBECONFIG at a real cluster.
_SCRUBBED_PREFIXES = ("SKYPILOT_", "SKY_", "DESKGPU_")
_SCRUBBED = ("KUBECONFIG", "IS_SKYPILOT_SERVER")

_recorder = pytest.StashKey[PortRecorder]()
_server = pytest.StashKey[BackgroundApiServer]()
_findings = pytest.StashKey[list[str]]()


def _scrub(environ: os._Environ[str]) -> None:
    for key in list(environ):
        if key.startswith(_SCRUBBED_PREFIXES) or key in _SCRUBBED:
            del environ[key]


def pytest_configure(config: pytest.Config) -> None:
    _scrub(os.environ)
    os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
    # A SIGTERM (a CI timeout, `kill`) tears down like Ctrl-C: fixtures' finally blocks run,
    # so the API server started for the session does not outlive pytest.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def pytest_sessionstart(session: pytest.Session) -> None:
    # Imports during collection (SkyPilot reads HOME) already see a private HOME.
    factory: pytest.TempPathFactory = session.config._tmp_path_factory  # type: ignore[attr-defined]
    os.environ["HOME"] = str(factory.mktemp("collection-home"))
    recorder = PortRecorder()
    recorder.start()
    session.config.stash[_recorder] = recorder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the real API server run last, so its start overlaps with all the others."""
    items.sort(key=lambda item: "sky_api_server" in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the session's API server now, in the background, if a selected test needs it:
    its cold start and warm-up (about 25 s on a 2-core machine) overlap with the other tests."""
    if session.config.option.collectonly:
        return
    if any("sky_api_server" in getattr(item, "fixturenames", ()) for item in session.items):
        factory: pytest.TempPathFactory = session.config._tmp_path_factory  # type: ignore[attr-defined]
        home = factory.mktemp("sky-server-home")
        session.config.stash[_server] = BackgroundApiServer(home).start()


@pytest.fixture(autouse=True, scope="session")
def _cli_grammar() -> None:
    """doctor judges scheduled deskgpu lines with the CLI's grammar, which the CLI hands it
    (`deskgpu doctor` does at start); tests that call doctor's functions directly get it here."""
    import typer.main

    from deskgpu.cli import app
    from deskgpu.cli.grammar import TyperGrammar
    from deskgpu.doctor.scheduled import use_grammar

    use_grammar(TyperGrammar(typer.main.get_command(app)))


@pytest.fixture(autouse=True, scope="session")
def _session_guards(request: pytest.FixtureRequest) -> Iterator[None]:
    """Set up before any other fixture, so torn down after all of them (the API server too):
    then nothing may have touched the production port, and nothing may be left running."""
    yield
    config = request.config
    server = config.stash.get(_server, None)
    if server is not None:  # started, even if the tests that wanted it never ran (-x)
        server.stop()
    findings: list[str] = []
    recorder = config.stash.get(_recorder, None)
    if recorder is not None:
        recorder.stop()
        findings += [
            f"connection to the production API server port: {c}" for c in recorder.connections
        ]
    factory: pytest.TempPathFactory = config._tmp_path_factory  # type: ignore[attr-defined]
    findings += [
        f"left running, now killed: {p}" for p in leftover_processes(factory.getbasetemp())
    ]
    config.stash[_findings] = findings
    if findings:
        pytest.fail("the suite was not hermetic:\n" + "\n".join(findings), pytrace=False)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    recorder = config.stash.get(_recorder, None)
    findings = config.stash.get(_findings, None)
    if recorder is None:
        return
    terminalreporter.section("hermetic suite")
    for note in recorder.notes:
        terminalreporter.write_line(f"note: {note}")
    if findings is None:  # no test ran, so _session_guards never did
        recorder.stop()
        terminalreporter.write_line("not checked: no test ran")
        return
    for finding in findings:
        terminalreporter.write_line(f"FAIL: {finding}", red=True)
    if not findings:
        port = recorder.port
        held = f"held {port} and saw no connection" if recorder.holding else f"{port} not held"
        terminalreporter.write_line(f"ok: {held}; no process of this session left running")


@dataclass(frozen=True)
class DeadPorts:
    """Two loopback ports bound for the session (nobody else can take them), never listening.

    `url` is the endpoint every test is pointed at: a configured server that is down.
    `local_port` stands in for SkyPilot's default local server port (46580 on the box) via
    SKYPILOT_API_SERVER_LOCAL_PORT, so "the default local server" is dead too.
    """

    port: int
    local_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"


@pytest.fixture(scope="session")
def dead_ports() -> Iterator[DeadPorts]:
    with socket.socket() as endpoint, socket.socket() as local:
        endpoint.bind(("127.0.0.1", 0))
        local.bind(("127.0.0.1", 0))
        yield DeadPorts(int(endpoint.getsockname()[1]), int(local.getsockname()[1]))


@dataclass(frozen=True)
class Hermetic:
    """What the autouse fixture set for this test."""

    home: Path
    host_config: Path
    endpoint: str
    dead: DeadPorts

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """A minimal environment for a child process that keeps the test's isolation: this
        test's HOME and host config (never /etc/deskgpu/config.yaml), no endpoint unless
        `extra` names one, and SkyPilot's default local port on a dead one."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "DESKGPU_CONFIG": str(self.host_config),
            "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
            "SKYPILOT_API_SERVER_LOCAL_PORT": str(self.dead.local_port),
        }
        env.update(extra)
        return env


@pytest.fixture(autouse=True)
def hermetic(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    dead_ports: DeadPorts,
) -> Iterator[Hermetic]:
    """Own HOME, own host config, endpoint on the dead port (or on `sky_api_server`).

    SKYPILOT_API_SERVER_LOCAL_PORT moves SkyPilot's idea of "the default local server" off
    46580 too, so even a child started with a bare environment built from `subprocess_env`
    has nothing real to fall back on. Each test also starts from the same environment and
    SkyPilot client state: deskgpu's CLI sets SkyPilot variables in os.environ (fine for a
    process that exits), and the SkyPilot SDK caches its server URL for the life of the process.
    """
    if "sky_api_server" in request.fixturenames:
        endpoint = str(request.getfixturevalue("sky_api_server"))
    else:
        endpoint = dead_ports.url
    home = tmp_path_factory.mktemp("home")
    host_config = home / "deskgpu-host-config.yaml"
    host_config.write_text(
        "# Written by tests/conftest.py for one test: its only SkyPilot API server.\n"
        f"api_server: {endpoint}\n"
    )
    saved = dict(os.environ)
    os.environ.update(
        {
            "HOME": str(home),
            "DESKGPU_CONFIG": str(host_config),
            "SKYPILOT_API_SERVER_ENDPOINT": endpoint,
            "SKYPILOT_API_SERVER_LOCAL_PORT": str(dead_ports.local_port),
            "SKYPILOT_DISABLE_LOCAL_API_SERVER": "1",
        }
    )
    _forget_skypilot_server_url()
    yield Hermetic(home, host_config, endpoint, dead_ports)
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


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A temporary directory every account may search, as /opt is: pytest's own (under
    /tmp/pytest-of-<user>, mode 0700) is one the box's `skypilot` account could not enter,
    and `setup render` refuses a --python there. Removed afterwards."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="deskgpu-world-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def installed_tools(world_tmp: Path) -> list[str]:
    """`--python P --deskgpu D` for `deskgpu setup render`: executables laid out as
    docs/setup.md step 3 installs deskgpu (`<venv>/bin/{python,deskgpu}`), outside any source
    checkout (the command refuses the suite's own `.venv`) and where the API server's account
    may run them. They only exit 0: nothing here runs them."""
    bin_dir = world_tmp / "opt-deskgpu" / "bin"
    bin_dir.mkdir(parents=True, mode=0o755)
    bin_dir.parent.chmod(0o755)  # mkdir's mode is cut by the umask
    bin_dir.chmod(0o755)
    for name in ("python", "deskgpu"):
        program = bin_dir / name
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    return ["--python", str(bin_dir / "python"), "--deskgpu", str(bin_dir / "deskgpu")]


@pytest.fixture(scope="session")
def sky_api_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A real SkyPilot API server on 127.0.0.1 (no infra enabled), one for the whole session,
    on a free port with a private HOME (tests/apiserver.py), warmed up; yields its URL.

    Started in the background at the end of collection (`pytest_collection_finish`).
    """
    server = request.config.stash.get(_server, None)
    if server is None:  # asked for without being seen at collection: start it now
        factory: pytest.TempPathFactory = request.config._tmp_path_factory  # type: ignore[attr-defined]
        server = BackgroundApiServer(factory.mktemp("sky-server-home")).start()
        request.config.stash[_server] = server
    try:
        yield server.url()
    finally:
        server.stop()


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
