"""Probes: gather `HostFacts` from the live host. They never raise; what fails is recorded.

Every external command runs from an argument list with a short timeout in its own process
group (a hung `docker info` or kube API costs seconds, and its children die with it). Probe
groups (driver, docker, kubernetes, SkyPilot, the host's files) run concurrently, so a run
costs about the slowest group, not the sum. Nothing here needs root: what an unprivileged
user cannot see is recorded as such and the checks say so.

Where to look (`/usr/local`, `/etc/cron.d`, `/proc`, ...) lives in `ProbePaths`, so tests
point the same probes at real files under a temp dir.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from deskgpu import hostio
from deskgpu.config import HostConfig
from deskgpu.doctor import checks, gpupod
from deskgpu.doctor.facts import (
    ClusterFacts,
    CommandResult,
    CudaToolkit,
    ExecutableFact,
    FileFact,
    GpuPodFact,
    GpuReading,
    GpuSample,
    HostFacts,
    HttpFact,
    NvmlFacts,
    PathFact,
    RecordsFact,
    ScrapeTargetFact,
    ServerProcess,
    SitePackages,
    SkyFacts,
    TelemetryFacts,
)
from deskgpu.doctor.scheduled import find_scheduled
from deskgpu.kubenames import JOB_SERVICE_ACCOUNT, JOBS_NAMESPACE

if TYPE_CHECKING:
    from deskgpu.nvml import GpuHealth

# The route deskgpu's server plugin answers (deskgpu.policy.GUARD_ROUTE; no sky import here).
GUARD_ROUTE = "/plugins/api/deskgpu/guard"
DEFAULT_TIMEOUT_S = 4.0
HTTP_TIMEOUT_S = 3.0
MAX_TEXT = 64 * 1024
ENV_KEYS = (
    "SKYPILOT_API_SERVER_ENDPOINT",
    "SKYPILOT_GLOBAL_CONFIG",
    "SKYPILOT_DISABLE_LOCAL_API_SERVER",
    "KUBECONFIG",
)
# `docker info` with a template that also works against the client when the daemon is down.
DOCKER_INFO_FORMAT = (
    '{"ServerVersion":{{json .ServerVersion}},"Runtimes":{{json .Runtimes}},'
    '"DefaultRuntime":{{json .DefaultRuntime}},"CDISpecDirs":{{json .CDISpecDirs}}}'
)


@dataclass
class ProbePaths:
    """Where the probes look. Defaults are the real host; tests point them at a temp dir."""

    home: str = field(default_factory=lambda: str(Path.home()))
    proc: str = "/proc"
    mounts: str = "/proc/self/mounts"
    site_packages: tuple[str, ...] = (
        "/usr/lib/python3*/site-packages",
        "/usr/lib/python3*/dist-packages",
        "/usr/lib/python3/dist-packages",
        "/usr/lib64/python3*/site-packages",
        "/usr/local/lib/python3*/site-packages",
        "/usr/local/lib/python3*/dist-packages",
    )
    user_site_packages: tuple[str, ...] = (".local/lib/python3*/site-packages",)  # under home
    cuda: str = "/usr/local/cuda*"
    conda: tuple[str, ...] = (
        "/opt/conda",
        "/opt/miniconda*",
        "/opt/anaconda*",
        "/opt/miniforge*",
        "/opt/mambaforge*",
        "/usr/local/conda",
        "/usr/local/miniconda*",
        "/usr/local/anaconda*",
        "/usr/local/miniforge*",
        "/usr/share/miniconda*",
        "/srv/conda",
    )
    docker_daemon_json: str = "/etc/docker/daemon.json"
    cdi_dirs: tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")
    k3s_kubeconfig: str = "/etc/rancher/k3s/k3s.yaml"
    k3s_config: str = "/etc/rancher/k3s/config.yaml"  # an agent's node-name and server
    kubelet_kubeconfig: str = "/var/lib/rancher/k3s/agent/kubelet.kubeconfig"
    cron_files: tuple[str, ...] = (
        "/etc/crontab",
        "/etc/cron.d/*",
        "/etc/cron.hourly/*",
        "/etc/cron.daily/*",
        "/etc/cron.weekly/*",
    )
    cron_spool: str = "/var/spool/cron/crontabs"
    systemd_units: tuple[str, ...] = (
        "/etc/systemd/system/*.timer",
        "/etc/systemd/system/*.service",
        "/etc/systemd/system/deskgpu*.d/*.conf",  # drop-ins (`systemctl edit`)
        "/run/systemd/system/deskgpu*",
        "/lib/systemd/system/deskgpu*",
        "/usr/lib/systemd/system/deskgpu*",
    )


# ---------------------------------------------------------------------------------------
# Primitives: a command, a file, a GET. Each returns a fact and never raises.


def _glob(pattern: str) -> list[str]:
    """Sorted matches of an absolute shell pattern (`Path.glob` takes relative ones only)."""
    return sorted(glob.glob(pattern))  # noqa: PTH207 - absolute patterns such as /usr/local/cuda*


def run_command(
    argv: list[str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
) -> CommandResult:
    """Run `argv` with a timeout; a hang kills its whole process group. `input_text` is its
    stdin (else it reads nothing)."""
    if shutil.which(argv[0], path=(env or os.environ).get("PATH")) is None:
        return CommandResult(argv=argv, missing=True)
    child_env = dict(os.environ if env is None else env)
    child_env["LC_ALL"] = "C"
    done = hostio.run(argv, timeout_s, env=child_env, input_text=input_text)
    if done.error is not None:
        return CommandResult(argv=argv, stderr=done.error, elapsed_s=done.elapsed_s)
    return CommandResult(
        argv=argv,
        returncode=done.returncode,
        stdout=done.stdout[:MAX_TEXT],
        stderr=done.stderr[:MAX_TEXT],
        timed_out=done.timed_out,
        elapsed_s=done.elapsed_s,
    )


def read_file(path: str) -> FileFact:
    """A file's text, or a directory's entries; permission problems are recorded, not raised."""
    p = Path(path)
    try:
        if p.is_dir():
            return FileFact(path=path, exists=True, entries=sorted(c.name for c in p.iterdir()))
        if not p.exists():
            # exists() is False both for "absent" and for "parent not searchable".
            return FileFact(path=path, exists=False, error=_parent_unsearchable(p))
        if not p.is_file():  # a FIFO would block forever, a device never end
            return FileFact(path=path, exists=True, error="not a regular file")
        with p.open(encoding="utf-8", errors="replace") as fh:
            return FileFact(path=path, exists=True, text=fh.read(MAX_TEXT))
    except PermissionError:
        return FileFact(path=path, exists=True, error="permission denied")
    except OSError as exc:
        return FileFact(path=path, exists=p.exists(), error=exc.strerror or str(exc))


def _parent_unsearchable(p: Path) -> str | None:
    parent = p.parent
    if parent.exists() and not os.access(parent, os.X_OK):
        return f"permission denied on {parent}"
    return None


def http_get(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> tuple[HttpFact, dict[str, str]]:
    """GET `url`, all of it within `timeout_s`; returns the fact and the response headers."""
    from deskgpu.skypilot import (
        http as skyhttp,  # the one HTTP client (a trickling server cannot hold it)
    )

    reply = skyhttp.request("GET", url, timeout_s=timeout_s, max_bytes=MAX_TEXT)
    fact = HttpFact(url=url, status_code=reply.status, error=reply.error)
    if reply.error is None and reply.status is not None and reply.status >= 400:
        fact.error = f"HTTP {reply.status} {reply.reason}".rstrip()
    elif reply.error is None:
        fact.body = reply.text()
    fact.elapsed_s = reply.elapsed_s
    return fact, reply.headers if reply.error is None else {}


# ---------------------------------------------------------------------------------------
# NVML, through `deskgpu.nvml`, the one module that imports pynvml: `read()` gives the base
# readings (driver, GPUs, lost GPUs, why NVML is unavailable), `read_health()` what doctor
# needs beyond them (CUDA driver version, ECC, retired pages, remapped rows, slowdown
# thresholds, spaced thermal samples with the raw event-reason mask).

_THERMAL_SAMPLES = 3
_THERMAL_INTERVAL_S = 0.5


def read_nvml(
    samples: int = _THERMAL_SAMPLES,
    interval_s: float = _THERMAL_INTERVAL_S,
    lib: ModuleType | None = None,
) -> NvmlFacts:
    """Driver, GPUs and a few spaced thermal samples per GPU, via NVML. Never raises.

    `lib` replaces the `pynvml` module only to inject failures (see `deskgpu.nvml`).
    """
    from deskgpu import nvml

    view = nvml.read(lib)
    facts = NvmlFacts(
        available=view.available, error=view.error, driver_version=view.driver_version
    )
    if not view.available:
        return facts
    for gpu in view.gpus:
        facts.gpus.append(
            GpuReading(
                index=gpu.index,
                name=gpu.name,
                uuid=gpu.uuid,
                error=gpu.error,
                memory_total_mib=gpu.memory_total_mib,
                persistence_mode=gpu.persistence_mode,
                power_limit_w=gpu.power_limit_w,
            )
        )
    readable = {gpu.index: gpu for gpu in facts.gpus if not gpu.error}
    health = nvml.read_health(samples, interval_s, indices=list(readable), lib=lib)
    if not health.available:
        facts.error = f"NVML failed on the second look: {health.error}"
        return facts
    facts.nvml_version = health.nvml_version
    facts.cuda_driver_version = health.cuda_driver_version
    for seen in health.gpus:
        reading = readable[seen.index]
        if seen.lost:  # answered the first look, gone by the second
            reading.error = nvml.GPU_LOST
        _add_health(reading, seen)
    return facts


def _add_health(gpu: GpuReading, seen: GpuHealth) -> None:
    """Copy one GPU's `read_health()` readings onto its `GpuReading`."""
    gpu.pci_bus_id = seen.pci_bus_id
    gpu.ecc_mode_current = seen.ecc_mode_current
    gpu.ecc_errors_uncorrected_volatile = seen.ecc_errors_uncorrected_volatile
    gpu.ecc_errors_uncorrected_aggregate = seen.ecc_errors_uncorrected_aggregate
    gpu.retired_pages_sbe = seen.retired_pages_sbe
    gpu.retired_pages_dbe = seen.retired_pages_dbe
    gpu.retired_pages_pending = seen.retired_pages_pending
    gpu.remapped_rows_correctable = seen.remapped_rows_correctable
    gpu.remapped_rows_uncorrectable = seen.remapped_rows_uncorrectable
    gpu.remapped_rows_pending = seen.remapped_rows_pending
    gpu.remapped_rows_failure = seen.remapped_rows_failure
    gpu.temperature_slowdown_c = seen.temperature_slowdown_c
    gpu.temperature_shutdown_c = seen.temperature_shutdown_c
    gpu.samples = [
        GpuSample(
            at_s=s.at_s,
            temperature_c=s.temperature_c,
            clocks_event_reasons=s.clocks_event_reasons,
            power_draw_w=s.power_draw_w,
        )
        for s in seen.samples
    ]


