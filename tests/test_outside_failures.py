"""Outside failures answer fast, in one truthful line, and every deadline is a deadline
(issue #14): the real CLI, as a subprocess, against servers on free loopback ports that
refuse, never answer, trickle, answer junk or HTTP 500 (tests/badservers.py).

Timings are bounds, not measurements: this runs on a loaded 2-core machine, so each test
allows the user's budget plus `SLACK_S`, far below the minutes a hang would take (the
trickling server used to hold `deskgpu submit` until it was killed after 180 s).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deskgpu import nvml
from tests import badservers

DESKGPU = str(Path(sys.executable).with_name("deskgpu"))
SNAPSHOTS = Path(__file__).parent / "fixtures" / "snapshots"
SLACK_S = 10.0
HAS_DRIVER = nvml.read().available
QUEUE_EXIT = 0 if HAS_DRIVER else 1  # queue fails only when the GPU half is missing too


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text("name: bert\ngpus: 0\nrun: echo hi\n")
    return path


def deskgpu(hermetic, endpoint: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=endpoint, COLUMNS="120")
    start = time.monotonic()
    done = subprocess.run([DESKGPU, *args], env=env, capture_output=True, text=True, timeout=180)
    return done, time.monotonic() - start


def one_line(stderr: str, prefix: str = "deskgpu: ") -> str:
    """The line saying what is wrong with SkyPilot (queue also says what it is of the GPUs)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("deskgpu: GPUs:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), stderr
    return lines[0]


COMMANDS = {
    "submit": lambda spec: ["submit", str(spec)],
    "queue": lambda spec: ["queue", "--json"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_nothing_listening_is_unreachable_at_once(hermetic, spec, command) -> None:
    done, took = deskgpu(hermetic, hermetic.dead.url, *COMMANDS[command](spec))
    assert done.returncode == (QUEUE_EXIT if command == "queue" else 1), done.stderr
    line = one_line(done.stderr)
    assert f"API server at {hermetic.dead.url} is unreachable (connection refused)" in line
    assert "systemctl start skypilot-api" in line  # the fix
    assert took < 3 + SLACK_S, took  # the SDK's own retries took 7.5-42 s


@pytest.fixture
def recorded_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This box has no GPU: NVML answers with a recorded box's readings; SkyPilot is live."""
    from deskgpu.snapshot import Snapshot

    recorded = Snapshot.from_dict(json.loads((SNAPSHOTS / "sky_unreachable.json").read_text()))
    assert recorded.nvml.available
    monkeypatch.setattr(nvml, "read", lambda: recorded.nvml)


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        *[(c, k) for c in ("reap", "reap --json", "reap --yes", "observe") for k in ("refused",)],
        ("reap", "error_500"),
        ("observe", "trickle"),  # 10 s: the probe's own limit
    ],
)
def test_reap_and_observe_say_what_is_wrong_with_the_server_at_once(
    cli, hermetic, recorded_gpus, monkeypatch, tmp_path, command, kind
) -> None:
    """GPUs first (tests/test_reap_no_driver.py), then the server: its one line, bounded by
    the probe's own limit (reap and observe have no --timeout)."""
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    handler = {"refused": None, "trickle": badservers.trickle, "error_500": badservers.error_500}
    with contextlib.ExitStack() as stack:
        if kind == "refused":
            url = hermetic.dead.url
        else:
            url = stack.enter_context(badservers.serving(handler[kind])).url
        monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", url)
        start = time.monotonic()
        result = cli(*command.split(), "--config", str(config))
        took = time.monotonic() - start
    assert result.exit_code == 1, result.stderr
    says = {
        "refused": "is unreachable (connection refused)",
        "trickle": "did not finish answering within 10 s",
        "error_500": "API server error 500: database is locked",
    }[kind]
    line = one_line(result.stderr)
    assert line.startswith("deskgpu: no SkyPilot view: SkyPilot API server at") and says in line
    assert result.stdout == ""
    if "--yes" not in command:  # (--yes first makes sure it can keep its audit log)
        assert not (tmp_path / "state").exists()  # nothing recorded from a half look
    assert took < 10 + SLACK_S, took


BROKEN = {
    # handler, what the one line says
    "silent": (None, "did not answer within 3 s"),
    "trickle": (badservers.trickle, "did not finish answering within 3 s"),
    "junk": (badservers.junk, "is not a SkyPilot API server (GET /api/health answered HTTP 200"),
    "not_http": (badservers.not_http, "is not a SkyPilot API server (not an HTTP answer"),
    "error_500": (badservers.error_500, "API server error 500: database is locked"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_submit_against_a_broken_server_is_one_bounded_line(hermetic, spec, kind) -> None:
    handler, says = BROKEN[kind]
    with badservers.serving(handler) as server:
        done, took = deskgpu(hermetic, server.url, "submit", str(spec), "--wait", "3")
        json_done, json_took = deskgpu(
            hermetic, server.url, "submit", str(spec), "--json", "--wait", "3"
        )
    for result, seconds in ((done, took), (json_done, json_took)):
        assert result.returncode == 1, result.stderr
        assert says in one_line(result.stderr), result.stderr
        assert result.stdout == ""
        assert seconds < 3 + SLACK_S, seconds


@pytest.mark.parametrize("kind", BROKEN)
def test_queue_against_a_broken_server_is_one_bounded_line(hermetic, kind) -> None:
    handler, says = BROKEN[kind]
    with badservers.serving(handler) as server:
        done, took = deskgpu(hermetic, server.url, "queue", "--json", "--timeout", "3")
    assert done.returncode == QUEUE_EXIT, done.stderr
    assert says in one_line(done.stderr, "deskgpu: SkyPilot: "), done.stderr
    doc = json.loads(done.stdout)  # the product is still there, saying what is missing
    assert doc["sky"]["available"] is False and says in doc["sky"]["error"]
    assert took < 3 + SLACK_S, took


def test_submit_wait_is_a_deadline_even_inside_the_sdk(hermetic, spec) -> None:
    """The health probe passes, then the server never answers the launch: the watchdog ends
    the command (the SDK would wait on its socket, then retry) and says the truth, that the
    job may or may not have been taken."""
    with badservers.serving(badservers.healthy_then_hang) as server:
        done, took = deskgpu(hermetic, server.url, "submit", str(spec), "--wait", "3")
        posted = [h.split(b" ", 2)[1] for h in server.heads if h.startswith(b"POST")]
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr)
    assert "did not confirm the submission within 8 s" in line, line
    assert "it may still have taken it" in line
    assert posted  # it really was stuck in an SDK request (0.14.1: POST /validate)
    assert took < 3 + 5 + SLACK_S, took


def test_queue_timeout_is_a_deadline_for_each_request(hermetic) -> None:
    with badservers.serving(badservers.healthy_then_hang) as server:
        done, took = deskgpu(hermetic, server.url, "queue", "--json", "--timeout", "3")
    assert done.returncode == QUEUE_EXIT
    assert "did not answer within 3 s" in one_line(done.stderr, "deskgpu: SkyPilot: ")
    assert took < 3 + SLACK_S, took


@pytest.mark.parametrize(
    "args",
    [["submit", "{spec}", "--dry-run"], ["reap", "--evidence", "{evidence}"]],
    ids=["submit-dry-run", "reap-evidence"],
)
def test_commands_that_need_no_server_do_not_probe(hermetic, spec, args) -> None:
    evidence = Path(__file__).parent / "fixtures" / "reap" / "long_idle_debug_session.json"
    argv = [a.format(spec=spec, evidence=evidence) for a in args]
    with badservers.serving(badservers.junk) as server:
        done, _ = deskgpu(hermetic, server.url, *argv)
    assert done.returncode in (0, 3), done.stderr
    assert server.heads == []


def test_watch_json_in_a_pipe_prints_one_document_per_refresh(hermetic) -> None:
    env = hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=hermetic.dead.url)
    done = subprocess.run(
        ["sh", "-c", f"'{DESKGPU}' queue --watch --json --interval 1 | head -3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(docs) == 3
    assert all("unreachable" in d["sky"]["error"] for d in docs)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_watch_in_a_log_writes_plain_frames(hermetic, tmp_path: Path) -> None:
    """`deskgpu queue --watch > file` wrote nothing at all: now each refresh is a frame."""
    env = hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=hermetic.dead.url, COLUMNS="100")
    log = tmp_path / "watch.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [DESKGPU, "queue", "--watch", "--interval", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while log.read_text().count("queue unknown") < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait(10)
            assert proc.stderr is not None
            proc.stderr.close()
    text = log.read_text()
    assert text.count("queue unknown") >= 2, text
    assert "\x1b" not in text  # no colours, no cursor movement
    assert "! SkyPilot: SkyPilot API server at" in text  # the error line is in each frame


def test_a_failed_refresh_keeps_the_last_good_frame() -> None:
    from dataclasses import replace

    from deskgpu.cli.queue import _LastGood
    from deskgpu.snapshot import SkyView, Snapshot

    good = Snapshot.from_dict(json.loads((SNAPSHOTS / "busy_box.json").read_text()))
    assert good.nvml.available and good.sky.available
    last = _LastGood()
    assert last.fill(good) == (good, [])
    failed = replace(good, taken_at=good.taken_at + 5, sky=SkyView(False, error="unreachable"))
    shown, lines = last.fill(failed)
    assert shown is not None and shown.sky.jobs == good.sky.jobs  # the last good jobs table
    assert shown.taken_at == failed.taken_at
    clock = time.strftime("%H:%M:%S", time.localtime(good.taken_at))
    assert lines == [f"showing jobs and sessions as of {clock}"]
    # A refresh that failed outright (no snapshot at all) shows the last frame.
    again, lines = last.fill(None)
    assert again is shown and lines[0].startswith("showing the last frame")


def test_a_request_that_failed_on_the_server_is_its_error_not_http_500(monkeypatch) -> None:
    """SkyPilot answers `GET /api/get` of a failed request with HTTP 500 and the request
    record (its error as JSON) as `detail`: that is SkyPilot's verdict, said as the SDK would."""
    from deskgpu.config import HostConfig
    from deskgpu.skypilot import sdk as skyapi

    health = json.dumps({"status": "healthy", "api_version": "62"}).encode()
    error = {"type": "AssertionError", "message": "Kubernetes({'A6000': 1})"}
    failed = json.dumps({"detail": {"status": "FAILED", "error": json.dumps(error)}}).encode()
    empty_jobs = json.dumps({"status": "SUCCEEDED", "return_value": '{"jobs": []}'}).encode()

    def server(conn, head: bytes, _stop) -> None:
        line = head.split(b"\r\n", 1)[0]
        if line.startswith(b"GET /api/health"):
            badservers._answer(conn, "200 OK", health, "application/json")
        elif line.startswith(b"POST /status"):
            badservers._answer(
                conn, "200 OK", b"null", "application/json", {"X-SkyPilot-Request-ID": "status-1"}
            )
        elif line.startswith(b"POST /jobs/queue/v2"):
            badservers._answer(
                conn, "200 OK", b"null", "application/json", {"X-SkyPilot-Request-ID": "jobs-1"}
            )
        elif b"request_id=status-1" in line:
            badservers._answer(conn, "500 Internal Server Error", failed, "application/json")
        else:
            badservers._answer(conn, "200 OK", empty_jobs, "application/json")

    with badservers.serving(server) as bad:
        monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", bad.url)
        view = skyapi.fetch_queue(HostConfig(), timeout_s=10)
    assert view.available and view.jobs == []
    assert view.notes == [
        "clusters unavailable: SkyPilot rejected the request (AssertionError): "
        "Kubernetes({'A6000': 1})"
    ]
