"""`HostFacts`: everything doctor's probes saw on the host, as plain data.

Probes (`doctor.probes`) fill it; checks (`doctor.checks`) judge it. `--record` writes
`to_dict()`, `--facts` and the tests read it back through `from_dict()`, so recorded facts
from a real box and live ones go through the same checks. Command outputs are kept raw
(what `kubectl get nodes -o json` printed), so parsing them is part of what the checks,
and the tests, exercise. No I/O and no foreign imports here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from deskgpu import typedload
from deskgpu.typedload import shown

FACTS_VERSION = 1
DOCUMENT_KIND = "deskgpu.doctor/facts"


class FactsFormatError(ValueError):
    """A recorded facts file that this deskgpu cannot read."""


@dataclass
class CommandResult:
    """One external command: what ran and what came back. Never raises; failure is data."""

    argv: list[str]
    returncode: int | None = None  # None: it did not finish (missing binary, timeout)
    stdout: str = ""
    stderr: str = ""
    missing: bool = False  # the binary is not on PATH
    timed_out: bool = False
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def first_error_line(self) -> str:
        """The first non-empty stderr (else stdout) line, for one-line details."""
        if self.missing:
            return f"`{self.argv[0]}` not found on PATH"
        if self.timed_out:
            return f"`{' '.join(self.argv[:3])}` did not answer within {self.elapsed_s:.0f} s"
        for text in (self.stderr, self.stdout):
            for line in text.splitlines():
                if line.strip():
                    return line.strip()[:300]
        return f"exit status {self.returncode}"


@dataclass
class FileFact:
    """A file (or directory listing) doctor looked at."""

    path: str
    exists: bool = False
    text: str | None = None  # contents when readable (truncated to 64 KiB)
    error: str | None = None  # e.g. "permission denied": seen to exist, not readable
    entries: list[str] | None = None  # for a directory: the names in it


@dataclass
class PathFact:
    """A storage root (`/data`, `/checkpoints`): where it lives and who may write it."""

    path: str
    exists: bool = False
    is_dir: bool = False
    mode: int | None = None  # st_mode & 0o7777
    owner: str | None = None
    group: str | None = None
    writable_by_me: bool | None = None  # os.access(W_OK | X_OK) for the user running doctor
    free_bytes: int | None = None  # available to unprivileged users (statvfs f_bavail)
    total_bytes: int | None = None
    mount_point: str | None = None
    fstype: str | None = None  # e.g. ext4, xfs, nfs4
    mount_source: str | None = None  # e.g. /dev/nvme0n1p1, nas:/export
    error: str | None = None


@dataclass
class GpuSample:
    """One look at a GPU's thermals; doctor takes a few, spaced out, to see *sustained* slowdown."""

    at_s: float  # seconds since the first sample
    temperature_c: int | None = None  # temperature.gpu
    clocks_event_reasons: int | None = None  # clocks_event_reasons.active (NVML bitmask)
    power_draw_w: float | None = None  # power.draw


@dataclass
class GpuReading:
    """One GPU as NVML saw it; names follow `nvidia-smi --query-gpu=` fields."""

    index: int
    name: str | None = None  # name
    uuid: str | None = None  # uuid
    pci_bus_id: str | None = None  # pci.bus_id
    error: str | None = None  # e.g. "GPU is lost": readings below are missing
    memory_total_mib: float | None = None  # memory.total
    persistence_mode: bool | None = None  # persistence_mode
    ecc_mode_current: bool | None = None  # ecc.mode.current; None: not supported
    ecc_errors_uncorrected_volatile: int | None = None  # ecc.errors.uncorrected.volatile.total
    ecc_errors_uncorrected_aggregate: int | None = None  # ecc.errors.uncorrected.aggregate.total
    retired_pages_sbe: int | None = None  # retired_pages.sbe (pre-Ampere)
    retired_pages_dbe: int | None = None  # retired_pages.dbe
    retired_pages_pending: bool | None = None  # retired_pages.pending
    remapped_rows_correctable: int | None = None  # remapped_rows.correctable (Ampere+)
    remapped_rows_uncorrectable: int | None = None  # remapped_rows.uncorrectable
    remapped_rows_pending: bool | None = None  # remapped_rows.pending: reset needed
    remapped_rows_failure: bool | None = None  # remapped_rows.failure: replace the GPU
    temperature_slowdown_c: int | None = None  # temperature.gpu.tlimit's slowdown threshold
    temperature_shutdown_c: int | None = None
    power_limit_w: float | None = None  # power.limit
    samples: list[GpuSample] = field(default_factory=list)

    @property
    def temperature_c(self) -> int | None:
        """The hottest sample (None: no reading)."""
        temps = [s.temperature_c for s in self.samples if s.temperature_c is not None]
        return max(temps) if temps else None


