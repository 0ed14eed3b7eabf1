"""`deskgpu logs|cancel|ssh` against a real SkyPilot API server (consolidation mode, as the
box runs it) whose jobs and sessions were written by SkyPilot's own state functions
(tests/jobstate.py: the server has no Kubernetes, so nothing can really start), and
against nothing at all.

One server for the module, started once; tests that change its state (cancel) use jobs
no other test looks at.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apiserver import running_api_server
from tests.asuser import as_nobody
from tests.conftest import ROOT
from tests.jobstate import ME, SSH_IP

FIXTURES = Path(__file__).parent / "fixtures" / "sky"


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("jobs-server-home")
    env = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run(
        [sys.executable, "-m", "tests.jobstate"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=180,
    )
    with running_api_server(home, deploy=True, warm_up=True) as url:
        yield url


@pytest.fixture
def live(jobs_server: str, hermetic, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point this test's CLI (and its host config) at the module's server."""
    monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", jobs_server)
    hermetic.host_config.write_text(f"api_server: {jobs_server}\n")
    return jobs_server


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_spec_name_resolves_to_the_callers_managed_job(cli, live) -> None:
    result = cli("logs", "train", "--no-follow")
    assert result.exit_code == 0, result.stderr
    found, note = result.stderr.strip().splitlines()
    assert found == f"deskgpu: managed job 2 {ME}-train (queued)"
    assert "no logs yet" in note and "--follow" in note  # a pipe does not hang on it


def test_id_full_name_and_spec_file_find_the_same_job(cli, live, tmp_path: Path) -> None:
    spec = tmp_path / "train.yaml"
    spec.write_text("name: train\ngpus: 0\nrun: python train.py\n")
    for name in ("2", f"{ME}-train", str(spec)):
        result = cli("logs", name, "--no-follow")
        assert result.exit_code == 0, result.stderr
        assert result.stderr.startswith(f"deskgpu: managed job 2 {ME}-train (queued)\n"), name


def test_finished_job_logs_come_from_skypilot(cli, live) -> None:
    result = cli("logs", "old", "--no-follow")
    assert result.exit_code == 0, result.stderr
    assert _one_line(result.stderr) == f"deskgpu: managed job 1 {ME}-old (done)"
    # SkyPilot's own log writer answered (the job ran nowhere, so it says where to look).
    assert "Job 1 is already in terminal state SUCCEEDED" in result.stdout


def test_logs_in_a_pipe_carry_no_terminal_escape_codes(cli, live) -> None:
    """`deskgpu logs … | cat -v` once showed `^[[33m` (issue #24 item 8): SkyPilot colours
    the line it streams for a finished job."""
    result = cli("logs", "old", "--no-follow")
    assert result.exit_code == 0, result.stderr
    assert "Job 1 is already in terminal state SUCCEEDED" in result.stdout
    assert "\x1b" not in result.stdout


def test_logs_on_a_terminal_keep_skypilots_colours(live, hermetic) -> None:
    """The same line on a terminal keeps its colour, unless NO_COLOR (no-color.org) is set."""
    import pty

    def on_a_terminal(**extra: str) -> bytes:
        env = hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=live, **extra)
        main, child = pty.openpty()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "deskgpu", "logs", "old", "--no-follow"],
                stdout=child,
                stderr=subprocess.PIPE,
                env=env,
                timeout=120,
            )
            os.close(child)
            child = -1
            assert proc.returncode == 0, proc.stderr
            out = b""
            while True:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # EIO: the terminal's other end is closed
                    break
                if not chunk:
                    break
                out += chunk
            return out
        finally:
            os.close(main)
            if child != -1:
                os.close(child)

    line = b"Job 1 is already in terminal state SUCCEEDED"
    assert b"\x1b[33m" + line in on_a_terminal()
    # (SkyPilot's spinner before it still draws with cursor codes: that is no log line.)
    plain = on_a_terminal(NO_COLOR="1")
    assert line in plain and b"\x1b[33m" + line not in plain


def test_unknown_name_is_a_usage_error_listing_the_callers_jobs(cli, live) -> None:
    result = cli("cancel", "nope")
    assert result.exit_code == 2
    line = _one_line(result.stderr)
    assert line.startswith(f"nope: no job or session named {ME}-nope is yours; yours: ")
    assert f"managed job 2 {ME}-train (queued)" in line
    assert f"session {ME}-dev (running)" in line
    assert "bob" not in line  # candidates are the caller's own
    assert result.stdout == ""


def test_two_live_jobs_of_one_name_ask_for_the_id(cli, live) -> None:
    result = cli("logs", "twin")
    assert result.exit_code == 2
    assert _one_line(result.stderr) == "twin: 2 managed jobs of that name (4, 5): give the id"


def test_name_that_is_not_a_dns_label_never_reaches_skypilot(cli, live) -> None:
    result = cli("logs", "../../etc/passwd; rm -rf /")
    assert result.exit_code == 2
    assert "cannot read the spec file" in _one_line(result.stderr)
    result = cli("cancel", "Bad_Name")
    assert result.exit_code == 2
    assert "not a job name" in _one_line(result.stderr)


def test_another_users_job_as_root_says_whose_it_is(cli, live) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: root may act on anyone's job")
    result = cli("logs", "bob-train", "--no-follow")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("deskgpu: managed job 3 bob-train (queued) (bob's)\n")


