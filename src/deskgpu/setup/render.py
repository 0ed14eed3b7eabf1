"""Every file the box needs, generated from the host config: one source, nothing hand-copied.

Pure: `render(config, tools, config_text)` returns the files as text; `write(files, out)` is
the only I/O. The GPU count lives in the host config's `gpus:` and nowhere else; Kueue's quota,
the API server's endpoint, the roots' permissions and the schedules are all computed from it.

Paths mirror where each file is installed (`etc/systemd/system/...` -> `/etc/systemd/...`);
the generated `install.sh` copies them there. The host config they were rendered from is one
of them (`etc/deskgpu/config.yaml`, the file that was read, byte for byte): the box always
reads the system path, so no unit needs `DESKGPU_CONFIG`. Which programs the units run
(`Tools`) is checked by `deskgpu.setup.tools`, not here, so tests render with any.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from deskgpu.config import SYSTEM_CONFIG, HostConfig
from deskgpu.config.doctor import DoctorSettings
from deskgpu.config.nodes import Node, SharedStorage
from deskgpu.config.telemetry import DEFAULT_TEXTFILE_DIR, Telemetry
from deskgpu.errors import SpecError, UsageError
from deskgpu.kubenames import (
    ACCELERATOR_LABEL,
    JOB_SERVICE_ACCOUNT,
    JOBS_NAMESPACE,
    NVIDIA_RUNTIME_CLASS,
    accelerator_label_value,
)
from deskgpu.setup import catalog, cluster, nodes
from deskgpu.setup import telemetry as telemetry_files
from deskgpu.setup.schedules import CRON_FILE, OBSERVE, REAP, Schedule

POLICY_CLASS = "deskgpu.policy.HouseRules"
GUARD_CLASS = "deskgpu.policy.Guard"
# == sky.server.constants WEBSOCKETS_MAX_HEADER_LINE_LENGTH / _NUM_HEADERS, which `sky api
# start` puts in its server's environment (read at import time); a test keeps them equal.
SERVER_WEBSOCKET_LIMITS = {
    "WEBSOCKETS_MAX_LINE_LENGTH": "65536",
    "WEBSOCKETS_MAX_NUM_HEADERS": "256",
}  # the server plugin that makes the policy a boundary
DEFAULT_ENDPOINT = "http://127.0.0.1:46580"  # == skyapi.DEFAULT_ENDPOINT (no sky import here)
SERVER_UNIT = "skypilot-api.service"
SERVER_USER = "skypilot"
SERVER_HOME = "/var/lib/skypilot"
K3S_KUBECONFIG = "/etc/rancher/k3s/k3s.yaml"
KUBECONFIG_UNIT = "skypilot-kubeconfig"  # .path watches k3s's file, .service copies it
KUBECONFIG_PATH_UNIT = f"{KUBECONFIG_UNIT}.path"
COPY = "/usr/bin/install"  # coreutils: copies with owner and mode in one step
KUEUE_API = "kueue.x-k8s.io/v1beta1"
KUEUE_NAMESPACE = JOBS_NAMESPACE  # SkyPilot's pods land in the kube context's namespace
KUBE_DIR = "kube"  # manifests install.sh applies to the cluster
JOB_IDENTITY_FILE = f"{KUBE_DIR}/deskgpu-job.yaml"
ADMISSION_FILE = f"{KUBE_DIR}/deskgpu-admission.yaml"
RUNTIME_CLASS_FILE = f"{KUBE_DIR}/nvidia-runtimeclass.yaml"
KUEUE_FLAVOR = "default-flavor"
GPU_RESOURCE = "nvidia.com/gpu"
DOCS = "https://github.com/deskgpu/deskgpu"
# The page (and heading) the observe and reap units point at; tests/test_docs.py holds it.
SCHEDULES_DOC = "docs/reap.md#zombie-sessions-deskgpu-observe-and-deskgpu-reap"
INSTALL_DOC = "docs/setup.md#3-deskgpu-into-optdeskgpu"
K3S_DOC = "docs/setup.md#5-k3s-with-the-nvidia-runtime"
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Tools:
    """Where the box's programs live (defaults: the ones running this command)."""

    python: str  # the interpreter with deskgpu + SkyPilot installed: runs the API server
    deskgpu: str  # the `deskgpu` console script: runs reap and observe


@dataclass(frozen=True)
class SetupFile:
    """One generated file: where it goes on the host, its text, and what it is for."""

    path: str  # relative to the output dir; the install destination is "/" + path
    text: str
    mode: int
    purpose: str
    owner: str = "root"
    optional: bool = False  # installed by hand (Kueue, the cron alternative)
    install_to: str | None = ""  # "": at "/" + path; None: not copied (applied, or run)
    apply: bool = False  # install.sh applies it to the cluster (`kubectl apply -f`)
    # With `apply`: applied only when this object (`kind/name`) does not exist yet.
    unless_exists: str | None = None
    # install.sh sets this shell variable when installing it changed the installed file
    # (a service to reload or restart only then).
    changed_var: str | None = None

    @property
    def destination(self) -> str | None:
        return "/" + self.path if self.install_to == "" else self.install_to

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "destination": self.destination,
            "mode": f"{self.mode:04o}",
            "owner": self.owner,
            "purpose": self.purpose,
            "optional": self.optional,
            "apply": self.apply,
        }


@dataclass(frozen=True)
class Rendered:
    files: list[SetupFile]
    notes: list[str]

    def by_path(self) -> dict[str, SetupFile]:
        return {f.path: f for f in self.files}


def _header(config: HostConfig, comment: str = "#") -> str:
    return (
        f"{comment} Generated by `deskgpu setup render` from {config_source(config)}.\n"
        f"{comment} Do not edit: change the host config and render again.\n"
    )


def config_source(config: HostConfig) -> str:
    """What the files were rendered from, and where install.sh puts it."""
    if not is_config_file(config):
        return f"built-in defaults (written out as {SYSTEM_CONFIG})"
    if config.source == str(SYSTEM_CONFIG):
        return config.source
    return f"{config.source} (installed as {SYSTEM_CONFIG})"