# ---------------------------------------------------------------------------------------
# Probe groups. Each returns its part of the facts; `gather` assembles them.


def probe_docker(
    paths: ProbePaths, timeout_s: float
) -> tuple[dict[str, CommandResult], dict[str, FileFact]]:
    commands = {
        "docker_version": run_command(["docker", "--version"], timeout_s),
        "docker_info": run_command(["docker", "info", "--format", DOCKER_INFO_FORMAT], timeout_s),
        "nvidia_ctk_version": run_command(["nvidia-ctk", "--version"], timeout_s),
    }
    files = {"docker_daemon_json": read_file(paths.docker_daemon_json)}
    for cdi_dir in paths.cdi_dirs:
        listing = read_file(cdi_dir)
        files[f"cdi:{cdi_dir}"] = listing
        for name in listing.entries or []:
            if name.endswith((".yaml", ".yml", ".json")):
                spec = read_file(str(Path(cdi_dir) / name))
                if spec.text is not None:
                    spec.text = spec.text[:4096]  # the spec names the kind; the rest is noise
                files[f"cdi:{cdi_dir}/{name}"] = spec
    return commands, files


def kubectl_argv(env: dict[str, str]) -> list[str]:
    """`kubectl`, else k3s's bundled `k3s kubectl`."""
    if shutil.which("kubectl", path=env.get("PATH")) or not shutil.which(
        "k3s", path=env.get("PATH")
    ):
        return ["kubectl"]
    return ["k3s", "kubectl"]