@dataclass
class NvmlFacts:
    """The driver as NVML reports it."""

    available: bool = False
    error: str | None = None  # e.g. "NVML Shared Library Not Found"
    driver_version: str | None = None  # driver_version, e.g. "550.90.07"
    cuda_driver_version: str | None = None  # the CUDA version the driver supports, e.g. "12.4"
    nvml_version: str | None = None
    gpus: list[GpuReading] = field(default_factory=list)


@dataclass
class SitePackages:
    """One site-packages directory of a host (non-container, non-venv) Python."""

    path: str
    scope: str = "system"  # "system" (/usr/...), "user" (~/.local, pip install --user)
    distributions: list[str] = field(default_factory=list)  # "torch==2.3.1"
    error: str | None = None


@dataclass
class CudaToolkit:
    """A CUDA toolkit installed on the host (`/usr/local/cuda-12.4`)."""

    path: str
    version: str | None = None  # from version.json / version.txt
    has_nvcc: bool = False
    symlink_to: str | None = None  # /usr/local/cuda -> cuda-12.4


@dataclass
class ServerProcess:
    """A running SkyPilot API server process (`python -m sky.server.server ...`)."""

    pid: int
    uid: int | None = None
    user: str | None = None
    cmdline: str = ""
    port: int | None = None  # from --port (46580 when absent)
    deploy: bool = False  # started with `sky api start --deploy`
    home: str | None = None  # its HOME, when /proc/<pid>/environ was readable


@dataclass
class HttpFact:
    """One HTTP GET against the SkyPilot API server."""

    url: str
    status_code: int | None = None
    body: str | None = None  # response text (truncated)
    error: str | None = None  # connection refused, timeout, ...
    elapsed_s: float = 0.0


@dataclass
class SkyFacts:
    """SkyPilot as seen from this host: client install, endpoint, server, its config."""

    version: str | None = None  # installed skypilot distribution (importlib.metadata)
    endpoint: str | None = None  # the endpoint deskgpu uses
    endpoint_source: str | None = None  # "env", "host config", "sky config", "default"
    health: HttpFact | None = None  # GET <endpoint>/api/health
    guard: HttpFact | None = None  # GET <endpoint>/plugins/api/deskgpu/guard (the plugin)
    enabled_infra: list[str] | None = None  # server's cached `sky check` result
    enabled_infra_error: str | None = None
    processes: list[ServerProcess] = field(default_factory=list)
    private_state_dir: FileFact | None = None  # ~/.sky/api_server of the user running doctor
    client_config: FileFact | None = None  # ~/.sky/config.yaml or $SKYPILOT_GLOBAL_CONFIG
    server_configs: list[FileFact] = field(default_factory=list)


@dataclass
class ExecutableFact:
    """A program a schedule names (`/opt/deskgpu/bin/deskgpu`): is it there to run?"""

    path: str
    exists: bool = False  # follows symlinks: a link into a deleted venv does not exist
    executable: bool = False  # a regular file with an execute bit (cron and systemd run as root)
    resolved: str | None = None  # where symlinks lead
    error: str | None = None


@dataclass
class RecordsFact:
    """What reap's own records say: the newest observation and the newest `reap --yes` run."""

    history_path: str
    history_exists: bool = False
    history_latest: float | None = None  # unix seconds of the newest observation
    history_error: str | None = None  # unreadable or not a history
    audit_path: str | None = None
    audit_exists: bool = False
    audit_last_reap: float | None = None  # unix seconds of the newest `reap --yes` run
    audit_last_reap_id: str | None = None
    audit_error: str | None = None  # e.g. permission denied (root's 0640 file)


@dataclass
class GpuPodFact:
    """`doctor --gpu-pod`: one 1-GPU pod started the way a job's pod starts, and what came back.

    `commands` by step: `runtimeclasses`, `leftovers` (pods an earlier run left),
    `delete_leftovers`, `create` (the manifest on stdin), `pod` (the last `get pod -o json`),
    `events`, `logs`, `delete`. Absent steps were not reached.
    """

    pod: str  # its name
    namespace: str
    wait_s: float  # how long doctor would wait for it
    manifest: dict[str, Any] | None = None  # what `kubectl create -f -` was given
    not_started: str | None = None  # why no pod was created
    waited_s: float = 0.0  # from the create to the last look
    polls: int = 0
    timed_out: bool = False
    interrupted: str | None = None  # the signal that cut the wait short, e.g. "SIGTERM"
    commands: dict[str, CommandResult] = field(default_factory=dict)