def is_config_file(config: HostConfig) -> bool:
    return config.source != HostConfig().source


def endpoint(config: HostConfig) -> str:
    return (config.api_server or DEFAULT_ENDPOINT).rstrip("/")


def server_port(config: HostConfig) -> int:
    parsed = urlparse(endpoint(config))
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def server_user(config: HostConfig) -> str:
    return config.doctor.api_server_user or SERVER_USER


def server_config_path(config: HostConfig) -> str:
    """The API server's own SkyPilot config (`admin_policy` lives there)."""
    return config.doctor.skypilot_server_config or f"{SERVER_HOME}/.sky/config.yaml"


def server_plugins_path(config: HostConfig) -> str:
    """The API server's plugin list (SkyPilot reads `~/.sky/plugins.yaml` of its account)."""
    return f"{server_home(config)}/.sky/plugins.yaml"


def server_home(config: HostConfig) -> str:
    path = server_config_path(config)
    return (
        path.removesuffix("/.sky/config.yaml")
        if path.endswith("/.sky/config.yaml")
        else (SERVER_HOME)
    )


def research_group(config: HostConfig) -> str | None:
    return config.doctor.research_group


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def _k8s_name(text: str) -> str:
    token = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return token[:63].rstrip("-") or "deskgpu"


def _environment(config: HostConfig, *first: str, client: bool = True) -> str:
    """One `Environment=` line (strict INI readers reject a repeated key)."""
    pairs = list(first)
    if client:
        pairs += [
            f"SKYPILOT_API_SERVER_ENDPOINT={endpoint(config)}",
            "SKYPILOT_DISABLE_LOCAL_API_SERVER=1",
        ]
    return "Environment=" + " ".join(shlex.quote(p) for p in pairs)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _cron_path(tools: Tools) -> str:
    dirs = [str(Path(tools.deskgpu).parent), "/usr/local/bin", "/usr/bin", "/bin"]
    return ":".join(dict.fromkeys(d for d in dirs if d not in ("", ".")))


# ---------------------------------------------------------------------------------------------
# The files


def skypilot_server_config(config: HostConfig) -> dict[str, Any]:
    """The shared API server's SkyPilot config: deskgpu's policy, jobs run in the server."""
    doc: dict[str, Any] = {
        "admin_policy": POLICY_CLASS,
        # Managed jobs' controller runs inside the API server process instead of as an extra
        # pod holding CPU and memory on the box (sky/jobs/utils.py).
        "jobs": {"controller": {"consolidation_mode": True}},
        # Every pod runs as the jobs' restricted service account (kube/deskgpu-job.yaml), not
        # SkyPilot's `skypilot-service-account` that may do anything in the namespace. The
        # policy also sets it on every task; SkyPilot reads it under `kubernetes` for SSH
        # node pools too (sky/clouds/kubernetes.py).
        "kubernetes": {"remote_identity": JOB_SERVICE_ACCOUNT},
    }
    head, _, rest = config.infra.partition("/")
    if head == "ssh":
        doc["ssh"] = {"allowed_node_pools": [rest]}
    elif rest:
        doc["kubernetes"]["allowed_contexts"] = [rest]
    return doc


def server_plugins(config: HostConfig) -> dict[str, Any]:
    """SkyPilot's server plugin list: deskgpu's guard, loaded in every server process."""
    del config  # one guard for every box; the policy it pins is deskgpu's
    return {"plugins": [{"class": GUARD_CLASS, "parameters": {"admin_policy": POLICY_CLASS}}]}


def kubeconfig_copy(config: HostConfig) -> list[str]:
    """Commands (as root) giving the server's account its own copy of k3s's kubeconfig."""
    user = shlex.quote(server_user(config))
    kube = shlex.quote(f"{server_home(config)}/.kube")
    return [
        f"{COPY} -d -o {user} -g {user} -m 0700 {kube}",
        f"{COPY} -o {user} -g {user} -m 0600 {K3S_KUBECONFIG} {kube}/config",
    ]


def kubeconfig_service(config: HostConfig) -> str:
    lines = [
        _header(config).rstrip("\n"),
        "# Started by skypilot-kubeconfig.path whenever k3s rewrites its kubeconfig (it does on",
        "# certificate rotation). SkyPilot builds its Kubernetes clients per request from the",
        "# file, so the running server needs no restart.",
        "[Unit]",
        "Description=Copy k3s's kubeconfig for the SkyPilot API server",
        "",
        "[Service]",
        "Type=oneshot",
        *(f"ExecStart={command}" for command in kubeconfig_copy(config)),
        "",
    ]
    return "\n".join(lines)


def kubeconfig_path_unit(config: HostConfig) -> str:
    lines = [
        _header(config).rstrip("\n"),
        "# PathChanged: triggers when a writer closes the file, or it is replaced or created.",
        "[Unit]",
        f"Description=Watch {K3S_KUBECONFIG} for the SkyPilot API server",
        "",
        "[Path]",
        f"PathChanged={K3S_KUBECONFIG}",
        f"Unit={KUBECONFIG_UNIT}.service",
        "",
        "[Install]",
        "WantedBy=paths.target",
        "",
    ]
    return "\n".join(lines)


