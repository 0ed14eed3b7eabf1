"""The house rules hold on a real API server started from the files `deskgpu setup render`
writes: no client can switch them off, and SkyPilot's own controller gets its jobs through.

One server for the module, started as the rendered `skypilot-api.service` starts it (its
ExecStart and Environment, its HOME laid out from the rendered `~/.sky/config.yaml` and
`~/.sky/plugins.yaml`), on a free loopback port. Test-only additions to its environment:
`SKYPILOT_POD_CPU_CORE_LIMIT=1` and `SKYPILOT_POD_MEMORY_GB_LIMIT=4`, which size SkyPilot's
workers for a loaded 2-core test machine (with two uvicorn workers, uvicorn's 5 s liveness
ping kills workers still importing, in a loop). A second server from the same files minus
`plugins.yaml` is the control: each bypass really gets past the policy there, so the guard
is what stops it.

Every attack is sent the way a researcher on the box could: the stock `sky` CLI with
environment variables, or a raw HTTP request built from SkyPilot's own payload classes
(tests/raw_request.py) and changed by hand.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from deskgpu.config import SYSTEM_CONFIG, load_config
from deskgpu.setup.render import GUARD_CLASS, SERVER_UNIT, Tools, render, write
from tests.apiserver import free_port, running_api_server
from tests.asuser import as_nobody
from tests.conftest import HOST_CONFIG, ROOT
from tests.raw_request import body_for, post, wait

pytestmark = pytest.mark.apiserver

SKY = str(Path(sys.executable).with_name("sky"))
CLEAN = "name: ok\nresources:\n  cpus: 1\nrun: echo hi\n"
# A job group in the shape of SkyPilot's llm/rl-post-training-jobgroup (CPU only: no catalog).
JOB_GROUP = """\
---
name: rl
execution: parallel
primary_tasks: [trainer]
---
name: trainer
resources: {cpus: 1}
run: echo reward at reward-0.rl
---
name: reward
resources: {cpus: 1}
run: echo serving
"""
HOSTPATH = """\
name: evil
resources:
  cpus: 1
config:
  kubernetes:
    pod_config:
      spec:
        volumes: [{name: root, hostPath: {path: /}}]
        containers: [{volumeMounts: [{name: root, mountPath: /host}]}]
run: ls /host
"""
# Sizing for the test machine only (see the module docstring); not part of the box's files.
TEST_SIZING = {"SKYPILOT_POD_CPU_CORE_LIMIT": "1", "SKYPILOT_POD_MEMORY_GB_LIMIT": "4"}


class Box:
    """A server started from rendered files, and what a client needs to talk to it."""

    def __init__(self, url: str, home: Path, host_config: Path, user: str) -> None:
        self.url = url
        self.home = home
        self.host_config = host_config
        self.user = user

    def client_env(self, tmp: Path, **extra: str) -> dict[str, str]:
        """A researcher's shell on the box: the rendered profile's endpoint, their own HOME.

        `SKYPILOT_API_SERVER_LOCAL_PORT` makes the stock client treat the server as local,
        as it does on the box (127.0.0.1:46580), where it forwards `SKYPILOT_CONFIG`.
        """
        home = tmp / "client-home"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "DESKGPU_"))}
        env.update(
            HOME=str(home),
            SKYPILOT_API_SERVER_ENDPOINT=self.url,
            SKYPILOT_API_SERVER_LOCAL_PORT=self.url.rsplit(":", 1)[1],
            SKYPILOT_DISABLE_USAGE_COLLECTION="1",
            SKYPILOT_USER=self.user,
        )
        env.update(extra)
        return env

    def raw(
        self,
        path: str,
        task: str,
        *,
        cluster: str | None = None,
        env: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send a hand-changed request body; return the request's final status and error."""
        doc = body_for(path, task, cluster)
        doc["env_vars"]["SKYPILOT_USER"] = self.user
        doc["env_vars"].update(env or {})
        if config is not None:
            doc["override_skypilot_config"] = config
        doc.update(fields or {})
        status, headers, raw = post(self.url + path, doc)
        if path == "/validate":
            detail = json.loads(raw or b"{}").get("detail") if status != 200 else None
            detail = json.loads(detail) if isinstance(detail, str) else (detail or {})
            return {"status": "SUCCEEDED" if status == 200 else "FAILED", **_error(detail)}
        request_id = {k.lower(): v for k, v in headers.items()}.get("x-skypilot-request-id")
        assert request_id, f"{path}: HTTP {status}: {raw[:500]!r}"
        result = wait(self.url, request_id, 240)
        error = result.get("error") or {}
        error = json.loads(error) if isinstance(error, str) else error
        return {"status": result.get("status"), "request_id": request_id, **_error(error)}

    def cluster_names(self) -> list[str]:
        """What `sky status` would list, from the server's own state."""
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, sky; print(json.dumps([r['name'] for r in sky.get(sky.status())]))",
            ],
            env=self.client_env(self.home.parent),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        names: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
        return names


