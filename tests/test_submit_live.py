"""The submission path over real HTTP: recorded SkyPilot responses replayed to the real SDK,
a real local API server with no infra, and a server that is not there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES

FIXTURES = Path(__file__).parent / "fixtures" / "sky"


@pytest.fixture
def interactive_spec(tmp_path: Path) -> Path:
    path = tmp_path / "dev.yaml"
    path.write_text("name: dev\ngpus: 0\ninteractive: true\nidle_timeout: 90m\n")
    return path


def _sent_task(server) -> str:
    (launch,) = [s for s in server.seen if s["key"].endswith("launch")]
    return json.loads(launch["body"])["task"]


def test_accepted_batch_job_prints_id_and_how_to_follow(cli, sky_replay) -> None:
    server = sky_replay.load(FIXTURES / "jobs-launch-accepted.json")
    result = cli("submit", str(EXAMPLES / "cpu-only.yaml"))
    sent = _sent_task(server)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    # Past SkyPilot's prechecks: its cluster is provisioning (the recording's last answer).
    assert lines[0].endswith("-preprocess: managed job 7 submitted, starting")
    assert "deskgpu logs 7" in result.stdout and "deskgpu cancel 7" in result.stdout
    assert "sky " not in result.stdout  # the hints name deskgpu's own commands
    assert "deskgpu queue" in result.stdout
    # What reached SkyPilot carries the house rules.
    assert "deskgpu.io/user" in sent and "provision_timeout: -1" in sent
    assert "/checkpoints" in sent


def test_accepted_batch_job_as_json(cli, sky_replay) -> None:
    sky_replay.load(FIXTURES / "jobs-launch-accepted.json")
    result = cli("submit", str(EXAMPLES / "cpu-only.yaml"), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["mode"] == "managed-job" and doc["job_id"] == 7 and doc["accepted"] is True
    assert doc["kind"] == "batch" and doc["state"] == "Starting"


def test_busy_box_job_waits_instead_of_failing(cli, sky_replay) -> None:
    sky_replay.load(FIXTURES / "jobs-launch-waiting.json")
    result = cli("submit", str(EXAMPLES / "cpu-only.yaml"), "--wait", "1")
    assert result.exit_code == 0, result.stderr
    assert "queued (waiting for GPUs" in result.stdout
    assert "deskgpu logs " in result.stdout and "sky " not in result.stdout


def test_accepted_session_prints_how_to_connect(cli, sky_replay, interactive_spec) -> None:
    server = sky_replay.load(FIXTURES / "launch-accepted.json")
    result = cli("submit", str(interactive_spec))
    sent = _sent_task(server)
    assert result.exit_code == 0, result.stderr
    assert "interactive session is up" in result.stdout
    assert "ssh " in result.stdout and "-dev" in result.stdout
    assert "idle_minutes: 90" in sent and "down: true" in sent


def test_rejection_is_one_clean_line(cli, sky_replay, interactive_spec) -> None:
    sky_replay.load(FIXTURES / "launch-no-infra.json")
    before = interactive_spec.read_bytes()
    result = cli("submit", str(interactive_spec))
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("deskgpu: SkyPilot has no infrastructure enabled")
    assert interactive_spec.read_bytes() == before


def _subprocess_submit(
    spec: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deskgpu", "submit", str(spec), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


@pytest.fixture
def job_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: job\ngpus: 0\nrun: echo hi\n")
    return spec


def test_unreachable_api_server_is_a_clean_exit_1(job_spec: Path, hermetic) -> None:
    env = hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=hermetic.dead.url)
    result = _subprocess_submit(job_spec, env, "--wait", "60")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"SkyPilot API server at {hermetic.dead.url} is unreachable" in line


@pytest.mark.apiserver
def test_real_api_server_without_infra_says_so(
    sky_api_server: str, job_spec: Path, hermetic
) -> None:
    env = hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=sky_api_server)
    result = _subprocess_submit(job_spec, env, "--wait", "60")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "no infrastructure enabled" in line and "sky check" in line


def test_no_api_server_configured_anywhere_says_where_to_set_it(
    job_spec: Path, tmp_path: Path, hermetic
) -> None:
    # No endpoint anywhere: SkyPilot's default local server is the one left, and
    # SKYPILOT_API_SERVER_LOCAL_PORT (subprocess_env) moves that to a dead port, off 46580.
    config = tmp_path / "config.yaml"
    config.write_text("box_name: testbox  # no api_server\n")
    result = _subprocess_submit(job_spec, hermetic.subprocess_env(DESKGPU_CONFIG=str(config)))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("deskgpu: no SkyPilot API server is configured: set `api_server:`")
    assert "SKYPILOT_API_SERVER_ENDPOINT" in line


def test_configured_default_local_server_that_is_down_is_unreachable(
    job_spec: Path, tmp_path: Path, hermetic
) -> None:
    """The SDK calls a down default-port server "not configured"; deskgpu knows it is.

    The default port is SKYPILOT_API_SERVER_LOCAL_PORT's dead one here, so the SDK takes the
    same path it takes for a down 127.0.0.1:46580 on the box, without touching that port.
    """
    config = tmp_path / "config.yaml"
    config.write_text(f"api_server: {hermetic.dead.local_url}\n")
    env = hermetic.subprocess_env(SKYPILOT_DISABLE_LOCAL_API_SERVER="0")
    # a user's `=0` must not re-enable it
    result = _subprocess_submit(job_spec, env, "--config", str(config))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"SkyPilot API server at {hermetic.dead.local_url} is unreachable" in line