def server_unit(config: HostConfig, tools: Tools) -> str:
    user = server_user(config)
    home = server_home(config)
    lines = [
        _header(config).rstrip("\n"),
        "# The ONE SkyPilot API server every user on this box talks to.",
        "# Not `sky api start --deploy --host 127.0.0.1`: in SkyPilot 0.14 --deploy rebinds to",
        "# 0.0.0.0 (sky/client/sdk.py api_start); the server module keeps the loopback bind.",
        "[Unit]",
        f"Description=SkyPilot API server shared by every user of {config.box_name}",
        "Wants=network-online.target",
        "After=network-online.target k3s.service",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"Group={user}",
        f"WorkingDirectory={home}",
        _environment(
            config,
            f"HOME={home}",
            f"KUBECONFIG={home}/.kube/config",
            "SKYPILOT_DISABLE_USAGE_COLLECTION=1",
            # The jobs controller reaches its own server at the *local* port (it clears the
            # endpoint variables: sky/jobs/recovery_strategy.py), 46580 unless told.
            f"SKYPILOT_API_SERVER_LOCAL_PORT={server_port(config)}",
            # What `sky api start` sets for the server it spawns (sky/server/common.py): the
            # server reads its config as a server (not `.sky.yaml` from its working dir
            # as a client would) and applies its server-side permission checks.
            "IS_SKYPILOT_SERVER=true",
            *(f"{k}={v}" for k, v in SERVER_WEBSOCKET_LIMITS.items()),
            client=False,
        ),
    ]
    lines += [
        "# k3s rewrites its kubeconfig when it rotates certificates: a fresh copy at every start",
        f"# (and on every change: {KUBECONFIG_PATH_UNIT}). `+`: as root.",
        *(f"ExecStartPre=+{command}" for command in kubeconfig_copy(config)),
        f"ExecStart={shlex.quote(tools.python)} -m sky.server.server --deploy "
        f"--host 127.0.0.1 --port {server_port(config)}",
        "Restart=on-failure",
        "RestartSec=5",
        "# SkyPilot's graceful-shutdown lock is a fixed /tmp path (sky/server/uvicorn.py): in a",
        "# shared /tmp any account can own it first and break the server's draining restarts.",
        "PrivateTmp=yes",
        "TimeoutStopSec=60",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def profile_snippet(config: HostConfig) -> str:
    lines = [
        _header(config).rstrip("\n"),
        "# Every login shell talks to the box's one shared SkyPilot API server and never",
        "# auto-starts a private one that would see only its own user's jobs.",
        f"export SKYPILOT_API_SERVER_ENDPOINT={shlex.quote(endpoint(config))}",
        "export SKYPILOT_DISABLE_LOCAL_API_SERVER=1",
    ]
    return "\n".join(lines) + "\n"


def config_document(config: HostConfig) -> dict[str, Any]:
    """`config` as a host-config document (hostconfig-v1): `load_config` reads it back equal."""
    doc: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, DoctorSettings):
            value = value.as_mapping()
        if f.name in ("source", "images_allow", "images_deny") or value in (None, (), {}):
            continue
        if f.name == "gpus" and config.nodes:
            continue  # derived from the nodes': written there only
        if isinstance(value, (SharedStorage, Telemetry)):
            value = value.as_mapping()
        if f.name == "nodes":
            value = [n.as_mapping() for n in config.nodes]
        doc[f.name] = list(value) if isinstance(value, tuple) else value
    images = {"allow": list(config.images_allow), "deny": list(config.images_deny)}
    if any(images.values()):
        doc["images"] = {k: v for k, v in images.items() if v}
    return doc


def host_config_file(config: HostConfig, config_text: str | None) -> str:
    """The box's /etc/deskgpu/config.yaml: the file that was read, else `config` written out."""
    if config_text is not None:
        return config_text
    if is_config_file(config):
        what = f"The settings read from {config.source}"
    else:
        what = "No host config was found, so these are deskgpu's built-in defaults"
    return (
        "# /etc/deskgpu/config.yaml, written out by `deskgpu setup render`.\n"
        f"# {what}.\n"
        "# Edit it (at least `gpus:`, e.g. `gpus: {A6000: 4}`: the one place the GPU count\n"
        f"# lives), then render again from it: deskgpu setup render --config {SYSTEM_CONFIG}\n"
        + _yaml(config_document(config))
    )