def kube_env(paths: ProbePaths, k3s_kubeconfig: FileFact) -> dict[str, str]:
    """The environment kubectl runs in: k3s's kubeconfig when the user has none of their own
    (what `k3s kubectl` does), so root reaches the box's cluster without KUBECONFIG."""
    env = dict(os.environ)
    user_kubeconfig = Path(paths.home) / ".kube" / "config"
    if not env.get("KUBECONFIG") and not user_kubeconfig.exists() and k3s_kubeconfig.exists:
        env["KUBECONFIG"] = paths.k3s_kubeconfig
    return env


def kube_request_timeout(timeout_s: float) -> str:
    """kubectl's own limit, a second inside the probe's: its error beats our kill."""
    return f"--request-timeout={max(1, int(timeout_s) - 1)}s"


def probe_kubernetes(
    config: HostConfig, paths: ProbePaths, timeout_s: float
) -> tuple[dict[str, CommandResult], dict[str, FileFact]]:
    files = {"k3s_kubeconfig": read_file(paths.k3s_kubeconfig)}
    env = kube_env(paths, files["k3s_kubeconfig"])
    kubectl = kubectl_argv(env)
    request_timeout = kube_request_timeout(timeout_s)
    commands: dict[str, CommandResult] = {}
    commands["kube_context"] = run_command([*kubectl, "config", "current-context"], timeout_s, env)
    if commands["kube_context"].ok:
        nodes = run_command(
            [*kubectl, "get", "nodes", "-o", "json", request_timeout], timeout_s, env
        )
        commands["kube_nodes"] = nodes
        if nodes.ok:  # an API that hung once will hang again: don't pay twice
            commands["kube_daemonsets"] = run_command(
                [*kubectl, "get", "daemonsets", "-A", "-o", "json", request_timeout], timeout_s, env
            )
            commands.update(probe_cluster_enforcement(kubectl, request_timeout, timeout_s, env))
            if config.kueue_local_queue:
                commands["kube_localqueues"] = run_command(
                    [
                        *kubectl,
                        "get",
                        "localqueues.kueue.x-k8s.io",
                        "-A",
                        "-o",
                        "json",
                        request_timeout,
                    ],
                    timeout_s,
                    env,
                )
    return commands, files


