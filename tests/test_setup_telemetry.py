"""`deskgpu setup render` with `telemetry:` (issue 29): the server node's Prometheus config and
flags, dcgm-exporter's Helm values, and every node's observe timer writing node_exporter's
textfile. Through the real CLI: `promtool check config` (the real one, Debian's `prometheus`
package) accepts the rendered prometheus.yml; each node appears once per job with its `node`
label and its address from `nodes:` (computed here from the config, not written out);
Prometheus keeps reap's window; every install.sh passes shellcheck and, run for real in a
private mount namespace, restarts Prometheus for new flags, reloads it for a new config and
leaves it alone when nothing changed. Without `telemetry:` none of this is rendered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.config import HostConfig, load_config
from deskgpu.config.telemetry import (
    DCGM_EXPORTER_PORT,
    DCGM_JOB,
    NODE_EXPORTER_JOB,
    NODE_EXPORTER_PORT,
    NODE_LABEL,
)
from deskgpu.doctor import probes
from deskgpu.doctor.checks import Check, run_checks
from deskgpu.doctor.facts import HostFacts
from deskgpu.errors import SpecError
from deskgpu.setup import telemetry as tele
from deskgpu.setup.render import K3S_KUBECONFIG, Tools, render, write
from deskgpu.setup.schedules import OBSERVE
from deskgpu.telemetry.gpus import POD_LABEL_ALLOWLIST
from deskgpu.units import parse_duration_s
from tests.conftest import EXAMPLES, HOST_CONFIG
from tests.promcluster import (
    PROMETHEUS,
    PROMTOOL,
    GpuState,
    NodeState,
    _need,
    dcgm_exposition,
    free_port,
    terminate,
    textfile_exposition,
)
from tests.test_install_sh import (
    KUBECTL,
    SYSTEM_PYTHON,
    _tree,
    run_in_private_mounts,
    systemctl_stub,
    upper_layers,
)

CLUSTER = EXAMPLES / "cluster/host-config.yaml"
PROM_YML = tele.PROMETHEUS_CONFIG.lstrip("/")
PROM_ARGS = tele.PROMETHEUS_DEFAULTS.lstrip("/")
DCGM_VALUES = tele.DCGM_VALUES.lstrip("/")
OPERATOR_VALUES = tele.GPU_OPERATOR_VALUES.lstrip("/")
TELEMETRY_FILES = {PROM_YML, PROM_ARGS, DCGM_VALUES, OPERATOR_VALUES}
OBSERVE_UNIT = f"etc/systemd/system/{OBSERVE.service}"


def _with_telemetry(tmp: Path, base: Path, telemetry: str, extra: str = "") -> Path:
    """`base`'s host config with a `telemetry:` line (and `extra` lines) appended."""
    path = tmp / f"{base.parent.name}-telemetry.yaml"
    path.write_text(f"{base.read_text()}\ntelemetry: {telemetry}\n{extra}")
    return path