def _error(error: Any) -> dict[str, Any]:
    error = error if isinstance(error, dict) else {"message": str(error)}
    return {"error_type": error.get("type"), "error": str(error.get("message") or "")}


def _rendered(
    tmp: Path, port: int, *, guard: bool, extra: str = ""
) -> tuple[Path, dict[str, str], Path]:
    """Render the box's files for a host config on `port` (the example's, plus `extra`);
    returns HOME, env and the config."""
    host_config = tmp / "host-config.yaml"
    text = HOST_CONFIG.read_text().replace("127.0.0.1:46580", f"127.0.0.1:{port}")
    overridden = {line.split(":", 1)[0] + ":" for line in extra.splitlines() if line[:1].isalpha()}
    kept, skipping = [], False
    for line in text.splitlines(True):  # an overridden key goes with its indented block
        if not line[:1].isspace():
            skipping = line.startswith(tuple(overridden)) if overridden else False
        if not skipping:
            kept.append(line)
    text = "".join(kept)
    host_config.write_text(text + extra + "doctor:\n  require_admin_policy: true\n")
    config = load_config(host_config)
    out = tmp / "rendered"
    tools = Tools(python=sys.executable, deskgpu="deskgpu")
    write(render(config, tools, host_config.read_text()), out)
    unit = (out / "etc/systemd/system" / SERVER_UNIT).read_text()
    env: dict[str, str] = {}
    exec_start: list[str] = []
    for line in unit.splitlines():
        if line.startswith("Environment="):
            env.update(p.split("=", 1) for p in shlex.split(line.removeprefix("Environment=")))
        if line.startswith("ExecStart="):
            exec_start = shlex.split(line.removeprefix("ExecStart="))
    assert exec_start[:3] == [sys.executable, "-m", "sky.server.server"], exec_start
    assert exec_start[3:] == ["--deploy", "--host", "127.0.0.1", "--port", str(port)]
    assert env["IS_SKYPILOT_SERVER"] == "true"  # as `sky api start` runs its server
    # The unit's HOME is /var/lib/skypilot: lay the rendered files out under a HOME of ours.
    rendered_home = Path(env["HOME"])
    home = tmp / "server-home"
    shutil.copytree(out / rendered_home.relative_to("/"), home)
    if not guard:
        (home / ".sky" / "plugins.yaml").unlink()
    env["HOME"] = str(home)
    env["KUBECONFIG"] = str(home / ".kube" / "config")
    # The unit names no config: the server reads /etc/deskgpu/config.yaml, which install.sh
    # installs from the rendered copy. Here that copy stands in for the system path.
    assert "DESKGPU_CONFIG" not in env
    installed = out / SYSTEM_CONFIG.relative_to("/")
    env["DESKGPU_CONFIG"] = str(installed)
    env.update(TEST_SIZING)
    return home, env, installed


