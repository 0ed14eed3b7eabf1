"""Doctor's probes against real files (tmp_path), real subprocesses and real sockets here."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskgpu.config import HostConfig
from deskgpu.doctor import probes
from deskgpu.doctor.facts import HostFacts

IS_ROOT = os.geteuid() == 0


def test_missing_binary_is_recorded_not_raised() -> None:
    result = probes.run_command(["deskgpu-no-such-tool", "--version"])
    assert result.missing and result.returncode is None
    assert result.first_error_line() == "`deskgpu-no-such-tool` not found on PATH"


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI")
def test_docker_info_without_a_daemon_fails_fast() -> None:
    result = probes.run_command(["docker", "info", "--format", probes.DOCKER_INFO_FORMAT], 4.0)
    if result.ok:
        pytest.skip("a Docker daemon is running here")
    assert not result.timed_out  # it failed on its own, well inside the 4 s timeout
    assert "docker" in result.first_error_line().lower()


def test_a_hung_tool_costs_the_timeout_and_its_children_die(tmp_path: Path) -> None:
    """A fake `docker` that hangs (and forks a child that hangs) stands in for a stuck daemon."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pid_file = tmp_path / "child.pid"
    fake = bin_dir / "docker"
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pid_file}\nwait\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = probes.run_command(["docker", "info"], timeout_s=1.0, env=env)  # not 300 s
    assert result.timed_out and result.returncode is None
    assert "did not answer within" in result.first_error_line()
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert (
        not Path(f"/proc/{child}").exists()
        or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    )


def test_read_file_text_directory_and_absent(tmp_path: Path) -> None:
    (tmp_path / "daemon.json").write_text('{"runtimes": {}}')
    assert probes.read_file(str(tmp_path / "daemon.json")).text == '{"runtimes": {}}'
    (tmp_path / "cdi").mkdir()
    (tmp_path / "cdi" / "nvidia.yaml").write_text("kind: nvidia.com/gpu\n")
    assert probes.read_file(str(tmp_path / "cdi")).entries == ["nvidia.yaml"]
    absent = probes.read_file(str(tmp_path / "nope.json"))
    assert (absent.exists, absent.text, absent.error) == (False, None, None)


@pytest.mark.skipif(IS_ROOT, reason="root reads mode-000 files")
def test_unreadable_file_says_permission_denied(tmp_path: Path) -> None:
    secret = tmp_path / "k3s.yaml"
    secret.write_text("apiVersion: v1\n")
    secret.chmod(0o000)
    fact = probes.read_file(str(secret))
    assert (fact.exists, fact.text, fact.error) == (True, None, "permission denied")


def test_site_packages_scan_finds_torch_and_cuda_wheels(tmp_path: Path) -> None:
    site = tmp_path / "usr/local/lib/python3.10/dist-packages"
    for name in (
        "torch-2.3.1.dist-info",
        "nvidia_cublas_cu12-12.1.3.1.dist-info",
        "numpy-1.26.4.dist-info",
        "PyYAML-6.0.egg-info",
        "torch",
        "README",
    ):
        (site / name).mkdir(parents=True)
    home = tmp_path / "home"
    (home / ".local/lib/python3.10/site-packages/jax-0.4.30.dist-info").mkdir(parents=True)
    paths = probes.ProbePaths(
        home=str(home), site_packages=(str(tmp_path / "usr/local/lib/python3*/dist-packages"),)
    )
    sites = probes.probe_python_sites(paths)
    assert [(s.scope, s.distributions) for s in sites] == [
        (
            "system",
            ["numpy==1.26.4", "nvidia_cublas_cu12==12.1.3.1", "PyYAML==6.0", "torch==2.3.1"],
        ),
        ("user", ["jax==0.4.30"]),
    ]


def test_cuda_toolkit_scan(tmp_path: Path) -> None:
    kit = tmp_path / "cuda-12.4"
    (kit / "bin").mkdir(parents=True)
    (kit / "bin" / "nvcc").write_text("")
    (kit / "version.json").write_text(
        json.dumps({"cuda": {"name": "CUDA SDK", "version": "12.4.1"}})
    )
    (tmp_path / "cuda").symlink_to(kit)
    found = probes.probe_cuda_toolkits(probes.ProbePaths(cuda=str(tmp_path / "cuda*")))
    assert [
        (t.path.rsplit("/", 1)[1], t.version, t.has_nvcc, bool(t.symlink_to)) for t in found
    ] == [
        ("cuda", "12.4.1", True, True),
        ("cuda-12.4", "12.4.1", True, False),
    ]


@pytest.mark.skipif(
    not Path("/usr/local/cuda-13.0/bin/nvcc").exists(), reason="this dev VM's toolkit"
)
def test_the_real_cuda_toolkit_on_this_machine_is_found() -> None:
    found = {t.path: t for t in probes.probe_cuda_toolkits(probes.ProbePaths())}
    assert found["/usr/local/cuda-13.0"].has_nvcc
    assert found["/usr/local/cuda-13.0"].version == "13.0"


def test_conda_in_a_shared_path(tmp_path: Path) -> None:
    (tmp_path / "miniconda3" / "conda-meta").mkdir(parents=True)
    (tmp_path / "not-conda").mkdir()
    paths = probes.ProbePaths(conda=(str(tmp_path / "miniconda*"), str(tmp_path / "not-conda")))
    assert probes.probe_conda(paths, []) == [str(tmp_path / "miniconda3")]