def _render(cli, config: Path, out: Path, tools: list[str], *args: str) -> dict[str, Any]:
    result = cli(
        "setup", "render", "--config", str(config), "--out", str(out), "--json", *tools, *args
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def _paths(doc: dict[str, Any]) -> set[str]:
    return {f["path"] for f in doc["files"]}


@pytest.fixture
def cluster(cli, tmp_path: Path, installed_tools: list[str]) -> dict[str, Any]:
    """The 3-node example with telemetry on the server's address, every node rendered."""
    config_path = _with_telemetry(
        tmp_path, CLUSTER, "{prometheus: 'http://10.0.0.10:9090', scrape_interval: 5s}"
    )
    config = load_config(config_path)
    outs = {}
    for node in config.nodes:
        out = tmp_path / node.name
        outs[node.name] = (
            out,
            _render(cli, config_path, out, installed_tools, "--node", node.name),
        )
    return {"config": config, "path": config_path, "outs": outs}


@pytest.fixture
def single_box(cli, tmp_path: Path, installed_tools: list[str]) -> dict[str, Any]:
    config_path = _with_telemetry(tmp_path, HOST_CONFIG, "{prometheus: 'http://127.0.0.1:9190'}")
    out = tmp_path / "box"
    return {
        "config": load_config(config_path),
        "out": out,
        "doc": _render(cli, config_path, out, installed_tools),
    }


def _server(cluster: dict[str, Any]) -> Path:
    server = cluster["config"].server_node
    out: Path = cluster["outs"][server.name][0]
    return out


def _promtool_check(path: Path) -> None:
    _need(PROMTOOL)
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def _static_targets(prom: dict[str, Any]) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """job -> [(target, labels)] from a prometheus.yml's static_configs."""
    out: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for job in prom["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                out.setdefault(job["job_name"], []).append((target, static.get("labels", {})))
    return out


def _args(text: str) -> list[str]:
    """ARGS="..." of /etc/default/prometheus, split as the unit's `$ARGS` is."""
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ARGS=")]
    return shlex.split(shlex.split(line.removeprefix("ARGS="))[0])


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


# ---------------------------------------------------------------------------------------------
# What is rendered, and where


def test_the_server_gets_the_telemetry_files_and_the_agents_do_not(cluster) -> None:
    config = cluster["config"]
    for node in config.nodes:
        _, doc = cluster["outs"][node.name]
        if node.role == "server":
            assert _paths(doc) >= TELEMETRY_FILES
            by_path = {f["path"]: f for f in doc["files"]}
            assert by_path[PROM_YML]["destination"] == tele.PROMETHEUS_CONFIG
            assert by_path[PROM_ARGS]["destination"] == tele.PROMETHEUS_DEFAULTS
        else:
            assert not TELEMETRY_FILES & _paths(doc), node.name


def test_without_telemetry_nothing_of_it_is_rendered(cli, tmp_path, installed_tools) -> None:
    for config, nodes in (
        (HOST_CONFIG, [None]),
        (CLUSTER, [n.name for n in load_config(CLUSTER).nodes]),
    ):
        for node in nodes:
            out = tmp_path / f"{config.parent.name}-{node}"
            doc = _render(cli, config, out, installed_tools, *(["--node", node] if node else []))
            assert not TELEMETRY_FILES & _paths(doc)
            assert not any((out / p).exists() for p in TELEMETRY_FILES)
            assert "--textfile" not in (out / OBSERVE_UNIT).read_text()
            script = (out / "install.sh").read_text()
            assert "prometheus" not in script and "node-exporter" not in script


def test_every_nodes_observe_writes_node_exporters_textfile(cluster, single_box) -> None:
    outs = [out for out, _ in cluster["outs"].values()] + [single_box["out"]]
    for out in outs:
        unit = (out / OBSERVE_UNIT).read_text()
        (exec_start,) = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
        assert exec_start.endswith(f" observe --quiet --textfile {tele.DEFAULT_TEXTFILE_DIR}"), out
    cron = (single_box["out"] / "cron/deskgpu").read_text()
    assert f"--textfile {tele.DEFAULT_TEXTFILE_DIR}" in cron


def test_metrics_textfile_dir_wins_over_the_default(cli, tmp_path, installed_tools) -> None:
    path = _with_telemetry(
        tmp_path, HOST_CONFIG, "{prometheus: 'http://127.0.0.1:9190'}",
        "metrics_textfile_dir: /srv/node-exporter\n",
    )  # fmt: skip
    out = tmp_path / "box"
    _render(cli, path, out, installed_tools)
    assert "--textfile /srv/node-exporter" in (out / OBSERVE_UNIT).read_text()
    assert "[ -d /srv/node-exporter ] ||" in (out / "install.sh").read_text()


# ---------------------------------------------------------------------------------------------
# prometheus.yml


def test_promtool_accepts_the_clusters_and_the_single_boxs_config(cluster, single_box) -> None:
    _promtool_check(_server(cluster) / PROM_YML)
    _promtool_check(single_box["out"] / PROM_YML)


def test_every_node_is_scraped_once_per_job_at_its_address(cluster) -> None:
    config = cluster["config"]
    prom = yaml.safe_load((_server(cluster) / PROM_YML).read_text())
    assert prom["global"]["scrape_interval"] == "5s"
    assert parse_duration_s(prom["global"]["scrape_timeout"]) <= 5
    found = _static_targets(prom)
    assert set(found) == {DCGM_JOB, NODE_EXPORTER_JOB}
    for job, port, nodes in (
        (DCGM_JOB, DCGM_EXPORTER_PORT, [n for n in config.nodes if n.gpus]),
        (NODE_EXPORTER_JOB, NODE_EXPORTER_PORT, list(config.nodes)),
    ):
        want = sorted((f"{n.address or '127.0.0.1'}:{port}", {NODE_LABEL: n.name}) for n in nodes)
        assert sorted(found[job], key=str) == sorted(want, key=str), job
        names = [labels[NODE_LABEL] for _, labels in found[job]]
        assert len(names) == len(set(names)) == len(nodes)


def test_a_single_box_is_one_node_named_box_name_on_loopback(single_box) -> None:
    config = single_box["config"]
    found = _static_targets(yaml.safe_load((single_box["out"] / PROM_YML).read_text()))
    assert found == {
        DCGM_JOB: [(f"127.0.0.1:{DCGM_EXPORTER_PORT}", {NODE_LABEL: config.box_name})],
        NODE_EXPORTER_JOB: [(f"127.0.0.1:{NODE_EXPORTER_PORT}", {NODE_LABEL: config.box_name})],
    }


def test_a_node_without_gpus_gets_no_dcgm_exporter_target(tmp_path) -> None:
    text = CLUSTER.read_text().replace("    gpus: {A6000: 4}\n", "")
    path = tmp_path / "gpuless-server.yaml"
    path.write_text(f"{text}\ntelemetry: {{prometheus: 'http://127.0.0.1:9090'}}\n")
    config = load_config(path)
    result = render(config, Tools("/usr/bin/python3", "/usr/bin/true"), path.read_text())
    prom = yaml.safe_load(result.by_path()[PROM_YML].text)
    found = _static_targets(prom)
    server = config.server_node
    assert server is not None and not server.gpus
    assert server.name not in {labels[NODE_LABEL] for _, labels in found[DCGM_JOB]}
    assert server.name in {labels[NODE_LABEL] for _, labels in found[NODE_EXPORTER_JOB]}
    assert any(server.name in note and "dcgm-exporter" in note for note in result.notes)


# ---------------------------------------------------------------------------------------------
# /etc/default/prometheus


@pytest.mark.parametrize("retention", [None, "30d", "36h"])
def test_prometheus_keeps_reaps_window(tmp_path, retention) -> None:
    extra = f"reap: {{retention: {retention}}}\n" if retention else ""
    path = _with_telemetry(tmp_path, HOST_CONFIG, "{prometheus: 'http://127.0.0.1:9190'}", extra)
    config = load_config(path)
    result = render(config, Tools("/usr/bin/python3", "/usr/bin/true"), path.read_text())
    args = _args(result.by_path()[PROM_ARGS].text)
    kept = _flag(args, "storage.tsdb.retention.time")
    assert re.fullmatch(r"[0-9]+d", kept), kept  # in days
    assert parse_duration_s(kept) >= config.reap_settings.retention_s + 86400  # and a margin


@pytest.mark.parametrize(
    ("url", "listen"),
    [
        ("http://127.0.0.1:9190", "127.0.0.1:9190"),
        ("http://localhost:9091", "127.0.0.1:9091"),
        ("http://10.0.0.10:9095", "10.0.0.10:9095"),
        ("http://lab-a6000:9090", ":9090"),
    ],
)
def test_prometheus_listens_where_the_url_says(tmp_path, url, listen) -> None:
    path = _with_telemetry(tmp_path, CLUSTER, f"{{prometheus: '{url}'}}")
    config = load_config(path)
    result = render(config, Tools("/usr/bin/python3", "/usr/bin/true"), path.read_text())
    assert _flag(_args(result.by_path()[PROM_ARGS].text), "web.listen-address") == listen


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://10.0.0.11:9090", "10.0.0.11 is not the server node lab-a6000 (10.0.0.10)"),
        ("http://prometheus.example.org:9090", "is not the server node"),
        ("https://127.0.0.1:9090", "plain-HTTP Prometheus"),
        ("http://127.0.0.1", "cannot listen on port 80"),
    ],
)
def test_a_prometheus_url_render_cannot_serve_is_exit_2_at_its_line(
    cli, tmp_path, installed_tools, url, said
) -> None:
    path = _with_telemetry(tmp_path, CLUSTER, f"{{prometheus: '{url}'}}")
    line = path.read_text().splitlines().index(f"telemetry: {{prometheus: '{url}'}}") + 1
    out = tmp_path / "out"
    result = cli("setup", "render", "--config", str(path), "--out", str(out), *installed_tools)
    assert result.exit_code == 2
    assert f"{path.absolute()}:{line}:" in result.stderr
    assert "telemetry.prometheus" in result.stderr and said in result.stderr
    assert "(use http://" in result.stderr or "(name the port" in result.stderr
    assert not out.exists()  # refused before anything was written