@dataclass
class ClusterFacts:
    """What a node of a cluster (the host config's `nodes:`) sees of the cluster; gathered only
    with `nodes:`. Raw, as the tools answered: the checks parse it."""

    deskgpu_version: str | None = None  # this node's deskgpu
    k3s_config: FileFact | None = None  # /etc/rancher/k3s/config.yaml: an agent's node-name
    # `kubectl get nodes -o json` with this node's kubelet credentials (an agent has no admin
    # kubeconfig; the server's doctor reads `commands["kube_nodes"]`).
    nodes: CommandResult | None = None
    mounts: FileFact | None = None  # /proc/self/mounts: the shared storage's mounts
    checkpoints_write: str | None = None  # "ok", or why a test file could not be written there
    ntp: CommandResult | None = None  # `timedatectl show -p NTPSynchronized --value`
    server_date: CommandResult | None = None  # `curl -ksSI https://<server>:6443/ping`: its Date
    server_date_at: float | None = None  # our clock (unix seconds) when that answer came


@dataclass
class ScrapeTargetFact:
    """One of Prometheus' active scrape targets (`/api/v1/targets`)."""

    job: str  # the scrape pool: `dcgm-exporter`, `node-exporter`, ...
    labels: dict[str, str] = field(default_factory=dict)  # `node`, `instance`, ...
    health: str = "unknown"  # "up" | "down" | "unknown"
    last_scrape: float | None = None  # unix seconds, Prometheus' clock; None: never scraped
    last_error: str = ""


@dataclass
class TelemetryFacts:
    """The Prometheus `telemetry.prometheus` names, as doctor found it; gathered only with
    `telemetry:`. Each step after `ready` ran only when the one before answered."""

    url: str
    ready: HttpFact | None = None  # GET <url>/-/ready
    query_error: str | None = None  # an instant query (`vector(1)`) failed: why
    server_time: float | None = None  # that query's evaluation time: Prometheus' clock
    targets: list[ScrapeTargetFact] | None = None  # None: not listed (targets_error)
    targets_error: str | None = None
    # dcgm-exporter's GPU series that carry a `pod` label (a GPU allocated to a pod), with
    # the labels that tell whose: node, gpu, pod, namespace and the copied pod labels.
    pod_series: list[dict[str, str]] | None = None
    pod_series_error: str | None = None


@dataclass
class HostFacts:
    """Everything one doctor run gathered; checks are pure functions of this and the config."""

    gathered_at: float  # unix seconds
    hostname: str | None = None
    user: str | None = None
    uid: int | None = None
    facts_version: int = FACTS_VERSION
    env: dict[str, str] = field(default_factory=dict)  # the few variables doctor reads
    commands: dict[str, CommandResult] = field(default_factory=dict)  # by probe name
    files: dict[str, FileFact] = field(default_factory=dict)  # by probe name
    nvml: NvmlFacts = field(default_factory=NvmlFacts)
    python_sites: list[SitePackages] = field(default_factory=list)
    cuda_toolkits: list[CudaToolkit] = field(default_factory=list)
    nvcc_on_path: str | None = None
    conda_installs: list[str] = field(default_factory=list)
    storage: dict[str, PathFact] = field(default_factory=dict)  # "data", "checkpoints"
    sky: SkyFacts = field(default_factory=SkyFacts)
    # The programs scheduled commands name, by the path tried (see doctor.scheduled).
    executables: dict[str, ExecutableFact] = field(default_factory=dict)
    records: RecordsFact | None = None
    cron_running: bool | None = None  # a cron daemon process seen (None: could not tell)
    gpu_pod: GpuPodFact | None = None  # only with `doctor --gpu-pod`
    cluster: ClusterFacts | None = None  # only with the host config's `nodes:`
    telemetry: TelemetryFacts | None = None  # only with the host config's `telemetry:`
    notes: list[str] = field(default_factory=list)  # what a probe could not see, and why

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def command(self, name: str) -> CommandResult | None:
        return self.commands.get(name)

    def file(self, name: str) -> FileFact | None:
        return self.files.get(name)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": DOCUMENT_KIND}
        doc.update(asdict(self))
        if doc["gpu_pod"] is None:  # a run without --gpu-pod writes what it always wrote
            del doc["gpu_pod"]
        if doc["cluster"] is None:  # so does one box
            del doc["cluster"]
        if doc["telemetry"] is None:  # and a box that reads NVML
            del doc["telemetry"]
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> HostFacts:
        if not isinstance(doc, dict):
            raise FactsFormatError("recorded facts must be a JSON object")
        version = doc.get("facts_version")
        if version != FACTS_VERSION:
            raise FactsFormatError(
                f"recorded facts have facts_version {shown(version)}; "
                f"this deskgpu reads {FACTS_VERSION}"
            )
        if "gathered_at" not in doc:
            raise FactsFormatError("recorded facts lack `gathered_at`")
        try:
            return typedload.load(cls, doc, "")
        except typedload.TypedLoadError as exc:
            raise FactsFormatError(str(exc)) from None
