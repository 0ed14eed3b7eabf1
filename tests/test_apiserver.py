"""tests/apiserver.py: a test API server never takes the production port and leaves nothing
running on any way out of its block (the session's own server is checked at every run's end,
tests/guards.py). The `apiserver` tests start a real `python -m sky.server.server` each; the
health check is cut short where waiting for a full start would prove nothing more."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import apiserver
from tests.apiserver import PRODUCTION_PORT, ApiServerError, running_api_server


def _running_with_home(home: Path) -> list[int]:
    return [s.pid for s in apiserver.proc_stats() if apiserver.process_home(s.pid) == str(home)]


def _health_check_here(monkeypatch: pytest.MonkeyPatch, fake: Callable[[str], bool]) -> None:
    """Replace the health check in this thread only: the session's own server may be
    starting in another one (conftest's BackgroundApiServer) and must see the real one."""
    real = apiserver._healthy
    here = threading.current_thread()

    def check(url: str) -> bool:
        return fake(url) if threading.current_thread() is here else real(url)

    monkeypatch.setattr(apiserver, "_healthy", check)


def test_the_production_port_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match="46580 is the box's production API server"),
        running_api_server(tmp_path, port=PRODUCTION_PORT),
    ):
        pass
    assert PRODUCTION_PORT not in {apiserver.free_port() for _ in range(20)}


def test_sky_files_stay_inside_home_sky(tmp_path: Path) -> None:
    apiserver.write_sky_files(tmp_path, {"config.yaml": "a: 1\n", "plugins/x.yaml": "b: 2\n"})
    assert (tmp_path / ".sky/config.yaml").read_text() == "a: 1\n"
    assert (tmp_path / ".sky/plugins/x.yaml").read_text() == "b: 2\n"
    for bad in ("../escape.yaml", "/etc/passwd"):
        with pytest.raises(ValueError, match=r"inside HOME/\.sky"):
            apiserver.write_sky_files(tmp_path, {bad: ""})


def test_the_server_sees_none_of_the_callers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", "/etc/rancher/k3s/k3s.yaml")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-not-for-tests")
    monkeypatch.setenv("SKYPILOT_CONFIG", "/home/alice/.sky/config.yaml")
    env = apiserver.server_env(Path("/srv/h"), 4711, {"EXTRA": "1", "IS_SKYPILOT_SERVER": None})
    assert {"KUBECONFIG", "AWS_ACCESS_KEY_ID", "SKYPILOT_CONFIG", "IS_SKYPILOT_SERVER"}.isdisjoint(
        env
    )
    assert env["HOME"] == "/srv/h" and env["EXTRA"] == "1"
    assert env["SKYPILOT_API_SERVER_LOCAL_PORT"] == "4711"


@pytest.mark.apiserver
def test_a_start_that_times_out_leaves_nothing_running(tmp_path: Path) -> None:
    home = tmp_path / "server-home"
    with (
        pytest.raises(ApiServerError, match="not healthy within 0 s"),
        running_api_server(home, start_timeout=0.1),
    ):
        pass
    assert _running_with_home(home) == []
    assert home not in apiserver._running.values()


@pytest.mark.apiserver
def test_ctrl_c_while_starting_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "server-home"

    def interrupted(_url: str) -> bool:
        raise KeyboardInterrupt

    _health_check_here(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt), running_api_server(home):
        pass
    assert _running_with_home(home) == []


@pytest.mark.apiserver
def test_a_failed_assertion_in_the_block_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "server-home"
    _health_check_here(monkeypatch, lambda _url: True)  # enter the block at once
    with pytest.raises(AssertionError, match="a test failed"), running_api_server(home) as url:
        assert url.startswith("http://127.0.0.1:") and _running_with_home(home)
        raise AssertionError("a test failed")
    assert _running_with_home(home) == []


def test_queue_manager_port_is_skypilots() -> None:
    """The port a server on P also binds, as SkyPilot computes it."""
    from sky.server.requests.queues import mp_queue

    for port in (apiserver.PRODUCTION_PORT, 47123, 60001, 1025):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SKYPILOT_API_SERVER_LOCAL_PORT", str(port))
            assert apiserver.queue_manager_port(port) == mp_queue.get_queue_manager_port()