@contextlib.contextmanager
def _box(tmp: Path, *, guard: bool, extra: str = "", owners: tuple[str, ...] = ()) -> Iterator[Box]:
    """A server from rendered files; `owners`: accounts whose session `<name>-dev` and
    managed job `<name>-train` SkyPilot's state functions write first (tests/jobstate.py)."""
    port = free_port()
    home, env, host_config = _rendered(tmp, port, guard=guard, extra=extra)
    if owners:
        subprocess.run(
            [sys.executable, "-m", "tests.jobstate", *owners],
            env={
                "HOME": str(home),
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
                "PYTHONPATH": str(ROOT),
            },
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=180,
        )
    with running_api_server(
        home, deploy=True, port=port, extra_env={**env, "SKYPILOT_API_SERVER_ENDPOINT": None}
    ) as url:
        yield Box(url, home, host_config, user="alice")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    with _box(tmp_path_factory.mktemp("guarded"), guard=True) as b:
        yield b


@pytest.fixture(scope="module")
def open_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """The control: the same files without the guard plugin."""
    with _box(tmp_path_factory.mktemp("unguarded"), guard=False) as b:
        yield b


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# The guard is there, and says what it enforces


def test_the_unit_starts_the_server_as_sky_api_start_would() -> None:
    from sky.server import constants as server_constants

    from deskgpu.setup.render import SERVER_WEBSOCKET_LIMITS

    assert SERVER_WEBSOCKET_LIMITS == {
        "WEBSOCKETS_MAX_LINE_LENGTH": server_constants.WEBSOCKETS_MAX_HEADER_LINE_LENGTH,
        "WEBSOCKETS_MAX_NUM_HEADERS": server_constants.WEBSOCKETS_MAX_NUM_HEADERS,
    }


def test_the_rendered_server_runs_the_guard(box: Box) -> None:
    plugins = yaml.safe_load((box.home / ".sky" / "plugins.yaml").read_text())
    assert plugins["plugins"][0]["class"] == GUARD_CLASS
    with contextlib.closing(
        __import__("urllib.request").request.urlopen(
            f"{box.url}/plugins/api/deskgpu/guard", timeout=30
        )
    ) as response:
        status = json.loads(response.read())
    assert status["guard"] == "active"
    assert status["admin_policy"] == "deskgpu.policy.HouseRules"
    assert status["host_config"] == str(box.host_config)