def probe_cluster_enforcement(
    kubectl: list[str], request_timeout: str, timeout_s: float, env: dict[str, str]
) -> dict[str, CommandResult]:
    """The jobs' service account, whether it may create pods, and the admission policies."""
    ns = ["-n", JOBS_NAMESPACE]
    return {
        "kube_job_account": run_command(
            [*kubectl, "get", "serviceaccount", JOB_SERVICE_ACCOUNT, *ns, "-o", "json",
             request_timeout],
            timeout_s,
            env,
        ),
        # `yes` (exit 0) or `no` (exit 1); impersonating needs the admin's kubeconfig.
        "kube_job_can_create_pods": run_command(
            [*kubectl, "auth", "can-i", "create", "pods",
             f"--as=system:serviceaccount:{JOBS_NAMESPACE}:{JOB_SERVICE_ACCOUNT}", *ns,
             request_timeout],
            timeout_s,
            env,
        ),
        "kube_admission": run_command(
            [*kubectl, "get", "validatingadmissionpolicy,validatingadmissionpolicybinding",
             "-o", "json", request_timeout],
            timeout_s,
            env,
        ),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------
# `doctor --gpu-pod`: the one probe that changes something (it starts a pod), so it is opted
# into, bounded by its own wait, and deletes the pod on every way out: a finish, a failure,
# the wait running out, an exception, and SIGINT/SIGTERM (`stop_on_signals` turns those into
# a `StopFlag` the wait loop reads, so the pod is deleted before doctor exits).

GPU_POD_POLL_S = 1.0
GPU_POD_EVENTS_EVERY = 5  # polls between looks at the events of a pod still Pending


class StopFlag:
    """Set from a signal handler (the main thread), read by a probe's wait (a worker thread)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout_s: float) -> bool:
        return self._event.wait(max(0.0, timeout_s))


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """Inside, SIGINT and SIGTERM set `flag` instead of ending doctor: the probes finish (the
    GPU pod is deleted) and the report says what was cut short. Off the main thread, where no
    handler can be installed, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in signums}

    def handler(signum: int, _frame: object) -> None:
        flag.set(signal.Signals(signum).name)

    for signum in signums:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


def probe_gpu_pod(
    config: HostConfig,
    env: dict[str, str],
    nodes: CommandResult | None,
    timeout_s: float,
    wait_s: float,
    stop: StopFlag,
    suffix: str | None = None,
) -> GpuPodFact:
    """Start one 1-GPU pod the way a job's pod starts (`gpupod.pod_manifest`), wait up to
    `wait_s` for it to finish or get stuck, keep its status, events and logs, delete it."""
    fact = GpuPodFact(
        pod=gpupod.pod_name(suffix or secrets.token_hex(3)),
        namespace=JOBS_NAMESPACE,
        wait_s=wait_s,
    )
    nodes_doc = _json_or_none(nodes.stdout) if nodes is not None and nodes.ok else None
    if not isinstance(nodes_doc, dict):
        fact.not_started = "the cluster's nodes could not be listed"
        return fact
    if not gpupod.allocatable_gpus(nodes_doc):
        fact.not_started = f"no node advertises {gpupod.GPU_RESOURCE}"
        return fact
    kubectl = kubectl_argv(env)
    limit = kube_request_timeout(timeout_s)
    ns = ["-n", fact.namespace]

    def kube(step: str, *args: str, input_text: str | None = None) -> CommandResult:
        result = run_command([*kubectl, *args, limit], timeout_s, env, input_text)
        fact.commands[step] = result
        return result

    classes = kube("runtimeclasses", "get", "runtimeclasses", "-o", "json")
    listed = kube("leftovers", "get", "pods", *ns, "-l", gpupod.SELECTOR, "-o", "json")
    old = gpupod.leftovers(_json_or_none(listed.stdout), time.time()) if listed.ok else []
    if old:
        kube("delete_leftovers", "delete", "pod", *old, *ns, "--wait=false", "--ignore-not-found")
    fact.manifest = gpupod.pod_manifest(
        config,
        fact.pod,
        runtime_class=classes.ok and gpupod.has_runtime_class(_json_or_none(classes.stdout)),
        wait_s=wait_s,
    )
    if fact.manifest is None:
        fact.not_started = (
            f"the host config's infra {config.infra!r} is not the box's Kubernetes: the house "
            "rules give its jobs no pod_config"
        )
        return fact
    if stop.is_set():
        fact.interrupted = stop.reason
        fact.not_started = f"interrupted by {stop.reason} before the pod was created"
        return fact
    start = time.monotonic()
    try:
        created = kube(
            "create", "create", "-f", "-", "-o", "name", input_text=json.dumps(fact.manifest)
        )
        if created.ok:
            _wait_for_gpu_pod(fact, kube, start, stop)
    finally:  # created or not (a create that timed out may have gone through), and on raise
        fact.waited_s = round(time.monotonic() - start, 3)
        kube("delete", "delete", "pod", fact.pod, *ns, "--wait=false", "--ignore-not-found")
    return fact