def test_a_single_box_serves_prometheus_on_loopback_only(tmp_path) -> None:
    path = _with_telemetry(tmp_path, HOST_CONFIG, "{prometheus: 'http://gpubox.lab:9090'}")
    config = load_config(path)
    with pytest.raises(SpecError, match="is not loopback") as caught:
        render(config, Tools("/usr/bin/python3", "/usr/bin/true"), path.read_text())
    assert caught.value.exit_status == 2
    assert f"{path}:" in str(caught.value)  # located
    # A config built in code has no lines: the key names the place.
    with pytest.raises(SpecError, match=r"telemetry\.prometheus: .*is not loopback"):
        render(config, Tools("/usr/bin/python3", "/usr/bin/true"))


# ---------------------------------------------------------------------------------------------
# dcgm-exporter's values


def test_the_values_turn_pod_labels_on_with_the_readers_allowlist(cluster, single_box) -> None:
    for out in (_server(cluster), single_box["out"]):
        chart = yaml.safe_load((out / DCGM_VALUES).read_text())
        assert chart["kubernetes"]["enablePodLabels"] is True
        assert chart["kubernetes"]["podLabelAllowlistRegex"] == [POD_LABEL_ALLOWLIST]
        assert chart["kubernetes"]["rbac"] == {"create": True}
        assert chart["hostNetwork"] is True  # served on <address>:9400, where it is scraped
        operator = yaml.safe_load((out / OPERATOR_VALUES).read_text())["dcgmExporter"]
        assert operator["enablePodLabels"] is True and operator["hostNetwork"] is True
        assert operator["podLabelAllowlistRegex"] == [POD_LABEL_ALLOWLIST]
        assert POD_LABEL_ALLOWLIST in (out / DCGM_VALUES).read_text()
    # On a cluster, only where install.sh put the GPU label.
    chart = yaml.safe_load((_server(cluster) / DCGM_VALUES).read_text())
    assert chart["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_the_allowlist_keeps_skypilots_labels_and_drops_others() -> None:
    """dcgm-exporter matches the regex (Go's, unanchored; this one is anchored) on the pod
    label's own key, before sanitising it."""
    rx = re.compile(POD_LABEL_ALLOWLIST)
    for kept in ("skypilot-cluster", "skypilot-cluster-name", "skypilot-user"):
        assert rx.search(kept), kept
    for dropped in ("parent", "skypilot-head-node", "app.kubernetes.io/name", "xskypilot-user"):
        assert not rx.search(dropped), dropped


# ---------------------------------------------------------------------------------------------
# install.sh


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_every_install_script_passes_shellcheck(cluster, single_box) -> None:
    outs = [out for out, _ in cluster["outs"].values()] + [single_box["out"]]
    for out in outs:
        result = subprocess.run(
            ["shellcheck", "--shell=sh", str(out / "install.sh")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (out, result.stdout + result.stderr)


def test_every_install_script_needs_node_exporter_and_the_server_prometheus(cluster) -> None:
    for node in cluster["config"].nodes:
        script = (cluster["outs"][node.name][0] / "install.sh").read_text()
        assert "sudo apt-get install prometheus-node-exporter" in script, node.name
        enables = [ln for ln in script.splitlines() if ln.startswith("systemctl enable --now ")]
        assert any(tele.NODE_EXPORTER_UNIT in ln.split() for ln in enables), node.name
        assert ("promtool check config" in script) == (node.role == "server"), node.name


# Run for real: systemctl is tests/test_install_sh.py's stub, restarts and reloads accepted
# and remembered; promtool and prometheus are Debian's own.
needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("useradd") is None,
    reason="needs root, unshare and useradd: a private mount namespace",
)


def _installs(tmp: Path, boxes: list[Path]) -> dict[str, Any]:
    """Run each box's install.sh in turn, in one private mount namespace whose /etc and
    /var/lib are overlays (the real ones are never written); what each run asked systemctl."""
    bin_dir, state_path, log = tmp / "stub-bin", tmp / "state.json", tmp / "calls.log"
    bin_dir.mkdir()
    state_path.write_text(json.dumps({"objects": {}, "labels": {}, "enabled": []}))
    python = sys.executable
    stubs = {
        "kubectl": KUBECTL.format(python=python, kubeconfig=K3S_KUBECONFIG),
        "systemctl": systemctl_stub(python, restarts=True),
        "systemd-tmpfiles": "#!/bin/sh\nexit 0\n",
        # Debian's node_exporter is a daemon this test does not run: present, nothing more.
        tele.NODE_EXPORTER_PACKAGE: "#!/bin/sh\nexit 0\n",
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    runs = []
    for i, box in enumerate(boxes):
        runs += [
            f"echo '--- run {i}' >> {log}",
            f'sh {box}/install.sh > {tmp}/run{i}.out 2>&1 || {{ echo "run {i}: $?"; exit 1; }}',
        ]
    lines = [
        f"mkdir -p /run/systemd/system {Path(K3S_KUBECONFIG).parent}",
        f"mkdir -p {tele.DEFAULT_TEXTFILE_DIR}",  # what Debian's node_exporter package makes
        f"echo 'apiVersion: v1' > {K3S_KUBECONFIG}",
        *runs,
    ]
    env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "STUB_STATE": str(state_path),
        "STUB_LOG": str(log),
    }
    done = run_in_private_mounts(tmp, lines, env, timeout=180)
    etc_up, _ = upper_layers(tmp)
    outputs = {p.name: p.read_text() for p in sorted(tmp.glob("run*.out"))}
    assert done.returncode == 0, (done.stdout, done.stderr, outputs)
    calls = [part.split("\n", 1)[1] for part in log.read_text().split("--- run ")[1:]]
    return {"calls": calls, "etc": _tree(etc_up), "state": json.loads(state_path.read_text())}


def _box(tmp: Path, name: str, **telemetry: str) -> Path:
    deskgpu = tmp / "opt/deskgpu/bin/deskgpu"
    if not deskgpu.exists():
        deskgpu.parent.mkdir(parents=True)
        deskgpu.write_text("#!/bin/sh\n")
        deskgpu.chmod(0o755)
    retention = telemetry.pop("retention", None)
    config = HostConfig(
        box_name="lab",
        gpus={"A6000": 4},
        telemetry={"prometheus": "http://127.0.0.1:9190", **telemetry},
        reap={"retention": retention} if retention else {},
    )
    box = tmp / name
    write(render(config, Tools(SYSTEM_PYTHON, str(deskgpu))), box)
    return box


@needs_namespaces
def test_install_restarts_prometheus_for_new_flags_reloads_it_for_a_new_config(tmp_path) -> None:
    _need(PROMTOOL)
    first = _box(tmp_path, "first")
    interval = _box(tmp_path, "interval", scrape_interval="30s")  # another prometheus.yml
    retention = _box(tmp_path, "retention", scrape_interval="30s", retention="20d")  # ARGS
    result = _installs(tmp_path, [first, first, interval, retention, retention])
    unit = tele.PROMETHEUS_UNIT
    restart, reload = f"systemctl restart {unit}\n", f"systemctl reload-or-restart {unit}\n"
    calls = result["calls"]
    # The first install replaced the package's files: a restart (its flags changed).
    assert restart in calls[0] and reload not in calls[0]
    # The same files again: Prometheus is left as it runs.
    assert restart not in calls[1] and reload not in calls[1], calls[1]
    # Only prometheus.yml changed: a reload. Then only the flags: a restart. Then nothing.
    assert reload in calls[2] and restart not in calls[2]
    assert restart in calls[3] and reload not in calls[3]
    assert restart not in calls[4] and reload not in calls[4]
    for run in calls:
        assert f"systemctl enable --now {unit} {tele.NODE_EXPORTER_UNIT}\n" in run
    assert {unit, tele.NODE_EXPORTER_UNIT} <= set(result["state"]["enabled"])
    # What the last run left installed is the last render's, byte for byte.
    for path in (PROM_YML, PROM_ARGS, DCGM_VALUES):
        installed = result["etc"][path.removeprefix("etc/")]
        assert installed[3] == hashlib.sha256((retention / path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The rendered files, run: Debian's Prometheus with the rendered config and flags


class _Exporter:
    """One exporter of one node at `host:port` (a loopback address of its own per node, so
    the rendered targets, `<address>:9400` and `:9100`, are the ones served)."""

    def __init__(self, host: str, port: int, render: Callable[[], str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)
        self.server.server_close()


@contextlib.contextmanager
def _exporters(states: list[NodeState], hosts: list[str]) -> Iterator[None]:
    started: list[_Exporter] = []
    try:
        for state, host in zip(states, hosts, strict=True):
            for port, render_ in (
                (DCGM_EXPORTER_PORT, lambda s=state: dcgm_exposition(s, s.name)),
                (NODE_EXPORTER_PORT, lambda s=state: textfile_exposition(s)),
            ):
                try:
                    started.append(_Exporter(host, port, render_))
                except OSError as exc:  # a real exporter of this host holds the port
                    pytest.skip(f"cannot serve {host}:{port} ({exc.strerror})")
        yield
    finally:
        for exporter in started:
            exporter.stop()


@contextlib.contextmanager
def _rendered_prometheus(out: Path, workdir: Path) -> Iterator[None]:
    """/usr/bin/prometheus as Debian's unit runs it (`$ARGS` from the rendered
    /etc/default/prometheus, the rendered config), its storage and consoles in `workdir`."""
    _need(PROMETHEUS)
    workdir.mkdir()
    args = [
        PROMETHEUS,
        f"--config.file={out / PROM_YML}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.console.templates={workdir}",
        f"--web.console.libraries={workdir}",
        *_args((out / PROM_ARGS).read_text()),
    ]
    with (workdir / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=workdir, start_new_session=True,
        )  # fmt: skip
    try:
        yield
    finally:
        terminate(proc)


def _loopback_lab(tmp: Path, port: int) -> Path:
    """The 3-node example, each node at a loopback address of its own, Prometheus on `port`."""
    text = CLUSTER.read_text()
    for i, address in enumerate(("10.0.0.10", "10.0.0.11", "10.0.0.12")):
        text = text.replace(address, f"127.0.0.{i + 2}")
    path = tmp / "loopback-lab.yaml"
    path.write_text(
        f"{text}\ntelemetry: {{prometheus: 'http://127.0.0.1:{port}', scrape_interval: 1s, "
        "stale_after: 30s}\n"
    )
    return path


def test_the_rendered_prometheus_scrapes_every_node_and_doctor_says_ok(tmp_path) -> None:
    port = free_port()
    path = _loopback_lab(tmp_path, port)
    config = load_config(path)
    out = tmp_path / "server"
    write(render(config, Tools("/usr/bin/python3", "/usr/bin/true"), path.read_text()), out)
    labels = {"skypilot-cluster-name": "train-1a2b", "skypilot-user": "alice"}
    states = [
        NodeState(
            n.name,
            [
                GpuState(
                    0, f"GPU-{i}", "NVIDIA H100 80GB HBM3", 50, 1024, 1024,
                    pod="train-1a2b-head" if i == 0 else None, namespace="default",
                    pod_labels=labels if i == 0 else {},
                )
            ],
        )
        for i, n in enumerate(config.nodes)
    ]  # fmt: skip
    with (
        _exporters(states, [n.address or "" for n in config.nodes]),
        _rendered_prometheus(out, tmp_path / "prom"),
    ):
        checks: dict[str, Check] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            facts = HostFacts(
                gathered_at=time.time(),
                hostname="lab-a6000",
                telemetry=probes.probe_telemetry(config, 2.0),
            )
            checks = {c.id: c for c in run_checks(facts, config) if c.component == "telemetry"}
            if all(c.status == "ok" for c in checks.values()):
                break
            time.sleep(0.5)
    assert {i: c.status for i, c in checks.items()} == dict.fromkeys(
        ("telemetry.prometheus", "telemetry.targets", "telemetry.pod_labels"), "ok"
    ), checks
    assert "3 nodes (lab-a6000, lab-h100-1, lab-h100-2): 6 targets up" in (
        checks["telemetry.targets"].detail
    )