def test_storage_probe_reads_mode_space_and_mount(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    root.chmod(0o2775)
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw,relatime 0 0\n"
        f"nas:/export/ckpt {str(root).replace(' ', chr(92) + '040')} nfs4 rw,relatime 0 0\n"
    )
    fact = probes.probe_storage(str(root), str(mounts))
    assert fact.exists and fact.is_dir and fact.mode == 0o2775
    assert fact.free_bytes is not None and fact.total_bytes and fact.free_bytes <= fact.total_bytes
    assert (fact.mount_point, fact.fstype, fact.mount_source) == (
        str(root),
        "nfs4",
        "nas:/export/ckpt",
    )
    live = probes.probe_storage(str(tmp_path), "/proc/self/mounts")
    assert live.fstype  # whatever the real filesystem under tmp is


def test_storage_probe_on_a_missing_root(tmp_path: Path) -> None:
    fact = probes.probe_storage(str(tmp_path / "data"), "/proc/self/mounts")
    assert (fact.exists, fact.free_bytes) == (False, None)


def test_schedules_from_cron_files_and_units(tmp_path: Path) -> None:
    (tmp_path / "cron.d").mkdir()
    (tmp_path / "cron.d" / "deskgpu").write_text("0 4 * * 1 root deskgpu reap --yes\n")
    (tmp_path / "system").mkdir()
    (tmp_path / "system" / "deskgpu-observe.timer").write_text("[Timer]\nOnCalendar=*:0/10\n")
    paths = probes.ProbePaths(
        cron_files=(str(tmp_path / "cron.d/*"),),
        cron_spool=str(tmp_path / "spool"),
        systemd_units=(str(tmp_path / "system/*.timer"),),
    )
    commands, files = probes.probe_schedules(paths, 2.0)
    assert files[f"cron:{tmp_path}/cron.d/deskgpu"].text == "0 4 * * 1 root deskgpu reap --yes\n"
    assert f"systemd:{tmp_path}/system/deskgpu-observe.timer" in files
    assert set(commands) == {"crontab", "systemctl_timers"}


def test_server_process_found_in_real_proc() -> None:
    """A real process whose command line looks like `python -m sky.server.server`."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(30)",
            "-m",
            "sky.server.server",
            "--port=46777",
        ]
    )
    try:
        time.sleep(0.2)
        found = {p.pid: p for p in probes.find_server_processes()}
        assert proc.pid in found
        mine = found[proc.pid]
        assert (mine.port, mine.deploy, mine.uid) == (46777, False, os.getuid())
        assert mine.home == os.environ["HOME"]
    finally:
        proc.kill()
        proc.wait()


class _FakeSkyServer(http.server.BaseHTTPRequestHandler):
    """Answers like a SkyPilot 0.14 API server (shapes recorded from a real one)."""

    def do_GET(self) -> None:
        if self.path == "/api/health":
            body = {"status": "healthy", "api_version": "62", "version": "0.14.1", "user": None}
            self._send(body)
        elif self.path.startswith("/enabled_clouds"):
            self._send(None, {"X-Skypilot-Request-ID": "84a933b1-9def"})
        elif self.path == "/api/get?request_id=84a933b1-9def":
            self._send(
                {
                    "request_id": "84a933b1-9def",
                    "name": "sky.enabled_clouds",
                    "status": "SUCCEEDED",
                    "return_value": '["kubernetes"]',
                    "error": "null",
                }
            )
        else:
            self.send_error(404)

    def _send(self, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sky_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeSkyServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_health_and_enabled_infra_over_plain_http(sky_server: str) -> None:
    health, _ = probes.http_get(sky_server + "/api/health")
    assert health.status_code == 200 and json.loads(health.body or "")["version"] == "0.14.1"
    assert probes.read_enabled_infra(sky_server) == (["kubernetes"], None)


def test_connection_refused_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: refused for as long as it is held
        port = s.getsockname()[1]
        fact, _ = probes.http_get(f"http://127.0.0.1:{port}/api/health")
    assert fact.error == "connection refused" and fact.status_code is None


def test_a_server_that_never_answers_costs_the_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # the kernel accepts the connection; nobody ever reads or replies
        fact, _ = probes.http_get(f"http://127.0.0.1:{s.getsockname()[1]}/api/health", 0.5)
    assert fact.error in ("timed out", "no answer within 0.5 s") and fact.status_code is None


def test_kubernetes_probe_on_this_machine_stops_at_the_context() -> None:
    commands, _ = probes.probe_kubernetes(HostConfig(), probes.ProbePaths(), 3.0)
    context = commands["kube_context"]
    if context.ok:
        pytest.skip("this machine has a kube context")
    assert "kube_nodes" not in commands  # no context: the API is not asked at all


def test_gather_on_this_machine_round_trips(tmp_path: Path) -> None:
    facts = probes.gather(HostConfig(data_root=str(tmp_path)), timeout_s=3.0)
    assert facts.storage["data"].exists
    again = HostFacts.from_dict(json.loads(json.dumps(facts.to_dict())))
    assert again.to_dict() == facts.to_dict()


def test_cluster_enforcement_probes_ask_kubectl_what_the_fixtures_hold(tmp_path) -> None:
    """A kubectl that logs its argv: the probes ask exactly what the fixtures record, and
    `auth can-i`'s `no` (exit 1) is kept as kubectl said it."""
    import json

    from tests.fixtures.doctor import from_render

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.log"
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$1" in auth) echo no; exit 1;; *) echo "{}";; esac\n'
    )
    kubectl.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    got = probes.probe_cluster_enforcement(
        probes.kubectl_argv(env), "--request-timeout=3s", 3.0, env
    )
    recorded = from_render.kube_commands()
    assert set(got) == set(recorded)
    for key, result in got.items():
        assert result.argv == recorded[key]["argv"], key
    assert got["kube_job_can_create_pods"].returncode == 1
    assert got["kube_job_can_create_pods"].stdout == "no\n"
    assert json.loads(got["kube_admission"].stdout) == {}
    assert len(log.read_text().splitlines()) == 3