def _wait_for_gpu_pod(
    fact: GpuPodFact, kube: Callable[..., CommandResult], start: float, stop: StopFlag
) -> None:
    """Poll the pod until it finishes, gets stuck, vanishes, the wait runs out or a signal
    comes; then read its events and (once it ran) its logs."""
    ns = ["-n", fact.namespace]
    events = ("get", "events", *ns, "--field-selector", f"involvedObject.name={fact.pod}")
    state = gpupod.read_pod(None)
    while True:
        got = kube("pod", "get", "pod", fact.pod, *ns, "-o", "json")
        fact.polls += 1
        if got.ok:
            state = gpupod.read_pod(_json_or_none(got.stdout))
            if state.finished or state.stuck:
                break
            if state.phase == "Pending" and fact.polls % GPU_POD_EVENTS_EVERY == 0:
                seen = kube("events", *events, "-o", "json")
                if gpupod.stuck_event(gpupod.read_events(_json_or_none(seen.stdout))):
                    break
        elif "notfound" in got.stderr.lower().replace(" ", ""):
            break  # deleted under us (by hand, or an eviction): nothing more to see
        left = fact.wait_s - (time.monotonic() - start)
        if left <= 0:
            fact.timed_out = True
            break
        if stop.wait(min(GPU_POD_POLL_S, left)):
            fact.interrupted = stop.reason
            return  # straight to the delete
    kube("events", *events, "-o", "json")
    if state.exit_code is not None or state.phase in ("Running", "Succeeded", "Failed"):
        kube("logs", "logs", fact.pod, *ns)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def probe_skypilot(config: HostConfig, paths: ProbePaths, env: dict[str, str]) -> SkyFacts:
    sky = SkyFacts()
    try:
        sky.version = metadata.version("skypilot")
    except metadata.PackageNotFoundError:
        sky.version = None
    client_path = env.get("SKYPILOT_GLOBAL_CONFIG") or str(
        Path(paths.home) / ".sky" / "config.yaml"
    )
    sky.client_config = read_file(str(Path(client_path).expanduser()))
    sky.private_state_dir = read_file(str(Path(paths.home) / ".sky" / "api_server"))
    sky.endpoint, sky.endpoint_source = checks.resolve_endpoint(
        env, config, sky.client_config.text if sky.client_config else None
    )
    sky.processes = find_server_processes(paths.proc)
    port = endpoint_port(sky.endpoint)
    sky.server_configs = [
        read_file(p) for p in server_config_paths(config, sky.processes, env, port)
    ]
    sky.health, _ = http_get(sky.endpoint.rstrip("/") + "/api/health")
    if sky.health.status_code == 200:
        sky.enabled_infra, sky.enabled_infra_error = read_enabled_infra(sky.endpoint)
        sky.guard, _ = http_get(sky.endpoint.rstrip("/") + GUARD_ROUTE)
    return sky