def test_another_users_job_is_refused_to_a_researcher(live) -> None:
    for args in (["cancel", "bob-train"], ["ssh", "bob-notebook"], ["logs", "3"]):
        result = _as_researcher(live, *args)
        assert result["code"] == 2, result
        line = _one_line(result["stderr"])
        assert "owned by bob, needs root or admin_group" in line, line
        assert line.startswith("may not ")


def test_cancel_a_managed_job(cli, live) -> None:
    result = cli("cancel", "doomed")
    assert result.exit_code == 0, result.stderr
    assert _one_line(result.stderr) == f"deskgpu: managed job 6 {ME}-doomed (queued)"
    assert result.stdout == f"managed job 6 {ME}-doomed: cancelled\n"
    queue = json.loads(cli("queue", "--json", "--all").stdout)
    (job,) = [j for j in queue["sky"]["jobs"] if j["id"] == 6]
    assert job["state"] == "Cancelled"


def test_cancel_a_finished_job_is_nothing_to_do(cli, live) -> None:
    result = cli("cancel", "1")
    assert result.exit_code == 0, result.stderr
    assert "already finished, nothing to cancel" in result.stdout


def test_ending_a_session_without_a_terminal_needs_yes(cli, live) -> None:
    result = cli("cancel", "dev")
    assert result.exit_code == 2
    found, refusal = result.stderr.strip().splitlines()
    assert found == f"deskgpu: session {ME}-dev (running)"
    assert "outside /checkpoints" in refusal and "rerun with --yes" in refusal


def test_ssh_into_a_batch_job_says_it_has_none(cli, live) -> None:
    result = cli("ssh", "train")
    assert result.exit_code == 2
    assert "is a batch job: it has no ssh" in result.stderr.strip().splitlines()[-1]


def test_ssh_execs_ssh_with_skypilots_own_entry(
    cli, live, hermetic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to the exec: there is no pod to reach here. `exec_ssh` is replaced only to capture
    the argument list it would have replaced the process with; the ssh entry is the one
    SkyPilot's own writer made from the server's answer."""
    seen: list[list[str]] = []

    def capture(argv: list[str]) -> None:
        seen.append(argv)

    monkeypatch.setattr("deskgpu.cli.jobs.exec_ssh", capture)
    result = cli("ssh", "dev", "--", "nvidia-smi", "-L")
    assert result.exit_code == 0, result.stderr
    assert _one_line(result.stderr) == f"deskgpu: session {ME}-dev (running)"
    entry = hermetic.home / ".sky" / "generated" / "ssh" / f"{ME}-dev"
    assert seen == [[shutil.which("ssh"), "-F", str(entry), "--", f"{ME}-dev", "nvidia-smi", "-L"]]
    text = entry.read_text()
    assert f"Host {ME}-dev" in text and f"HostName {SSH_IP}" in text
    # Kubernetes: tunnelled through this API server, not a direct connection.
    assert f"{live} {ME}-dev kubernetes-pod-ssh-proxy" in text


# ---- the API server is down: seconds, one line, exit 1, no `import sky` first ----


@pytest.mark.parametrize("args", [["logs", "x"], ["cancel", "7", "--yes"], ["ssh", "dev"]])
def test_down_server_is_one_line_in_seconds_without_importing_skypilot(
    args: list[str], hermetic
) -> None:
    code = (
        "import sys\n"
        "from deskgpu.cli import app\n"
        "try:\n"
        f"    app({args!r}, prog_name='deskgpu')\n"
        "except SystemExit as e:\n"
        "    print('sky' in sys.modules, e.code)\n"
    )
    env = hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=hermetic.dead.url)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=20
    )
    assert result.stdout.split() == ["False", "1"], result
    line = _one_line(result.stderr)
    assert f"SkyPilot API server at {hermetic.dead.url} is unreachable" in line


def _as_researcher(endpoint: str, *args: str) -> dict[str, Any]:
    """The CLI as `nobody` (neither root nor in admin_group); as non-root, as the caller."""
    from typer.testing import CliRunner

    from deskgpu.cli import app

    shared = Path(tempfile.mkdtemp(prefix="deskgpu-jobs-"))
    shared.chmod(0o755)
    config = shared / "config.yaml"
    config.write_text(f"api_server: {endpoint}\nadmin_group: gpuadmin\n")
    config.chmod(0o644)

    def invoke() -> dict[str, Any]:
        result = CliRunner().invoke(
            app, [*args, "--config", str(config)], env={"HOME": str(shared)}
        )
        return {"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}

    try:
        if os.getuid() != 0:
            return invoke()
        return as_nobody(invoke)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ---- recorded: the SDK's half of a cancel, replayed to the unmodified SDK ----


def test_recorded_cancel_reaches_skypilot_as_a_job_id(sky_replay) -> None:
    from deskgpu.config import load_config
    from deskgpu.deadline import Deadline
    from deskgpu.skypilot.sdk import cancel_job

    server = sky_replay.load(FIXTURES / "jobs-cancel-by-id.json")
    cancel_job(4, load_config(None), Deadline.after(30))
    (sent,) = [json.loads(s["body"]) for s in server.seen if s["key"] == "POST /jobs/cancel"]
    assert sent["job_ids"] == [4] and not sent["all_users"] and sent["name"] is None
