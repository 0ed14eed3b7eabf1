"""A real Prometheus scraping fake GPU nodes: dcgm-exporter and node_exporter's textfile collector.

Every node is served by two small HTTP servers on 127.0.0.1 (one per exporter, so each has its
own `instance`), rendering the node's *current* `NodeState` on every scrape. A test changes the
state (a GPU's utilisation, `dcgm_up=False`) and the next scrape sees it.

The dcgm-exporter exposition copies the exporter's own template
(NVIDIA/dcgm-exporter internal/pkg/rendermetrics/render_metrics.go, gpuMetricsFormat) and
HELP/TYPE lines (etc/default-counters.csv); pod labels are spelled as the exporter spells them
with `--kubernetes-enable-pod-labels` (internal/pkg/transformation/kubernetes.go, createPodInfo:
every character outside [a-zA-Z0-9_] becomes `_`, no prefix). tests/fixtures/telemetry/README.md
says where each shape came from.

`RealPrometheus` runs /usr/bin/prometheus (Debian's package) on a free port (never 9090) with two
scrape jobs, `dcgm-exporter` and `node-exporter`, one static target per node carrying the
label `node: <name>`. `history_lines` + `backfill` give it a past week through
`promtool tsdb create-blocks-from openmetrics`, with the very label sets a live scrape stores.

Backfill gotchas (all handled here; keep them in mind when changing it):
- Blocks must be written before Prometheus starts on the storage dir and must end before its
  head begins (end <= now at backfill time); a running Prometheus only picks new blocks up at
  its next reload/compaction and may refuse ones overlapping its head.
- `--storage.tsdb.retention.time` must exceed the backfilled span (default here 30d), or the
  blocks are deleted at startup.
- Within one series samples must be in time order (the block writer rejects out-of-order
  samples): the lines are written timestamp by timestamp.
- OpenMetrics timestamps are seconds (floats allowed), not milliseconds as in the Prometheus
  text format; the file must end with `# EOF`. No TYPE lines are written (a `counter` family
  would have to be named without `_total`); blocks keep no metadata anyway.
- promtool re-reads the whole file once per block: `--max-block-duration=24h` (a hidden flag
  in promtool 2.42) makes 8 passes over a week instead of 84.
- The scrape adds `job`, `instance` and the target's `node` label; the backfill adds the same
  three, so a range query spanning backfilled and live data sees one series, not two.
"""

from __future__ import annotations

import contextlib
import decimal
import functools
import json
import math
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
DCGM_JOB = "dcgm-exporter"
NODE_EXPORTER_JOB = "node-exporter"
# Ports no test may take: Prometheus' default and the deskgpu API server's.
FORBIDDEN_PORTS = frozenset({9090, 46580})

# dcgm-exporter names its host label `Hostname` up to release 4.5.3-4.8.2 and `hostname` on main
# since d5e5f51 (PR #655, 2026-05-12); a reader must accept both.
HOSTNAME_LABEL = "Hostname"
DRIVER_VERSION = "550.54.15"

# (field, type, help) exactly as in dcgm-exporter's etc/default-counters.csv, then the DCGM field
# type: int64 is printed "%d", double "%f" (internal/pkg/collector/gpu_collector.go toString).
DCGM_FIELDS: tuple[tuple[str, str, str, str], ...] = (
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", "int64"),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", "double"),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", "int64"),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", "int64"),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", "int64"),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", "int64"),
)

# deskgpu's own textfile metrics (names fixed by `deskgpu observe --textfile`).
TEXTFILE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    (
        "deskgpu_observe_timestamp_seconds",
        "gauge",
        "Unix time of deskgpu observe's last successful pass.",
    ),
    (
        "deskgpu_unmanaged_process_memory_used_bytes",
        "gauge",
        "GPU memory held by a process outside any deskgpu-managed pod.",
    ),
    (
        "deskgpu_session_ssh_connections",
        "gauge",
        "Open SSH connections into a session's pod.",
    ),
    (
        "deskgpu_session_cpu_seconds_total",
        "counter",
        "CPU seconds used by a session's pod.",
    ),
)

# node_exporter's own gauge from the textfile collector (collector/textfile.go).
NODE_TEXTFILE_SCRAPE_ERROR = (
    "node_textfile_scrape_error",
    "gauge",
    "1 if there was an error opening or reading a file, 0 otherwise",
)

_INVALID_LABEL_CHAR = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_label_name(name: str) -> str:
    """dcgm-exporter's utils.SanitizeLabelName: every char outside [a-zA-Z0-9_] becomes `_`."""
    return _INVALID_LABEL_CHAR.sub("_", name)