def read_enabled_infra(endpoint: str) -> tuple[list[str] | None, str | None]:
    """The server's cached `sky check` result over plain HTTP: no `import sky` (seconds)."""
    base = endpoint.rstrip("/")
    first, headers = http_get(base + "/enabled_clouds?expand=False")
    request_id = headers.get("x-skypilot-request-id")
    if first.error or not request_id:
        return None, first.error or "the server returned no request id"
    result, _ = http_get(base + "/api/get?request_id=" + urllib.parse.quote(request_id))
    if result.error or result.body is None:
        return None, result.error or "empty answer"
    try:
        payload = json.loads(result.body)
        if payload.get("status") != "SUCCEEDED":
            return None, f"request {payload.get('status')}: {payload.get('error')}"
        infra = json.loads(payload["return_value"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"unexpected answer: {exc}"
    if not isinstance(infra, list):
        return None, "unexpected answer: not a list"
    return [str(x) for x in infra], None


def endpoint_port(endpoint: str | None) -> int | None:
    """The port of the configured API server's URL (None: not a URL with one)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(endpoint or "")
        return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None


def server_config_paths(
    config: HostConfig,
    processes: list[ServerProcess],
    env: dict[str, str],
    port: int | None = None,
) -> list[str]:
    """Where the configured API server's own config.yaml may be (admin_policy lives there):
    only a server process listening on the configured endpoint's port counts, never another
    user's private server on another port."""
    candidates: list[str] = []
    explicit = config.doctor.skypilot_server_config
    if explicit:
        candidates.append(str(explicit))
    for proc in processes:
        if port is not None and proc.port != port:
            continue
        if proc.home:
            candidates.append(str(Path(proc.home) / ".sky" / "config.yaml"))
    if env.get("SKYPILOT_GLOBAL_CONFIG"):
        candidates.append(env["SKYPILOT_GLOBAL_CONFIG"])
    return list(dict.fromkeys(candidates))


_PORT = re.compile(r"--port[= ](\d+)")


def find_server_processes(proc_dir: str = "/proc") -> list[ServerProcess]:
    """Running `sky.server.server` processes, with owner and (when readable) HOME."""
    found: list[ServerProcess] = []
    try:
        pids = [int(c.name) for c in Path(proc_dir).iterdir() if c.name.isdigit()]
    except OSError:
        return found
    for pid in sorted(pids):
        base = Path(proc_dir) / str(pid)
        try:
            args = (base / "cmdline").read_bytes().split(b"\0")
            uid = base.stat().st_uid
        except OSError:  # vanished, or hidden (hidepid)
            continue
        cmd = " ".join(a.decode("utf-8", errors="replace") for a in args if a)
        if "sky.server.server" not in cmd or "uvicorn.workers" in cmd:
            continue
        match = _PORT.search(cmd)
        home = None
        try:
            environ = (base / "environ").read_bytes().split(b"\0")
            for item in environ:
                if item.startswith(b"HOME="):
                    home = item[5:].decode("utf-8", errors="replace")
        except OSError:
            pass
        found.append(
            ServerProcess(
                pid=pid,
                uid=uid,
                user=hostio.user_name(uid),
                cmdline=cmd[:4096],  # room for every flag: doctor reads --host from it
                port=int(match.group(1)) if match else 46580,
                deploy="--deploy" in cmd.split(),
                home=home,
            )
        )
    # Worker children repeat the parent's command line: keep the top-most process only.
    parents = {p.pid for p in found}
    return [p for p in found if _ppid(proc_dir, p.pid) not in parents]


def _ppid(proc_dir: str, pid: int) -> int | None:
    try:
        stat = (Path(proc_dir) / str(pid) / "stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


_DIST = re.compile(r"^(?P<name>.+?)-(?P<version>[^-]+?)(?:-py[\d.]+)?(?:-[^-]*)?\.(dist|egg)-info$")


def read_site_packages(path: str, scope: str) -> SitePackages:
    """Distributions installed in one site-packages dir, from their metadata dir names."""
    site = SitePackages(path=path, scope=scope)
    try:
        names = [c.name for c in Path(path).iterdir()]
    except OSError as exc:
        site.error = exc.strerror or str(exc)
        return site
    dists: set[str] = set()
    for name in names:
        match = _DIST.match(name)
        if match:
            dists.add(f"{match.group('name')}=={match.group('version')}")
    site.distributions = sorted(dists, key=str.lower)
    return site


def probe_python_sites(paths: ProbePaths) -> list[SitePackages]:
    sites: list[SitePackages] = []
    seen: set[str] = set()
    patterns = [(p, "system") for p in paths.site_packages] + [
        (str(Path(paths.home) / p), "user") for p in paths.user_site_packages
    ]
    for pattern, scope in patterns:
        for path in _glob(pattern):
            real = os.path.realpath(path)
            if real in seen or not Path(path).is_dir():
                continue
            seen.add(real)
            sites.append(read_site_packages(path, scope))
    return sites


def probe_cuda_toolkits(paths: ProbePaths) -> list[CudaToolkit]:
    toolkits: list[CudaToolkit] = []
    for path in _glob(paths.cuda):
        p = Path(path)
        if not p.is_dir():
            continue
        toolkit = CudaToolkit(path=path, has_nvcc=(p / "bin" / "nvcc").exists())
        if p.is_symlink():
            toolkit.symlink_to = str(p.readlink())
        toolkit.version = _cuda_version(p)
        toolkits.append(toolkit)
    return toolkits


def _cuda_version(root: Path) -> str | None:
    try:
        data = json.loads((root / "version.json").read_text())
        return str(data["cuda"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        match = re.search(r"(\d+\.\d+(\.\d+)?)", (root / "version.txt").read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    named = re.search(r"cuda-(\d+\.\d+)$", root.name)  # pip/conda-style trees lack both files
    return named.group(1) if named else None


def probe_conda(paths: ProbePaths, extra: list[str]) -> list[str]:
    found: list[str] = []
    for pattern in [*paths.conda, *extra]:
        for path in _glob(pattern):
            if (Path(path) / "conda-meta").is_dir() and path not in found:
                found.append(path)
    return found


def probe_storage(path: str, mounts_file: str) -> PathFact:
    fact = PathFact(path=path)
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        fact.error = _parent_unsearchable(p)
        return fact
    except OSError as exc:
        fact.error = exc.strerror or str(exc)
        return fact
    fact.exists = True
    fact.is_dir = p.is_dir()
    fact.mode = st.st_mode & 0o7777
    fact.owner = hostio.user_name(st.st_uid)
    fact.group = hostio.group_name(st.st_gid)
    fact.writable_by_me = os.access(p, os.W_OK | os.X_OK)
    try:
        vfs = os.statvfs(p)
        fact.free_bytes = vfs.f_bavail * vfs.f_frsize
        fact.total_bytes = vfs.f_blocks * vfs.f_frsize
    except OSError as exc:
        fact.error = exc.strerror or str(exc)
    fact.mount_point, fact.fstype, fact.mount_source = _mount_of(os.path.realpath(p), mounts_file)
    return fact


def _mount_of(path: str, mounts_file: str) -> tuple[str | None, str | None, str | None]:
    """The longest mount point containing `path` (octal escapes as in /proc/mounts)."""
    best: tuple[str | None, str | None, str | None] = (None, None, None)
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        source, point, fstype = (_unescape(x) for x in parts[:3])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best[0] is None or len(point) >= len(best[0])):
            best = (point, fstype, source)
    return best


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def probe_schedules(
    paths: ProbePaths, timeout_s: float
) -> tuple[dict[str, CommandResult], dict[str, FileFact]]:
    files: dict[str, FileFact] = {}
    for pattern in paths.cron_files:
        for path in _glob(pattern):
            if Path(path).is_file():
                files[f"cron:{path}"] = read_file(path)
    spool = read_file(paths.cron_spool)
    files["cron_spool"] = spool
    for name in spool.entries or []:
        files[f"cron:{paths.cron_spool}/{name}"] = read_file(str(Path(paths.cron_spool) / name))
    for pattern in paths.systemd_units:
        for path in _glob(pattern):
            if Path(path).is_file():
                files[f"systemd:{path}"] = read_file(path)
    commands = {
        "crontab": run_command(["crontab", "-l"], timeout_s),
        "systemctl_timers": run_command(
            # Not --all: that lists stopped timers too, with no next run.
            ["systemctl", "list-timers", "--no-pager", "--no-legend"],
            timeout_s,
        ),
    }
    return commands, files


def probe_executables(candidates: list[str]) -> dict[str, ExecutableFact]:
    """Is each program a schedule names there, and executable (by root, who runs it)?"""
    out: dict[str, ExecutableFact] = {}
    for path in dict.fromkeys(candidates):
        fact = ExecutableFact(path=path)
        try:
            st = Path(path).stat()  # follows symlinks: a dangling one does not exist
            fact.exists = True
            fact.executable = stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)
            fact.resolved = str(Path(path).resolve())
        except FileNotFoundError:
            pass
        except OSError as exc:
            fact.error = exc.strerror or str(exc)
        out[path] = fact
    return out


CRON_DAEMONS = frozenset({"cron", "crond", "cronie", "fcron", "dcron", "bcron", "cronnext"})


def probe_cron_running(proc_dir: str = "/proc") -> bool | None:
    """Is a cron daemon running? None when processes are hidden from this user (hidepid)."""
    root = Path(proc_dir)
    if not (root / "1").exists():  # PID 1 hidden: so may cron be
        return None
    try:
        pids = [c for c in root.iterdir() if c.name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            comm = (pid / "comm").read_text().strip()
        except OSError:
            continue
        if comm in CRON_DAEMONS:
            return True
    return False


def probe_cluster(config: HostConfig, paths: ProbePaths, timeout_s: float) -> ClusterFacts:
    """A node of a cluster: its k3s config, the nodes as its kubelet sees them (an agent: the
    admin kubeconfig is the server's), the mount table, NTP, the server's clock, and (as
    root) whether a file can be written in the checkpoint root (created, then removed)."""
    from deskgpu import __version__
    from deskgpu.setup.nodes import K3S_PORT

    facts = ClusterFacts(deskgpu_version=__version__)
    facts.k3s_config = read_file(paths.k3s_config)
    facts.mounts = read_file(paths.mounts)
    agent = not Path(paths.k3s_kubeconfig).exists()
    if agent:
        kubectl = kubectl_argv(dict(os.environ))
        argv = [*kubectl, "--kubeconfig", paths.kubelet_kubeconfig, "get", "nodes", "-o", "json"]
        if Path(paths.kubelet_kubeconfig).exists():
            facts.nodes = run_command([*argv, kube_request_timeout(timeout_s)], timeout_s)
        else:
            facts.nodes = CommandResult(
                argv=argv,
                stderr=f"{paths.kubelet_kubeconfig}: no such file (k3s-agent has not started "
                "here, or cannot be read: run doctor as root)",
            )
    facts.ntp = run_command(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], timeout_s)
    server = config.server_node
    if agent and server is not None and server.address:
        url = f"https://{server.address}:{K3S_PORT}/ping"
        limit = str(max(1, int(timeout_s) - 1))
        facts.server_date = run_command(["curl", "-ksSI", "--max-time", limit, url], timeout_s)
        facts.server_date_at = time.time()
    if os.geteuid() == 0:
        facts.checkpoints_write = _try_write(config.checkpoint_root)
    return facts


def _try_write(directory: str) -> str:
    """'ok' when a new file can be created (and is removed) in `directory`, else why not."""
    path = Path(directory) / f".deskgpu-doctor-{secrets.token_hex(4)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        path.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return "ok"


def probe_records(config: HostConfig) -> RecordsFact:
    """The reap history's newest observation and the audit log's newest `reap --yes` run."""
    from deskgpu.config.reap import ReapSettings
    from deskgpu.errors import DeskgpuError
    from deskgpu.state.audit import last_reap_run
    from deskgpu.state.history import latest_observation

    try:
        settings = config.reap_settings
    except DeskgpuError:  # reap refuses the config itself; look where it would by default
        settings = ReapSettings(state_dir=config.state_dir)
    records = RecordsFact(
        history_path=str(settings.history_file), audit_path=str(settings.audit_file)
    )
    try:
        records.history_latest = latest_observation(settings.history_file)
        records.history_exists = True
    except FileNotFoundError:
        pass
    except PermissionError:
        records.history_exists = True
        records.history_error = "permission denied"
    except (OSError, DeskgpuError) as exc:
        records.history_exists = Path(settings.history_file).exists()
        records.history_error = str(exc)
    try:
        last = last_reap_run(settings.audit_file)  # OSError only; bad lines are skipped
        records.audit_exists = True
        if last is not None:
            records.audit_last_reap, records.audit_last_reap_id = last
    except FileNotFoundError:
        pass
    except PermissionError:
        records.audit_exists = True
        records.audit_error = "permission denied"
    except OSError as exc:
        records.audit_error = exc.strerror or str(exc)
    return records


def probe_telemetry(config: HostConfig, timeout_s: float) -> TelemetryFacts:
    """The Prometheus of `telemetry:`: ready, answering a query (its clock), its scrape
    targets, and dcgm-exporter's GPU series that a pod holds. Each step only when the one
    before answered; all of it within about `timeout_s` (a URL nothing listens on costs a
    refused connection, a black hole `timeout_s`)."""
    from deskgpu.config.telemetry import DCGM_JOB, NODE_LABEL
    from deskgpu.deadline import Deadline
    from deskgpu.errors import DeskgpuError
    from deskgpu.telemetry.gpus import POD_CLUSTER_LABELS, POD_USER_LABEL, UTIL
    from deskgpu.telemetry.promapi import Prometheus

    tele = config.telemetry
    assert tele is not None, "probe_telemetry needs telemetry:"
    facts = TelemetryFacts(url=tele.prometheus)
    facts.ready, _ = http_get(f"{tele.prometheus}/-/ready", timeout_s)
    if facts.ready.error is not None:
        return facts
    prom = Prometheus(tele.prometheus, Deadline.after(timeout_s))
    try:
        now = prom.query("vector(1)")
        facts.server_time = now[0].at if now else None
    except DeskgpuError as exc:
        facts.query_error = str(exc)
        return facts
    try:
        facts.targets = [
            ScrapeTargetFact(t.job, t.labels, t.health, t.last_scrape, t.last_error)
            for t in prom.targets()
        ]
    except DeskgpuError as exc:
        facts.targets_error = str(exc)
    keep = (NODE_LABEL, "gpu", "pod", "namespace", *POD_CLUSTER_LABELS, POD_USER_LABEL)
    try:
        held = prom.query(f'{UTIL}{{job="{DCGM_JOB}",pod!=""}}')
        facts.pod_series = [{k: s.labels[k] for k in keep if k in s.labels} for s in held]
    except DeskgpuError as exc:
        facts.pod_series_error = str(exc)
    return facts


# ---------------------------------------------------------------------------------------


def gather(
    config: HostConfig,
    paths: ProbePaths | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    nvml_reader: Callable[[], NvmlFacts] = read_nvml,
    gpu_pod_wait_s: float | None = None,
) -> HostFacts:
    """Run every probe (groups concurrently) and return what they saw. `gpu_pod_wait_s`: also
    run `probe_gpu_pod` (`doctor --gpu-pod`), waiting that long for its pod."""
    paths = paths or ProbePaths()
    stop = StopFlag()
    env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    uid = os.getuid()
    facts = HostFacts(
        gathered_at=time.time(),
        hostname=socket.gethostname(),
        user=hostio.user_name(uid),
        uid=uid,
        env=env,
    )

    def local() -> None:
        facts.python_sites = probe_python_sites(paths)
        facts.cuda_toolkits = probe_cuda_toolkits(paths)
        facts.nvcc_on_path = shutil.which("nvcc")
        facts.conda_installs = probe_conda(paths, list(config.doctor.conda_paths))
        facts.storage = {
            "data": probe_storage(config.data_root, paths.mounts),
            "checkpoints": probe_storage(config.checkpoint_root, paths.mounts),
        }
        commands, files = probe_schedules(paths, timeout_s)
        facts.commands.update(commands)
        facts.files.update(files)
        crontab = commands["crontab"]
        scheduled = find_scheduled(files, crontab.stdout if crontab.ok else None, facts.user)
        facts.executables = probe_executables([c for e in scheduled for c in e.candidates])
        facts.records = probe_records(config)
        facts.cron_running = probe_cron_running(paths.proc)

    def docker() -> None:
        commands, files = probe_docker(paths, timeout_s)
        facts.commands.update(commands)
        facts.files.update(files)

    def kube() -> None:
        if gpu_pod_wait_s is not None:  # asked for: a probe that raises leaves this, not None
            facts.gpu_pod = GpuPodFact(
                pod="",
                namespace=JOBS_NAMESPACE,
                wait_s=gpu_pod_wait_s,
                not_started="the kubernetes probe failed before it (see the notes)",
            )
        commands, files = probe_kubernetes(config, paths, timeout_s)
        facts.commands.update(commands)
        facts.files.update(files)
        if gpu_pod_wait_s is not None:
            kubectl_env = kube_env(paths, files["k3s_kubeconfig"])
            nodes = commands.get("kube_nodes")
            facts.gpu_pod = probe_gpu_pod(
                config, kubectl_env, nodes, timeout_s, gpu_pod_wait_s, stop
            )

    def nvml() -> None:
        facts.nvml = nvml_reader()

    def skypilot() -> None:
        facts.sky = probe_skypilot(config, paths, env)

    def cluster() -> None:
        facts.cluster = probe_cluster(config, paths, timeout_s)

    def telemetry() -> None:
        facts.telemetry = probe_telemetry(config, timeout_s)

    groups: dict[str, Callable[[], None]] = {
        "driver": nvml,
        "docker": docker,
        "kubernetes": kube,
        "skypilot": skypilot,
        "host files": local,
    }
    if config.nodes:
        groups["cluster"] = cluster
    if config.telemetry is not None:
        groups["telemetry"] = telemetry
    signals = stop_on_signals(stop) if gpu_pod_wait_s is not None else contextlib.nullcontext()
    with signals, concurrent.futures.ThreadPoolExecutor(max_workers=len(groups)) as pool:
        futures = {pool.submit(fn): name for name, fn in groups.items()}
        for future in concurrent.futures.as_completed(futures):
            exc = future.exception()
            if exc is not None:  # a probe bug must not stop the other checks
                facts.notes.append(
                    f"the {futures[future]} probe failed: {type(exc).__name__}: {exc}"
                )
    if uid != 0:
        facts.notes.append(
            "ran without root: other users' crontabs, their processes' environments and "
            "root-only files were not visible"
        )
    return facts