def _doctor_check(box: Box, check_id: str) -> dict[str, Any]:
    ran = subprocess.run(
        [str(Path(sys.executable).with_name("deskgpu")), "doctor", "--json"],
        env={**box.client_env(box.home.parent), "DESKGPU_CONFIG": str(box.host_config)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(ran.stdout)
    found: dict[str, Any] = next(c for c in report["checks"] if c["id"] == check_id)
    return found


def test_doctor_proves_the_guard_on_the_running_server(box: Box, open_box: Box) -> None:
    guarded = _doctor_check(box, "skypilot.hardening")
    assert guarded["status"] == "ok", guarded
    assert str(box.host_config) in guarded["detail"]
    unguarded = _doctor_check(open_box, "skypilot.hardening")
    assert unguarded["status"] == "fail", unguarded
    assert "plugins.yaml" in unguarded["fix"]


# ---------------------------------------------------------------------------------------------
# 1. A compliant managed job gets past the policy twice: at submission and at the controller


def _controller_log(box: Box, job_id: int) -> str:
    path = box.home / "sky_logs" / "jobs_controller" / f"{job_id}.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.skipif(shutil.which("rsync") is None, reason="SkyPilot's jobs launch needs rsync")
@pytest.mark.parametrize("submitter", ["sky jobs launch", "deskgpu submit"])
def test_compliant_managed_job_reaches_provisioning(
    box: Box, tmp_path: Path, submitter: str
) -> None:
    if submitter == "deskgpu submit":
        spec = _write(tmp_path, "job.yaml", "name: cpu-job\ngpus: 0\nrun: echo hi\n")
        args = [str(Path(sys.executable).with_name("deskgpu")), "submit", str(spec)]
        marker = "managed job "
    else:
        task = _write(tmp_path, "clean.yaml", CLEAN)
        args = [SKY, "jobs", "launch", "-y", "-d", str(task)]
        marker = "Managed Job ID:"
    launched = subprocess.run(
        args,
        env={**box.client_env(tmp_path), "DESKGPU_CONFIG": str(box.host_config)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = launched.stdout + launched.stderr
    if submitter == "deskgpu submit" and launched.returncode == 1:
        # submit watched the launch to SkyPilot's prechecks: taken, past the house rules,
        # then no infrastructure (exit 1, one line); else it said queued (exit 0).
        assert "failed before it started (FAILED_PRECHECKS)" in out, out[-3000:]
        assert "no infrastructure enabled" in out, out[-3000:]
    else:
        assert launched.returncode == 0, out[-3000:]
    job_id = int(out.split(marker)[1].split()[0])
    deadline = time.monotonic() + 240
    log = ""
    while time.monotonic() < deadline:
        log = _controller_log(box, job_id)
        if "NoCloudAccessError" in log or "UserRequestRejectedByPolicy" in log:
            break
        time.sleep(2)
    # No Kubernetes here: provisioning is as far as a job can get, and it got there.
    assert "UserRequestRejectedByPolicy" not in log, log[-3000:]
    assert "NoCloudAccessError" in log, log[-3000:]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="SkyPilot's jobs launch needs rsync")
def test_a_job_group_passes_the_policy_with_its_names(box: Box, tmp_path: Path) -> None:
    """The server applies the policy, keeps `primary_tasks` and the job names valid, and goes
    on to optimize the group (SkyPilot does that before the controller: with no cloud here,
    that is where it stops). tests/test_policy_portable.py loads the result as the controller."""
    task = _write(tmp_path, "group.yaml", JOB_GROUP)
    launched = subprocess.run(
        [SKY, "jobs", "launch", "-y", "-d", str(task)],
        env={**box.client_env(tmp_path), "DESKGPU_CONFIG": str(box.host_config)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = launched.stdout + launched.stderr
    assert "Applying server admin policy" in out and 'Optimizing Job Group "rl"' in out, out
    assert "UserRequestRejectedByPolicy" not in out and "unknown job" not in out, out
    assert "NoCloudAccessError" in out, out


# ---------------------------------------------------------------------------------------------
# 2. Nothing a client sends switches the rules off


def test_stock_cli_with_its_own_skypilot_config_is_rejected(box: Box, tmp_path: Path) -> None:
    """`SKYPILOT_CONFIG=evil.yaml sky launch`: the SDK forwards the variable to a local
    server, which (unguarded) loads that file as its whole config: no admin policy."""
    evil = _write(
        tmp_path,
        "evil.yaml",
        "kubernetes:\n  pod_config:\n    spec:\n"
        "      volumes: [{name: root, hostPath: {path: /}}]\n",
    )
    task = _write(tmp_path, "clean.yaml", CLEAN)
    ran = subprocess.run(
        [SKY, "launch", "-y", "-c", "alice-dev", str(task)],
        env=box.client_env(tmp_path, SKYPILOT_CONFIG=str(evil)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = ran.stdout + ran.stderr
    assert ran.returncode != 0
    assert "rejected by the house rules" in out and "host_mount:" in out, out[-3000:]
    assert "Traceback" not in out


def _hostile_server_config(tmp: Path) -> Path:
    """A HOME whose ~/.sky/config.yaml has no admin policy at all."""
    home = tmp / "evil-home"
    (home / ".sky").mkdir(parents=True)
    (home / ".sky" / "config.yaml").write_text("jobs: {controller: {consolidation_mode: true}}\n")
    return home


@pytest.mark.parametrize("path", ["/launch", "/jobs/launch"])
@pytest.mark.parametrize(
    "variable",
    ["SKYPILOT_CONFIG", "SKYPILOT_GLOBAL_CONFIG", "SKYPILOT_PROJECT_CONFIG", "HOME"],
)
def test_request_env_cannot_swap_the_server_config(
    box: Box, tmp_path: Path, path: str, variable: str
) -> None:
    home = _hostile_server_config(tmp_path)
    value = str(home) if variable == "HOME" else str(home / ".sky" / "config.yaml")
    result = box.raw(path, HOSTPATH, cluster="alice-evil", env={variable: value})
    assert result["error_type"] == "UserRequestRejectedByPolicy", result
    assert "host_mount:" in result["error"]


def test_request_env_cannot_choose_the_host_config(box: Box, tmp_path: Path) -> None:
    """`DESKGPU_CONFIG=<the user's own rules>` is not what the box enforces.

    (No GPU request here: SkyPilot would fetch an accelerator catalog from the network to
    parse one, before any policy runs.)
    """
    mine = _write(tmp_path, "mine.yaml", "box_name: mine\ndata_root: /\ncheckpoint_root: /\n")
    result = box.raw("/launch", HOSTPATH, cluster="alice-evil", env={"DESKGPU_CONFIG": str(mine)})
    assert result["error_type"] == "UserRequestRejectedByPolicy", result
    assert "house rules of lab-a6000" in result["error"]
    assert str(box.host_config) in result["error"] and str(mine) not in result["error"]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="SkyPilot's jobs launch needs rsync")
def test_request_path_cannot_run_the_users_programs_on_the_server(box: Box, tmp_path: Path) -> None:
    """The unguarded server runs `rsync` for a jobs launch from the request's PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "ran-as-the-server"
    fake = bin_dir / "rsync"
    real = shutil.which("rsync") or "rsync"
    fake.write_text(f'#!/bin/sh\ntouch {shlex.quote(str(marker))}\nexec {real} "$@"\n')
    fake.chmod(0o755)
    result = box.raw("/jobs/launch", CLEAN, env={"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"})
    assert result["status"] == "SUCCEEDED", result
    assert not marker.exists()


class _CountingPolicy(http.server.BaseHTTPRequestHandler):
    """A RESTful admin policy that lets everything through, and counts its callers."""

    calls: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        type(self).calls.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        # SkyPilot's RESTful policy wire format: a JSON string holding the JSON document
        # (sky/admin_policy.py `UserRequest.encode`, `MutatedUserRequest.decode`).
        request = json.loads(json.loads(body))
        answer = {"task": request["task"], "skypilot_config": request["skypilot_config"]}
        self.wfile.write(json.dumps(json.dumps(answer)).encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def users_policy() -> Iterator[str]:
    _CountingPolicy.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingPolicy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", ["/launch", "/jobs/launch"])
def test_client_config_cannot_name_its_own_admin_policy(
    box: Box, users_policy: str, path: str
) -> None:
    result = box.raw(path, HOSTPATH, cluster="alice-evil", config={"admin_policy": users_policy})
    assert result["error_type"] == "UserRequestRejectedByPolicy", result
    assert "host_mount:" in result["error"]
    assert _CountingPolicy.calls == []


@pytest.mark.parametrize(
    "flag", ["is_launched_by_jobs_controller", "is_launched_by_sky_serve_controller"]
)
def test_a_client_cannot_claim_to_be_the_controller(box: Box, flag: str) -> None:
    result = box.raw("/launch", CLEAN, cluster="bob-notebook", fields={flag: True})
    assert result["error_type"] == "UserRequestRejectedByPolicy", result
    assert "cluster_name:" in result["error"]


def test_validate_is_as_strict_as_launch(box: Box, tmp_path: Path) -> None:
    home = _hostile_server_config(tmp_path)
    result = box.raw(
        "/validate",
        HOSTPATH,
        cluster="alice-evil",
        env={"SKYPILOT_CONFIG": str(home / ".sky" / "config.yaml"), "DESKGPU_CONFIG": "/x"},
    )
    assert result["error_type"] == "UserRequestRejectedByPolicy", result
    other = box.raw("/validate", CLEAN, cluster="bob-notebook")
    assert "cluster_name:" in other["error"], other


def _managed_jobs(box: Box) -> int:
    """Managed jobs the server has recorded (its own database, read-only)."""
    db = box.home / ".sky" / "spot_jobs.db"
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM job_info").fetchone()
    return int(count)


def test_rejected_requests_leave_nothing_behind(box: Box, tmp_path: Path) -> None:
    jobs_before = _managed_jobs(box)
    for path in ("/launch", "/jobs/launch"):
        rejected = box.raw(path, HOSTPATH, cluster="alice-evil", env={"SKYPILOT_CONFIG": "x"})
        assert rejected["error_type"] == "UserRequestRejectedByPolicy", rejected
    box.raw("/launch", CLEAN, cluster="bob-x", fields={"is_launched_by_jobs_controller": True})
    names = box.cluster_names()
    assert "alice-evil" not in names and "bob-x" not in names, names
    assert _managed_jobs(box) == jobs_before


# ---------------------------------------------------------------------------------------------
# The control: without the guard, the same requests get past the policy (SkyPilot 0.14.1)


@pytest.mark.parametrize("variable", ["SKYPILOT_CONFIG", "SKYPILOT_GLOBAL_CONFIG"])
def test_control_unguarded_server_lets_request_env_switch_the_policy_off(
    open_box: Box, tmp_path: Path, variable: str
) -> None:
    home = _hostile_server_config(tmp_path)
    result = open_box.raw(
        "/launch", HOSTPATH, cluster="alice-evil", env={variable: str(home / ".sky/config.yaml")}
    )
    # Past the policy, on to provisioning: the hostPath / task would have been launched.
    assert result["error_type"] == "NoCloudAccessError", result


def test_control_unguarded_server_uses_the_clients_admin_policy(
    open_box: Box, users_policy: str
) -> None:
    result = open_box.raw(
        "/launch", HOSTPATH, cluster="alice-evil", config={"admin_policy": users_policy}
    )
    assert result["error_type"] == "NoCloudAccessError", result
    assert _CountingPolicy.calls, "the client's own policy was not even asked"


# ---------------------------------------------------------------------------------------------
# Files a job copies in are the submitter's upload, never the server's own (found in review)


def test_a_workdir_the_submitter_can_read_passes(box: Box, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    task = _write(tmp_path, "wd.yaml", f"name: wd\nresources: {{cpus: 1}}\nworkdir: {project}\n")
    ran = subprocess.run(
        [SKY, "launch", "-y", "-c", "alice-wd", str(task)],
        env=box.client_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = ran.stdout + ran.stderr
    assert "rejected by the house rules" not in out, out[-3000:]
    assert "NoCloudAccessError" in out or "Cloud access is not set up" in out, out[-3000:]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a second uid to connect as (root only)")
@pytest.mark.parametrize("how", ["traversal", "unmapped"])
@pytest.mark.parametrize("path", ["/launch", "/jobs/launch"])
def test_file_mounts_cannot_copy_what_only_the_server_can_read(
    box: Box, tmp_path: Path, path: str, how: str
) -> None:
    """From a user who cannot read it, a file only the server's account can read (here a
    0600 file in the server's HOME, like its kubeconfig) is refused, however it is named."""
    secret = box.home / ".kube" / "secret-config"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("server's kubeconfig\n")
    secret.chmod(0o600)
    if how == "traversal":  # SkyPilot joins the mapping onto the upload dir, `..` and all
        task = (
            "name: fm\nresources: {cpus: 1}\nfile_mounts: {/mnt/k: /x}\n"
            f"file_mounts_mapping:\n  /x: {'../' * 12}{str(secret).lstrip('/')}\nrun: x\n"
        )
    else:  # without a mapping the source stays the server's own path
        task = f"name: fm\nresources: {{cpus: 1}}\nfile_mounts: {{/mnt/k: {secret}}}\nrun: x\n"
    doc = body_for(path, task, "nobody-fm")
    doc["env_vars"]["SKYPILOT_USER"] = "nobody"  # runs as the account that sends it
    request_id = _post_as_nobody(box.url + path, doc)
    result = wait(box.url, request_id, 240)
    error = result.get("error") or {}
    error = json.loads(error) if isinstance(error, str) else error
    assert error.get("type") == "UserRequestRejectedByPolicy", result
    assert "file_mount_source:" in error.get("message", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a second uid to connect as (root only)")
def test_a_researcher_cannot_rewrite_the_servers_config(box: Box) -> None:
    """`POST /workspaces/config` replaces the server's whole SkyPilot config; without
    authentication SkyPilot lets any client call it."""
    before = (box.home / ".sky" / "config.yaml").read_text()
    status = _post_as_nobody(box.url + "/workspaces/config", {"config": {}}, want="status")
    assert status == "403"
    assert (box.home / ".sky" / "config.yaml").read_text() == before


def _post_as_nobody(url: str, doc: dict[str, Any], want: str = "request_id") -> str:
    """POST from a forked child that dropped to uid 65534 (nobody): the connection is theirs."""

    def send() -> dict[str, Any]:
        status, headers, _raw = post(url, doc)
        lowered = {k.lower(): v for k, v in headers.items()}
        answer = str(status) if want == "status" else lowered.get("x-skypilot-request-id")
        return {"answer": answer or ""}

    answer = str(as_nobody(send)["answer"])
    assert answer, "the request as nobody failed"
    return answer


def test_a_user_id_is_not_a_path(box: Box, tmp_path: Path) -> None:
    """SkyPilot makes `<id>/file_mounts` under its clients dir, and `/upload` writes there."""
    target = tmp_path / "planted"
    doc = body_for("/launch", CLEAN, "alice-x")
    doc["env_vars"]["SKYPILOT_USER_ID"] = str(target)
    status, _, raw = post(box.url + "/launch", doc)
    assert status == 400 and b"not a SkyPilot user id" in raw
    status, _, raw = post(box.url + f"/upload?user_hash={target}&upload_id=x&chunk_index=0", {})
    assert status == 400
    assert not target.exists()


def _hostpath_volume(host_path: str) -> dict[str, Any]:
    """`sky volumes apply`'s body (SkyPilot's own payload class) for a k8s-hostpath volume."""
    from sky.server.requests import payloads

    model = payloads.VolumeApplyBody(
        name="escape",
        volume_type="k8s-hostpath",
        cloud="kubernetes",
        config={"host_path": host_path},
    )
    doc: dict[str, Any] = json.loads(model.model_dump_json())
    return doc


def test_registering_a_hostpath_volume_of_the_hosts_root_is_refused(
    box: Box, open_box: Box
) -> None:
    """SkyPilot never hands `sky volumes apply` to the admin policy: the control server takes
    the request; the guard refuses it before SkyPilot sees it."""
    status, _, raw = post(box.url + "/volumes/apply", _hostpath_volume("/"))
    assert status == 403, raw
    detail = json.loads(raw)["detail"]
    assert "host_mount:" in detail and "volume escape (k8s-hostpath)" in detail
    status, headers, raw = post(open_box.url + "/volumes/apply", _hostpath_volume("/etc"))
    assert status == 200, raw  # queued: nothing but the guard stands in its way
    assert {k.lower() for k in headers} >= {"x-skypilot-request-id"}