@dataclass
class GpuState:
    """One GPU as dcgm-exporter sees it; `pod*` set when the kubelet has it allocated to a pod."""

    index: int
    uuid: str
    model: str
    util_pct: float
    fb_used_mib: float
    fb_free_mib: float
    power_w: float = 70.0
    temp_c: float = 35.0
    xid: float = 0
    pod: str | None = None
    namespace: str | None = None
    container: str | None = None
    # The pod's Kubernetes labels, unsanitized (`skypilot-cluster`); only the pod's GPUs get them.
    pod_labels: dict[str, str] = field(default_factory=dict)

    @property
    def pci_bus_id(self) -> str:
        # DCGM's 8-digit-domain form ("00000000:1B:00.0"), a bus per GPU.
        return f"00000000:{0x18 + 0x10 * self.index:02X}:00.0"


@dataclass
class UnmanagedProc:
    """A GPU process outside every deskgpu pod, as `deskgpu observe --textfile` reports it."""

    gpu: int
    uuid: str
    pid: int
    user: str
    command: str
    vram_mib: float


@dataclass
class SessionActivity:
    """A session pod's activity; `cluster` is the cluster's name on the cloud. None: absent."""

    cluster: str
    ssh: int | None
    cpu_seconds_total: float | None


@dataclass
class NodeState:
    """A node's GPUs and deskgpu textfile facts; mutate it while served to change the scrapes."""

    name: str
    gpus: list[GpuState]
    unmanaged: list[UnmanagedProc] = field(default_factory=list)
    activity: list[SessionActivity] = field(default_factory=list)
    dcgm_up: bool = True
    node_exporter_up: bool = True
    # deskgpu_observe_timestamp_seconds; None: the time of the scrape (a live observer).
    observed_at: float | None = None


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: str


@dataclass(frozen=True)
class Targets:
    """A node's two scrape targets as host:port, which Prometheus stores as `instance`."""

    dcgm: str
    node_exporter: str


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_labels(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels)


def _format(kind: str, value: float) -> str:
    if kind == "int64":
        return str(round(value))
    return f"{value:f}"


def _gpu_labels(gpu: GpuState, hostname: str, hostname_label: str) -> tuple[tuple[str, str], ...]:
    """The label set, in the exporter's order: fixed ones, sorted Labels, sorted Attributes."""
    fixed = [
        ("gpu", str(gpu.index)),
        ("UUID", gpu.uuid),
        ("pci_bus_id", gpu.pci_bus_id),
        ("device", f"nvidia{gpu.index}"),
        ("modelName", gpu.model),
        (hostname_label, hostname),
    ]
    labels = {"DCGM_FI_DRIVER_VERSION": DRIVER_VERSION}
    attributes: dict[str, str] = {}
    if gpu.pod is not None:
        attributes = {
            "pod": gpu.pod,
            "namespace": gpu.namespace or "default",
            "container": gpu.container or "",
        }
        for key, value in gpu.pod_labels.items():
            name = sanitize_label_name(key)
            if name not in attributes:  # the exporter skips a pod label named like an attribute
                labels[name] = value
    return (*fixed, *sorted(labels.items()), *sorted(attributes.items()))


def dcgm_samples(
    node: NodeState, hostname: str, hostname_label: str = HOSTNAME_LABEL
) -> list[Sample]:
    """The node's dcgm-exporter samples, family by family in default-counters.csv order."""
    values: dict[str, Callable[[GpuState], float]] = {
        "DCGM_FI_DEV_GPU_TEMP": lambda g: g.temp_c,
        "DCGM_FI_DEV_POWER_USAGE": lambda g: g.power_w,
        "DCGM_FI_DEV_GPU_UTIL": lambda g: g.util_pct,
        "DCGM_FI_DEV_XID_ERRORS": lambda g: g.xid,
        "DCGM_FI_DEV_FB_FREE": lambda g: g.fb_free_mib,
        "DCGM_FI_DEV_FB_USED": lambda g: g.fb_used_mib,
    }
    label_sets = [(gpu, _gpu_labels(gpu, hostname, hostname_label)) for gpu in node.gpus]
    return [
        Sample(name, labels, _format(kind, values[name](gpu)))
        for name, _type, _help, kind in DCGM_FIELDS
        for gpu, labels in label_sets
    ]