def kueue_objects(config: HostConfig) -> list[dict[str, Any]]:
    """ResourceFlavor, ClusterQueue (quota = the inventory's GPU count), LocalQueue."""
    queue = _k8s_name(config.box_name)
    local = config.kueue_local_queue or "deskgpu"
    # Kueue admits only what a ClusterQueue covers; CPU and memory get quotas no pod reaches
    # so only GPUs are queued on (Kubernetes itself stops a pod outgrowing the node).
    return [
        {
            "apiVersion": KUEUE_API,
            "kind": "ResourceFlavor",
            "metadata": {"name": KUEUE_FLAVOR},
            "spec": {},  # one kind of node: the box
        },
        {
            "apiVersion": KUEUE_API,
            "kind": "ClusterQueue",
            "metadata": {"name": queue},
            "spec": {
                "namespaceSelector": {},
                "queueingStrategy": "StrictFIFO",
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", GPU_RESOURCE],
                        "flavors": [
                            {
                                "name": KUEUE_FLAVOR,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "100000"},
                                    {"name": "memory", "nominalQuota": "1000Ti"},
                                    {"name": GPU_RESOURCE, "nominalQuota": config.gpu_count},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": KUEUE_API,
            "kind": "LocalQueue",
            "metadata": {"name": local, "namespace": KUEUE_NAMESPACE},
            "spec": {"clusterQueue": queue},
        },
    ]


def _manifest(config: HostConfig, path: str, about: list[str], objs: list[Any]) -> str:
    body = "---\n".join(_yaml(obj) for obj in objs)
    notes = "".join(f"# {line}\n" for line in about)
    return _header(config) + notes + f"# install.sh applies it: kubectl apply -f {path}\n" + body


def job_identity_manifest(config: HostConfig) -> str:
    about = [
        f"The service account every job's pod runs as (remote_identity: {JOB_SERVICE_ACCOUNT}):",
        "allowed only what SkyPilot's autodown does from inside a pod (deskgpu/setup/cluster.py).",
    ]
    return _manifest(config, JOB_IDENTITY_FILE, about, cluster.job_identity_objects())


def admission_manifest(config: HostConfig) -> str:
    about = [
        f"Namespace {JOBS_NAMESPACE}, whoever creates the pod: only the two host volumes (data",
        "read-only, checkpoints by the owner's subPath) and nothing privileged; the jobs'",
        "identity deletes only its own cluster's pods and services.",
        f"Needs Kubernetes {cluster.KUBERNETES_VERSION}+ ({cluster.ADMISSION_API}).",
    ]
    return _manifest(config, ADMISSION_FILE, about, cluster.admission_objects(config))


def runtime_class_manifest(config: HostConfig) -> str:
    about = [
        f"The RuntimeClass `{NVIDIA_RUNTIME_CLASS}`: SkyPilot sets it on every GPU pod when it",
        "exists, so the pod starts with the NVIDIA container runtime (k3s v1.29+ creates it",
        "itself when it finds nvidia-container-runtime; install.sh applies this copy only when",
        "it is absent).",
    ]
    return _manifest(config, RUNTIME_CLASS_FILE, about, [cluster.nvidia_runtime_class()])


def node_label_lines(config: HostConfig) -> list[str]:
    """install.sh lines labelling the box's node with its GPU type, for SkyPilot."""
    if config.nodes:
        return cluster_label_lines(config)
    if len(config.gpus) != 1:
        return []
    (model,) = config.gpus
    value = accelerator_label_value(model)
    return [
        f"# The GPU type SkyPilot matches `accelerators: {model}:N` against (one box: every node).",
        f"kube label nodes --all --overwrite {ACCELERATOR_LABEL}={shlex.quote(value)} >/dev/null",
    ]


def cluster_label_lines(config: HostConfig) -> list[str]:
    """A cluster's: each node that has joined gets its own labels from the host config (an
    agent registers with them; this keeps them in line after a change), and the server's
    node the version of the deskgpu that rendered its files (an agent's doctor compares)."""
    lines = ["# Each node's GPU labels from the host config, once it has joined (names: `nodes:`)."]
    for node in config.nodes:
        command = nodes.label_command(node)
        if command:
            q = shlex.quote(node.name)
            lines.append(
                f"if kube get node {q} >/dev/null 2>&1; then kube {command} >/dev/null; fi"
            )
    server = config.server_node
    if server is not None:
        lines.append(
            f"kube annotate node {shlex.quote(server.name)} --overwrite "
            f"{nodes.version_annotation()} >/dev/null"
        )
    return lines


def kueue_manifest(config: HostConfig) -> str:
    body = "---\n".join(_yaml(obj) for obj in kueue_objects(config))
    return (
        _header(config)
        + f"# apply: kubectl apply -f kueue/{_k8s_name(config.box_name)}.yaml\n"
        + (body)
    )


def tmpfiles(config: HostConfig) -> str:
    """systemd-tmpfiles lines creating the roots with the modes the house rules rely on.

    The checkpoint root is root-owned 0755: no researcher may create or replace an entry in
    it, so nobody can plant `<root>/<user>` as a symlink. Jobs mount the root itself with
    `subPath: <user>`; the kubelet creates a missing `<user>` directory (root-owned) and
    refuses a subPath that resolves outside the root.
    """
    lines = [
        _header(config).rstrip("\n"),
        "# /data: read-only in every job; researchers read it, the admin fills it.",
        "# /checkpoints: root-owned and not group-writable, so no one can plant a symlink in it;",
        "# each job writes <root>/<user> (mounted with subPath: <user>). The kubelet creates a",
        "# user's directory on first use, root-owned; `install -d -o <user>` it beforehand to",
        "# let the researcher manage the files from the host.",
        "# state dir: readable, so `deskgpu queue` shows everyone the reap notices in its history;",
        "# the audit log inside is created 0640.",
        "# Type Path Mode User Group Age",
        f"d {config.data_root} 0755 root root -",
        f"d {config.checkpoint_root} 0755 root root -",
        f"d {config.state_dir} 0755 root root -",
    ]
    return "\n".join(lines) + "\n"


def _oneshot(
    config: HostConfig,
    tools: Tools,
    schedule: Schedule,
    what: str,
    extra: list[str],
    after: str = f"k3s.service {SERVER_UNIT}",
) -> str:
    args = " ".join(schedule.args)
    lines = [
        _header(config).rstrip("\n"),
        "[Unit]",
        f"Description=deskgpu: {what}",
        f"Documentation={DOCS}/blob/main/{SCHEDULES_DOC}",
        f"After=network-online.target {after}",
        "",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={shlex.quote(tools.deskgpu)} {args}",
        "# root: reads every pod's processes in /proc and their cgroups; writes the state dir",
        "User=root",
        _environment(config),
    ]
    if config.state_dir.rstrip("/") == "/var/lib/deskgpu":
        lines.append("StateDirectory=deskgpu")
    lines += [*extra, ""]
    return "\n".join(lines)


def observe_schedule(config: HostConfig) -> Schedule:
    """The observe timer's command; with `metrics_textfile_dir` (or `telemetry:`, Debian's
    node_exporter textfile directory), it also writes the metrics node_exporter serves."""
    directory = telemetry_files.textfile_dir(config)
    if not directory:
        return OBSERVE
    return dataclasses.replace(OBSERVE, args=(*OBSERVE.args, "--textfile", shlex.quote(directory)))


def _timer(config: HostConfig, schedule: Schedule) -> str:
    lines = [
        _header(config).rstrip("\n"),
        "[Unit]",
        f"Description=deskgpu {schedule.key} {schedule.when}",
        "",
        "[Timer]",
        *schedule.timer,
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ]
    return "\n".join(lines)


def crontab(config: HostConfig, tools: Tools) -> str:
    """The cron alternative to the timers (install one of the two, not both)."""
    deskgpu = "deskgpu" if Path(tools.deskgpu).name == "deskgpu" else shlex.quote(tools.deskgpu)
    lines = [
        _header(config).rstrip("\n"),
        "# /etc/cron.d/deskgpu: deskgpu's observation and the weekly zombie reap (root).",
        "# Prefer the systemd timers where systemd runs; use one or the other, not both.",
        "SHELL=/bin/sh",
        f"PATH={_cron_path(tools)}",
        "MAILTO=root",
        f"SKYPILOT_API_SERVER_ENDPOINT={endpoint(config)}",
        "SKYPILOT_DISABLE_LOCAL_API_SERVER=1",
    ]
    lines += [
        "",
        f"# {_sentence(OBSERVE.when)}: one cheap observation into the reap history in",
        f"# {config.state_dir}; it also gives owners their first notice as soon as a session",
        "# qualifies as a zombie (the grace clock).",
        observe_schedule(config).cron_line(deskgpu),
        "",
        f"# {_sentence(REAP.when)}: tear down zombies whose notice is older than the grace",
        "# period. Output (and so cron mail) only when something was reaped, warned or failed;",
        "# exit 1 on a failed teardown.",
        REAP.cron_line(deskgpu),
    ]
    return "\n".join(lines) + "\n"


def install_script(config: HostConfig, tools: Tools, files: list[SetupFile]) -> str:
    """Checks every precondition before it changes anything; safe to run again."""
    user = server_user(config)
    home = server_home(config)
    q = shlex.quote
    installed = [f for f in files if not f.optional and f.destination is not None]
    applied = [f for f in files if f.apply]

    def apply(f: SetupFile) -> str:
        line = f'kube apply -f "$here/{f.path}"'
        if f.unless_exists:
            return f"kube get {f.unless_exists} >/dev/null 2>&1 || {line}"
        return line

    kube = f"--kubeconfig {K3S_KUBECONFIG}"
    units = [KUBECONFIG_PATH_UNIT, SERVER_UNIT, OBSERVE.timer_unit, REAP.timer_unit]
    lines = [
        "#!/bin/sh",
        _header(config).rstrip("\n"),
        "# Installs the files rendered next to it and starts the services. Read it, then run",
        "# it as root. It changes nothing unless everything it needs is there, and running it",
        "# again is safe. Kueue and the cron alternative are optional and not installed here.",
        "set -eu",
        'here=$(cd "$(dirname "$0")" && pwd)',
        "missing=''",
        'need() { missing="$missing\n  - $1"; }',
        "# kubectl, else k3s's bundled one, as the cluster's admin (k3s's kubeconfig)",
        "kube() {",
        "    if command -v kubectl >/dev/null 2>&1; then",
        f'        kubectl {kube} "$@"',
        "    else",
        f'        k3s kubectl {kube} "$@"',
        "    fi",
        "}",
        "",
        "# Preconditions: all of them, before any change.",
        "[ \"$(id -u)\" = 0 ] || need 'run it as root: sudo sh install.sh'",
        "[ -d /run/systemd/system ] || need 'systemd is not running as PID 1 "
        "(no /run/systemd/system): the units need it'",
        f"[ -f {K3S_KUBECONFIG} ] || need 'no {K3S_KUBECONFIG}: install k3s first "
        f"(deskgpu {K3S_DOC})'",
    ]
    for flag, path, what in (
        ("--python", tools.python, "the Python that runs the API server"),
        ("--deskgpu", tools.deskgpu, "the deskgpu command the timers run"),
    ):
        lines.append(
            f"{{ [ -f {q(path)} ] && [ -x {q(path)} ]; }} || need "
            + q(
                f"{path} ({what}) is not an executable file: install deskgpu "
                f"({INSTALL_DOC}) or render again with {flag} <path>"
            )
        )
    for command in ("useradd", "install", "systemctl", "systemd-tmpfiles", "runuser"):
        lines.append(f"command -v {command} >/dev/null 2>&1 || need 'no {command} command'")
    lines += [
        "# The server's account must be able to run its Python (render judged the mode bits;",
        "# this runs it: ACLs, noexec mounts and LSMs count too). Before the account exists,",
        "# as nobody: an account with no more rights than any other user.",
        f"acct={q(user)}; id -u {q(user)} >/dev/null 2>&1 || acct=nobody",
        f"py={q(tools.python)}",
        'if [ "$(id -u)" = 0 ] && command -v runuser >/dev/null 2>&1 && [ -x "$py" ] '
        '&& ! runuser -u "$acct" -- "$py" -c \'\' >/dev/null 2>&1; then',
        '    need "the account $acct cannot run $py: install deskgpu from a Python every '
        f'account may run ({INSTALL_DOC}) and render again with --python <path>"',
        "fi",
    ]
    lines += cluster_preconditions(config)
    lines += telemetry_preconditions(config, files)
    vap = "validatingadmissionpolicies"
    lines += [
        f"[ -x {COPY} ] || need 'no {COPY}: the units copy the kubeconfig with it'",
        "if ! command -v kubectl >/dev/null 2>&1 && ! command -v k3s >/dev/null 2>&1; then",
        f"    need 'no kubectl or k3s command: install k3s first ({K3S_DOC})'",
        f"elif [ -f {K3S_KUBECONFIG} ] && ! kube get --raw /apis/{cluster.ADMISSION_API} "
        f"2>/dev/null | grep -q '\"{vap}\"'; then",
        "    need 'the k3s API does not answer, or serves no ValidatingAdmissionPolicy "
        f"({cluster.ADMISSION_API}: Kubernetes {cluster.KUBERNETES_VERSION} or later): "
        "sudo systemctl status k3s'",
        *server_node_check(config),
        "fi",
        f"for f in {' '.join(q(f.path) for f in [*installed, *applied])}; do",
        '    [ -f "$here/$f" ] || need "$here/$f is missing: run the install.sh that '
        'deskgpu setup render wrote next to it"',
        "done",
        'if [ -n "$missing" ]; then',
        "    printf 'install.sh: not installing, nothing was changed:%s\\n' \"$missing\" >&2",
        "    exit 1",
        "fi",
        "",
        f"id -u {q(user)} >/dev/null 2>&1 || useradd --system --user-group --home-dir {q(home)} "
        f"--create-home --shell /usr/sbin/nologin {q(user)}",
        f"install -d -o {q(user)} -g {q(user)} -m 0700 {q(home)}/.sky {q(home)}/.kube",
        # The server's own, parents first: `install -D` below would leave them root's.
        f"install -d -o {q(user)} -g {q(user)} -m 0755 "
        + " ".join(q(d) for d in catalog.directories(home)),
    ]
    lines += installing(installed)
    lines += [
        "# The jobs' identity, the admission policy and the NVIDIA runtime class, before the",
        "# server can start a job.",
        *(apply(f) for f in applied),
        *node_label_lines(config),
        "systemd-tmpfiles --create /etc/tmpfiles.d/deskgpu.conf",
        "systemctl daemon-reload",
        *cluster_storage_lines(config),
        *telemetry_service_lines(config),
        f"if systemctl is-active --quiet {SERVER_UNIT}; then",
        "    # A running server keeps the unit, config and plugins it started with.",
        f"    echo 'install.sh: {SERVER_UNIT} was already running; to load the new files: "
        f"systemctl restart {SERVER_UNIT}'",
        "fi",
        f"systemctl enable --now {' '.join(units)}",
        "echo 'installed; now run: deskgpu doctor'",
        "",
    ]
    return "\n".join(lines)


def installing(files: list[SetupFile]) -> list[str]:
    """install.sh's lines installing `files` where they go (with their owner and mode); a
    file with a `changed_var` sets it when its installed content was another."""
    q = shlex.quote
    lines = [f"{v}=''" for v in dict.fromkeys(f.changed_var for f in files if f.changed_var)]
    for f in files:
        dest = q(f.destination or "")
        if f.changed_var:
            lines.append(f'cmp -s "$here/{f.path}" {dest} || {f.changed_var}=1')
        owner = f"-o {q(f.owner)} -g {q(f.owner)} " if f.owner != "root" else ""
        lines.append(f'install -D {owner}-m {f.mode:04o} "$here/{f.path}" {dest}')
    return lines


def telemetry_preconditions(config: HostConfig, files: list[SetupFile] | None = None) -> list[str]:
    """install.sh checks with `telemetry:`: node_exporter and its textfile directory on every
    node; on the server (`files` holds its Prometheus config) Prometheus, and that promtool
    accepts the rendered config."""
    if config.telemetry is None:
        return []
    q = shlex.quote
    directory = telemetry_files.textfile_dir(config) or ""
    exporter = telemetry_files.NODE_EXPORTER_PACKAGE
    doc = telemetry_files.DOC
    lines = [
        f"command -v {exporter} >/dev/null 2>&1 || need 'no {exporter}: Prometheus reads this "
        f"node through it (telemetry:): sudo apt-get install {exporter} ({doc})'",
        f"[ -d {q(directory)} ] || need "
        + q(
            f"no directory {directory}, where the observe timer writes deskgpu.prom for "
            f"node_exporter's textfile collector: sudo apt-get install {exporter} (it makes "
            f"{DEFAULT_TEXTFILE_DIR}), or point its "
            f"--collector.textfile.directory at metrics_textfile_dir ({doc})"
        ),
    ]
    config_file = next(
        (f for f in files or [] if f.destination == telemetry_files.PROMETHEUS_CONFIG), None
    )
    if config_file is None:
        return lines
    package = telemetry_files.PROMETHEUS_PACKAGE
    return [
        *lines,
        "{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || "
        f"need 'no prometheus or promtool: sudo apt-get install {package} ({doc})'",
        "command -v cmp >/dev/null 2>&1 || need 'no cmp command (diffutils)'",
        "if command -v promtool >/dev/null 2>&1 && ! promtool check config "
        f'"$here/{config_file.path}" >/dev/null 2>&1; then',
        f'    need "promtool check config refuses $here/{config_file.path}: see what it says, '
        'and render again"',
        "fi",
    ]


def telemetry_service_lines(config: HostConfig) -> list[str]:
    """install.sh's last word on Prometheus: restarted for new flags, reloaded for a new
    config, else left as it runs; and node_exporter running on this node too."""
    if config.telemetry is None:
        return []
    unit = telemetry_files.PROMETHEUS_UNIT
    return [
        "# Prometheus re-reads its config on a reload; its flags only at a start.",
        f'if [ -n "${PROMETHEUS_ARGS_CHANGED}" ]; then',
        f"    systemctl restart {unit}",
        f'elif [ -n "${PROMETHEUS_CONFIG_CHANGED}" ]; then',
        f"    systemctl reload-or-restart {unit}",
        "fi",
        f"systemctl enable --now {unit} {telemetry_files.NODE_EXPORTER_UNIT}",
        f"echo 'install.sh: dcgm-exporter on the GPU nodes: helm with "
        f"{telemetry_files.DCGM_VALUES} (its first lines say how; {telemetry_files.DOC})'",
    ]


def cluster_preconditions(config: HostConfig) -> list[str]:
    """install.sh checks for the server of a cluster: the NFS server, or the NFS client."""
    if nodes.exports_nfs(config):
        return [
            "command -v exportfs >/dev/null 2>&1 || need 'no exportfs: the agents mount the "
            "roots of this box over NFS: sudo apt-get install nfs-kernel-server'"
        ]
    if config.nodes and config.storage is not None:
        return [MOUNT_NFS_CHECK]
    return []


MOUNT_NFS_CHECK = (
    "command -v mount.nfs >/dev/null 2>&1 || need 'no mount.nfs: the shared storage is NFS: "
    "sudo apt-get install nfs-common'"
)


def server_node_check(config: HostConfig) -> list[str]:
    """On a cluster: k3s knows this box by the name the host config gives its server."""
    server = config.server_node
    if server is None:
        return []
    name = shlex.quote(server.name)
    return [
        f"elif [ -f {K3S_KUBECONFIG} ] && ! kube get node {name} >/dev/null 2>&1; then",
        f"    need 'k3s has no node {server.name}, the server node of the host config: fix its "
        "name in nodes: to what kubectl get nodes shows, and render again'",
    ]


def cluster_storage_lines(config: HostConfig) -> list[str]:
    """install.sh lines of a cluster's server: export the roots, or mount the NAS's."""
    server = config.server_node
    if server is None:
        return []
    if nodes.exports_nfs(config):
        return [
            "# The agents mount data (read-only) and checkpoints (read-write) from here.",
            f"systemctl enable --now {nodes.NFS_SERVER_UNIT}",
            "exportfs -ra",
        ]
    mounts = nodes.shared_mounts(config, server)
    if not mounts:
        return []
    return [
        "# The NAS's exports at the roots; k3s needs them from its next start (its drop-in).",
        f"systemctl enable --now {' '.join(m.unit for m in mounts)}",
    ]


def cluster_server_files(config: HostConfig) -> list[SetupFile]:
    """What the server of a cluster adds to a box's files: its exports, or the NAS's mounts."""
    server = config.server_node
    if server is None:
        return []
    if nodes.exports_nfs(config):
        return [
            SetupFile(
                nodes.EXPORTS_FILE.lstrip("/"),
                nodes.exports(config, _header(config)),
                0o644,
                f"NFS exports: {config.data_root} read-only and {config.checkpoint_root} "
                "read-write, to the agents",
            )
        ]
    return shared_mount_files(config, server, nodes.K3S_SERVER_UNIT)


def shared_mount_files(config: HostConfig, node: Node, k3s_unit: str) -> list[SetupFile]:
    """`node`'s NFS mount units and its k3s unit's drop-in requiring them."""
    mounts = nodes.shared_mounts(config, node)
    if not mounts:
        return []
    files = [
        SetupFile(
            f"etc/systemd/system/{m.unit}",
            nodes.mount_unit(config, m, _header(config)),
            0o644,
            f"mounts the shared {m.purpose} {m.what} at {m.where}",
        )
        for m in mounts
    ]
    files.append(
        SetupFile(
            f"etc/systemd/system/{k3s_unit}.d/deskgpu-shared-storage.conf",
            nodes.mounts_dropin(mounts, _header(config)),
            0o644,
            f"{k3s_unit} starts only with the shared storage mounted",
        )
    )
    return files


PROMETHEUS_CONFIG_CHANGED = "prometheus_config"  # install.sh's variables (telemetry_lines)
PROMETHEUS_ARGS_CHANGED = "prometheus_args"


def refused(config: HostConfig, config_text: str | None, problems: list[Any]) -> SpecError:
    """`telemetry_files.Problem`s as one located error (file:line:col) where the text is
    the host config's, else named by key (a config built in code)."""
    from deskgpu.yamlio import dotted_path, load_located

    if config_text is not None and is_config_file(config):
        doc = load_located(config_text, config.source, empty_ok=True)
        return SpecError([doc.problem(p.path, p.what, p.fix) for p in problems])
    return SpecError(
        [f"{config.source}: {dotted_path(p.path)}: {p.what} ({p.fix})" for p in problems]
    )


def telemetry_server_files(config: HostConfig, config_text: str | None) -> list[SetupFile]:
    """With `telemetry:`, the server node's Prometheus config and flags and dcgm-exporter's
    values (setup/telemetry.py); a telemetry.prometheus it cannot serve is exit 2."""
    if config.telemetry is None:
        return []
    listen, problems = telemetry_files.listen_address(config)
    if problems or listen is None:
        raise refused(config, config_text, problems)
    header = _header(config)
    targets = telemetry_files.scrape_targets(config)
    nodes_scraped = len({t.node for t in targets})
    return [
        SetupFile(
            telemetry_files.PROMETHEUS_CONFIG.lstrip("/"),
            telemetry_files.prometheus_yml(config, header),
            0o644,
            f"Prometheus scrapes dcgm-exporter and node_exporter on {nodes_scraped} "
            f"node{'s' if nodes_scraped != 1 else ''}, each target labelled with its node",
            changed_var=PROMETHEUS_CONFIG_CHANGED,
        ),
        SetupFile(
            telemetry_files.PROMETHEUS_DEFAULTS.lstrip("/"),
            telemetry_files.prometheus_defaults(config, header, listen),
            0o644,
            f"Prometheus' flags: {telemetry_files.retention_days(config)} days of samples "
            f"(reap's window), listening on {listen}",
            changed_var=PROMETHEUS_ARGS_CHANGED,
        ),
        SetupFile(
            telemetry_files.DCGM_VALUES.lstrip("/"),
            telemetry_files.dcgm_values_yaml(config, header),
            0o644,
            "dcgm-exporter's Helm values: pod labels on, SkyPilot's only (helm upgrade -f)",
        ),
        SetupFile(
            telemetry_files.GPU_OPERATOR_VALUES.lstrip("/"),
            telemetry_files.gpu_operator_values_yaml(config, header),
            0o644,
            "the same for the GPU Operator's dcgm-exporter, if it runs one (helm upgrade -f)",
        ),
    ]


def render(
    config: HostConfig,
    tools: Tools,
    config_text: str | None = None,
    seen_gpus: dict[str, int] | None = None,
) -> Rendered:
    """All setup files for `config`, in install order: the box's, or on a cluster (`nodes:`)
    the server's (an agent's come from `setup.agent`).

    `config_text` is the host-config file `config` was loaded from, installed unchanged; None
    writes `config` out instead (built-in defaults, or a config built in code). `seen_gpus`:
    what NVML sees on this host (`catalog.seen_gpus`), the catalog's models when `config`
    lists no `gpus:`.
    """
    seen = seen_gpus or {}
    notes: list[str] = []
    host = urlparse(endpoint(config)).hostname or ""
    if host not in _LOCAL_HOSTS:
        notes.append(
            f"api_server {endpoint(config)} is not on loopback, but the server unit binds "
            "127.0.0.1: set api_server to http://127.0.0.1:<port>, or put an authenticating "
            "proxy in front (an unauthenticated API server trusts any claimed user)"
        )
    if not config.gpus:
        notes.append(
            "the host config lists no GPUs (gpus: {MODEL: COUNT}); Kueue's GPU quota is 0 "
            "until it does"
        )
    if len(config.gpus) > 1 and not config.nodes:
        notes.append(
            f"the host config lists {len(config.gpus)} GPU models: install.sh labels no node "
            f"with {ACCELERATOR_LABEL}; label each node with its own (docs/setup.md)"
        )
    if not config.kueue_local_queue:
        notes.append(
            "kueue/ is optional: to use it, set kueue_local_queue in the host config "
            "(the policy then sends every job to that LocalQueue)"
        )
    notes += catalog.notes(config, seen)
    telemetry = telemetry_server_files(config, config_text)  # refused before anything else
    if config.telemetry is not None:
        notes += telemetry_files.notes(config)
    server_cfg = server_config_path(config).lstrip("/")
    files = [
        SetupFile(
            str(SYSTEM_CONFIG).lstrip("/"),
            host_config_file(config, config_text),
            0o644,
            "the host config these files were rendered from (the policy reads it per request)",
        ),
        SetupFile(
            "etc/profile.d/skypilot.sh",
            profile_snippet(config),
            0o644,
            "every user's client talks to the shared API server; private servers disabled",
        ),
        SetupFile(
            server_cfg,
            _header(config) + _yaml(skypilot_server_config(config)),
            0o600,
            f"the API server's SkyPilot config: admin_policy {POLICY_CLASS}",
            owner=server_user(config),
        ),
        SetupFile(
            server_plugins_path(config).lstrip("/"),
            _header(config) + _yaml(server_plugins(config)),
            0o644,
            f"the API server's plugins: {GUARD_CLASS}, so no request can switch the house "
            "rules off",
        ),
        *(
            SetupFile(c.path.lstrip("/"), c.text, 0o644, c.purpose, owner=server_user(config))
            for c in catalog.box_catalog(server_home(config), config, seen)
        ),
        SetupFile(
            f"etc/systemd/system/{SERVER_UNIT}",
            server_unit(config, tools),
            0o644,
            f"the one shared SkyPilot API server on 127.0.0.1:{server_port(config)}",
        ),
        SetupFile(
            f"etc/systemd/system/{KUBECONFIG_UNIT}.service",
            kubeconfig_service(config),
            0o644,
            f"copies {K3S_KUBECONFIG} to the server's account",
        ),
        SetupFile(
            f"etc/systemd/system/{KUBECONFIG_PATH_UNIT}",
            kubeconfig_path_unit(config),
            0o644,
            f"runs {KUBECONFIG_UNIT}.service whenever k3s rewrites its kubeconfig",
        ),
        SetupFile(
            "etc/tmpfiles.d/deskgpu.conf",
            tmpfiles(config),
            0o644,
            f"{config.data_root}, {config.checkpoint_root} and {config.state_dir} with their modes",
        ),
        SetupFile(
            f"etc/systemd/system/{OBSERVE.service}",
            _oneshot(
                config,
                tools,
                observe_schedule(config),
                "one observation of GPU use per session (reap history)",
                ["Nice=10", "IOSchedulingClass=idle", "TimeoutStartSec=2min"],
            ),
            0o644,
            "one observation of the box for the zombie rule",
        ),
        SetupFile(
            f"etc/systemd/system/{OBSERVE.timer_unit}",
            _timer(config, OBSERVE),
            0o644,
            f"runs deskgpu observe {OBSERVE.when}",
        ),
        SetupFile(
            f"etc/systemd/system/{REAP.service}",
            _oneshot(
                config,
                tools,
                REAP,
                "tear down zombie sessions (weekly)",
                [
                    "# Teardowns wait for SkyPilot; concurrent runs serialize on the reap lock.",
                    "TimeoutStartSec=1h",
                ],
            ),
            0o644,
            "tears down zombie sessions (alive, holding VRAM, idle for hours)",
        ),
        SetupFile(
            f"etc/systemd/system/{REAP.timer_unit}",
            _timer(config, REAP),
            0o644,
            f"runs deskgpu {' '.join(REAP.args[:2])} {REAP.when}",
        ),
        SetupFile(
            JOB_IDENTITY_FILE,
            job_identity_manifest(config),
            0o644,
            f"the {JOB_SERVICE_ACCOUNT} service account jobs run as: no pod creation "
            "(kubectl apply -f, by install.sh)",
            install_to=None,
            apply=True,
        ),
        SetupFile(
            ADMISSION_FILE,
            admission_manifest(config),
            0o644,
            f"ValidatingAdmissionPolicies in namespace {JOBS_NAMESPACE}: only the two host "
            "volumes, nothing privileged (kubectl apply -f, by install.sh)",
            install_to=None,
            apply=True,
        ),
        SetupFile(
            RUNTIME_CLASS_FILE,
            runtime_class_manifest(config),
            0o644,
            f"the RuntimeClass {NVIDIA_RUNTIME_CLASS}: GPU pods start with the NVIDIA container "
            "runtime (kubectl apply -f, by install.sh, when k3s has not made one)",
            install_to=None,
            apply=True,
            unless_exists=f"runtimeclass/{NVIDIA_RUNTIME_CLASS}",
        ),
        SetupFile(
            f"kueue/{_k8s_name(config.box_name)}.yaml",
            kueue_manifest(config),
            0o644,
            f"optional Kueue: strict FIFO, {config.gpu_count} GPUs of quota (kubectl apply -f)",
            optional=True,
            install_to=None,
        ),
        SetupFile(
            "cron/deskgpu",
            crontab(config, tools),
            0o644,
            "optional: /etc/cron.d/deskgpu instead of the two timers",
            optional=True,
            install_to=CRON_FILE,
        ),
    ]
    files += cluster_server_files(config)
    files += telemetry
    files.append(
        SetupFile(
            "install.sh",
            install_script(config, tools, files),
            0o755,
            "installs the files above and starts the services (run as root)",
            install_to=None,
        )
    )
    return Rendered(files=files, notes=notes)


def write(
    rendered: Rendered, out: Path, command: str = "setup render", what: str = "the setup files"
) -> list[Path]:
    """Write every file under `out` with its mode; returns the paths written.

    `out` must be a directory (or not exist yet); a path that cannot be written is a usage
    error naming it (exit 2), never a traceback. `command` and `what` name the writer in
    those errors (`setup trial` writes its files here too).
    """
    try:
        not_a_dir = out.exists() and not out.is_dir()
    except OSError as exc:  # a directory on the way this user cannot search
        raise UsageError(f"{out}: cannot look at it ({exc.strerror or exc})") from None
    if not_a_dir:
        raise UsageError(f"{out}: not a directory (--out names the directory to write into)")
    written = []
    for f in rendered.files:
        target = out / f.path
        try:
            if target.is_symlink() or (target.exists() and not target.is_file()):
                raise UsageError(f"{target}: not a regular file; {command} replaces only files")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.text, encoding="utf-8")
            target.chmod(f.mode)
        except OSError as exc:
            raise UsageError(
                f"{out}: cannot write {what} ({target}: {exc.strerror or exc})"
            ) from None
        written.append(target)
    return written