def go_float(value: float) -> str:
    """A float as Go's strconv.FormatFloat(v, 'g', -1, 64), which node_exporter's expfmt prints."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign, digits, exponent = decimal.Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits))
    exp = len(text) + exponent - 1  # the decimal exponent of the first digit
    minus = "-" if sign else ""
    if exp < -4 or exp >= 6:  # shortest 'g': %e outside [1e-4, 1e6)
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{minus}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    return minus + format(decimal.Decimal(text).scaleb(exponent), "f")


def textfile_samples(node: NodeState, now: float) -> list[Sample]:
    """deskgpu's textfile samples; a session's None ssh/cpu value is an absent series."""
    observed = node.observed_at if node.observed_at is not None else now
    out = [Sample("deskgpu_observe_timestamp_seconds", (), go_float(observed))]
    labels: tuple[tuple[str, str], ...]
    for proc in node.unmanaged:
        labels = (
            ("gpu", str(proc.gpu)),
            ("uuid", proc.uuid),
            ("pid", str(proc.pid)),
            ("user", proc.user),
            ("command", proc.command),
        )
        value = go_float(proc.vram_mib * 1024 * 1024)
        out.append(Sample("deskgpu_unmanaged_process_memory_used_bytes", labels, value))
    for act in node.activity:
        if act.ssh is not None:
            labels = (("cluster", act.cluster),)
            out.append(Sample("deskgpu_session_ssh_connections", labels, go_float(act.ssh)))
    for act in node.activity:
        if act.cpu_seconds_total is not None:
            labels = (("cluster", act.cluster),)
            value = go_float(act.cpu_seconds_total)
            out.append(Sample("deskgpu_session_cpu_seconds_total", labels, value))
    return out


def _exposition(families: Sequence[tuple[str, str, str]], samples: Sequence[Sample]) -> str:
    lines: list[str] = []
    for name, kind, help_ in families:
        family = [s for s in samples if s.name == name]
        if not family:
            continue
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for s in family:
            rendered = "{" + _render_labels(s.labels) + "}" if s.labels else ""
            lines.append(f"{s.name}{rendered} {s.value}")
    return "".join(line + "\n" for line in lines)


def dcgm_exposition(node: NodeState, hostname: str, hostname_label: str = HOSTNAME_LABEL) -> str:
    """The node's /metrics as dcgm-exporter (pod labels on) serves it."""
    families = [(name, kind, help_) for name, kind, help_, _ in DCGM_FIELDS]
    return _exposition(families, dcgm_samples(node, hostname, hostname_label))


def textfile_exposition(node: NodeState, now: float | None = None) -> str:
    """deskgpu's textfile metrics as node_exporter serves them (plus its scrape-error gauge).

    node_exporter re-exposes a textfile through client_golang: families sorted by name, each
    series' labels sorted by name and the series by their label values, floats in Go's format.
    """
    stamp = time.time() if now is None else now
    samples = [
        Sample(s.name, tuple(sorted(s.labels)), s.value) for s in textfile_samples(node, stamp)
    ]
    samples.sort(key=lambda s: [v for _, v in s.labels])
    samples.append(Sample("node_textfile_scrape_error", (), "0"))
    families = sorted((*TEXTFILE_FAMILIES, NODE_TEXTFILE_SCRAPE_ERROR))
    return _exposition(families, samples)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never one of FORBIDDEN_PORTS."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in FORBIDDEN_PORTS:
            return port


class _Endpoint:
    """One exporter's HTTP server for one node: GET /metrics renders `render()`; None is a 503."""

    def __init__(self, render: Callable[[], str | None]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                text = render()
                if text is None:
                    self.send_error(503, "exporter stopped")
                    return
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # Prometheus may give up on a scrape (its timeout): nothing left to serve.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()


class NodeServer:
    """Serves N nodes, each with its own dcgm-exporter and node_exporter host:port.

    `nodes[name]` is the live NodeState (mutate it, or `set_node` a new one); each scrape renders
    the state of that moment. A context manager: the servers stop on every path.
    """

    def __init__(self, nodes: Iterable[NodeState], hostname_label: str = HOSTNAME_LABEL) -> None:
        self.nodes: dict[str, NodeState] = {n.name: n for n in nodes}
        self.hostname_label = hostname_label
        self.lock = threading.Lock()
        self._endpoints: dict[str, tuple[_Endpoint, _Endpoint]] = {}

    def _render_dcgm(self, name: str) -> str | None:
        with self.lock:
            node = self.nodes[name]
            return dcgm_exposition(node, node.name, self.hostname_label) if node.dcgm_up else None

    def _render_textfile(self, name: str) -> str | None:
        with self.lock:
            node = self.nodes[name]
            return textfile_exposition(node) if node.node_exporter_up else None

    def __enter__(self) -> NodeServer:
        try:
            for name in self.nodes:
                dcgm = _Endpoint(functools.partial(self._render_dcgm, name))
                textfile = _Endpoint(functools.partial(self._render_textfile, name))
                self._endpoints[name] = (dcgm, textfile)
                dcgm.start()
                textfile.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        for dcgm, textfile in self._endpoints.values():
            dcgm.stop()
            textfile.stop()
        self._endpoints.clear()

    def node(self, name: str) -> NodeState:
        return self.nodes[name]

    def set_node(self, state: NodeState) -> None:
        """Replace a served node's state (same name; a new node needs a new server)."""
        if state.name not in self._endpoints:
            raise KeyError(f"{state.name} is not served")
        with self.lock:
            self.nodes[state.name] = state

    def targets(self) -> dict[str, Targets]:
        return {
            name: Targets(dcgm=d.address, node_exporter=t.address)
            for name, (d, t) in self._endpoints.items()
        }


def _samples_at(
    state: NodeState, ts: float, targets: Targets, hostname_label: str
) -> Iterator[tuple[Sample, tuple[tuple[str, str], ...]]]:
    """Samples at `ts` with the labels a scrape adds (job, instance, node), `up` included."""

    def scrape_labels(job: str, instance: str) -> tuple[tuple[str, str], ...]:
        return (("instance", instance), ("job", job), ("node", state.name))

    dcgm_extra = scrape_labels(DCGM_JOB, targets.dcgm)
    yield Sample("up", (), "1" if state.dcgm_up else "0"), dcgm_extra
    if state.dcgm_up:
        for s in dcgm_samples(state, state.name, hostname_label):
            yield s, dcgm_extra
    node_extra = scrape_labels(NODE_EXPORTER_JOB, targets.node_exporter)
    yield Sample("up", (), "1" if state.node_exporter_up else "0"), node_extra
    if state.node_exporter_up:
        for s in textfile_samples(state, ts):
            yield s, node_extra


def history_lines(
    state_at: Callable[[float], Sequence[NodeState]],
    start: float,
    end: float,
    step: float,
    targets: Mapping[str, Targets] | None = None,
    hostname_label: str = HOSTNAME_LABEL,
) -> Iterator[str]:
    """OpenMetrics lines (timestamps in seconds, ending `# EOF`) for [start, end] every `step`.

    `state_at(ts)` gives the nodes at each instant; a node absent from `targets` gets the
    production-like instances `<node>:9400` / `<node>:9100`. Timestamp-major order, so every
    series is in time order.
    """
    if step <= 0 or end < start:
        raise ValueError("need step > 0 and start <= end")
    known = dict(targets or {})
    count = math.floor((end - start) / step + 1e-9) + 1
    for i in range(count):
        ts = start + i * step
        stamp = f"{ts:.3f}"
        for state in state_at(ts):
            where = known.get(state.name) or Targets(f"{state.name}:9400", f"{state.name}:9100")
            for sample, extra in _samples_at(state, ts, where, hostname_label):
                labels = _render_labels((*sample.labels, *extra))
                yield f"{sample.name}{{{labels}}} {sample.value} {stamp}\n"
    yield "# EOF\n"


def backfill(storage_dir: Path, series: Iterable[str], max_block_duration: str = "24h") -> None:
    """Write OpenMetrics `series` (lines, ending `# EOF`) as TSDB blocks into `storage_dir`.

    Run it before a RealPrometheus starts on `storage_dir`, for times before now.
    """
    _need(PROMTOOL)
    storage_dir.mkdir(parents=True, exist_ok=True)
    source = storage_dir.parent / f"{storage_dir.name}.backfill.om"
    with source.open("w") as f:
        f.writelines(series)
    try:
        result = subprocess.run(
            [
                PROMTOOL,
                "tsdb",
                "create-blocks-from",
                "openmetrics",
                "--quiet",
                f"--max-block-duration={max_block_duration}",
                str(source),
                str(storage_dir),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        source.unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(f"promtool backfill failed ({result.returncode}): {result.stderr}")


def _need(tool: str) -> None:
    """Skip without `tool`; in CI (CI=true) fail instead: .ci/run installs Debian's prometheus."""
    if Path(tool).is_file() and os.access(tool, os.X_OK):
        return
    message = f"{tool} not installed (Debian package prometheus)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI needs {message}")
    pytest.skip(message)


def _get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited 10 s later; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class RealPrometheus:
    """/usr/bin/prometheus scraping `targets` every second, on a free port, in `workdir`.

    Entering waits for /-/ready and for every target's first scrape (all `up` unless
    `require_up=False`); leaving (or any failure, KeyboardInterrupt included) kills the process.
    """

    def __init__(
        self,
        workdir: Path,
        targets: Mapping[str, Targets],
        *,
        storage_dir: Path | None = None,
        retention: str = "30d",
        scrape_interval: str = "1s",
        require_up: bool = True,
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = workdir
        self.targets = dict(targets)
        self.storage_dir = storage_dir or workdir / "tsdb"
        self.retention = retention
        self.scrape_interval = scrape_interval
        self.require_up = require_up
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        def job(name: str, pick: Callable[[Targets], str]) -> dict[str, Any]:
            return {
                "job_name": name,
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "static_configs": [
                    {"targets": [pick(t)], "labels": {"node": node}}
                    for node, t in sorted(self.targets.items())
                ],
            }

        return {
            "global": {"scrape_interval": self.scrape_interval},
            "scrape_configs": [
                job(DCGM_JOB, lambda t: t.dcgm),
                job(NODE_EXPORTER_JOB, lambda t: t.node_exporter),
            ],
        }

    def __enter__(self) -> RealPrometheus:
        _need(PROMETHEUS)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        consoles = self.workdir / "consoles"  # keep Prometheus off /etc/prometheus
        consoles.mkdir(exist_ok=True)
        args = [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.storage_dir}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--web.console.templates={consoles}",
            f"--web.console.libraries={consoles}",
            "--log.level=warn",
        ]
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc)

    def log_excerpt(self, head: int = 1000, tail: int = 2000) -> str:
        """The log's start (a flag or config error comes first) and end."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        if len(text) <= head + tail:
            return text
        return f"{text[:head]}\n[...]\n{text[-tail:]}"

    def _fail(self, why: str) -> RuntimeError:
        return RuntimeError(
            f"Prometheus at {self.url}: {why}\n--- its log ---\n{self.log_excerpt()}"
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        ready = False
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._fail(f"exited with {self._proc.returncode} while starting")
            if not ready:
                try:
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                        ready = resp.status == 200
                except (urllib.error.URLError, OSError):
                    pass
            if ready:
                last = self.active_targets()
                healths = [t.get("health") for t in last]
                expected = 2 * len(self.targets)
                wanted = {"up"} if self.require_up else {"up", "down"}
                if len(last) == expected and all(h in wanted for h in healths):
                    return
            time.sleep(0.1)
        if not ready:
            raise self._fail(f"not ready after {self.start_timeout:.0f}s")
        summary = ", ".join(
            f"{t.get('labels', {}).get('job')}/{t.get('labels', {}).get('node')}="
            f"{t.get('health')}{' (' + t['lastError'] + ')' if t.get('lastError') else ''}"
            for t in last
        )
        raise self._fail(
            f"targets not all scraped{' and up' if self.require_up else ''} after "
            f"{self.start_timeout:.0f}s: {summary or 'none active'}"
        )

    def api(self, path: str, **params: str | float) -> Any:
        """GET /api/v1/<path>; returns `data`, raising on a non-success answer."""
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            body = _get_json(url)
        except urllib.error.HTTPError as e:
            raise self._fail(f"{path} {params}: HTTP {e.code}: {e.read().decode()}") from e
        if body.get("status") != "success":
            raise self._fail(f"{path} {params}: {body}")
        return body["data"]

    def active_targets(self) -> list[dict[str, Any]]:
        data = self.api("targets", state="active")
        return list(data.get("activeTargets", []))

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant vector query: [{"metric": {...}, "value": [ts, "v"]}, ...]."""
        params: dict[str, str | float] = {"query": promql}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        return list(data["result"])

    def query_range(
        self, promql: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """Range query: [{"metric": {...}, "values": [[ts, "v"], ...]}, ...]."""
        data = self.api("query_range", query=promql, start=start, end=end, step=step)
        return list(data["result"])

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Poll an instant query until `predicate(result)` holds; the last result on failure."""
        deadline = time.monotonic() + timeout
        result = self.query(promql)
        while not predicate(result):
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql!r} after {timeout}s: {result}")
            time.sleep(0.2)
            result = self.query(promql)
        return result


@contextlib.contextmanager
def cluster(
    workdir: Path, nodes: Iterable[NodeState], **prometheus: Any
) -> Iterator[tuple[NodeServer, RealPrometheus]]:
    """NodeServer + RealPrometheus scraping it, both stopped on every path."""
    with (
        NodeServer(nodes) as server,
        RealPrometheus(workdir, server.targets(), **prometheus) as prom,
    ):
        yield server, prom
