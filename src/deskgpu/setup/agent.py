"""An agent's files (`deskgpu setup render --node NAME` for a node with `role: agent`), and
which node gets which files.

An agent runs no API server and no house rules of its own (the server's policy shapes every
job): it joins the server's k3s with its labels, mounts the shared storage, and observes its
own GPUs. Its install.sh checks everything first (root, systemd, k3s's agent installed, the
join token in a root-only file, the NFS client, the NVIDIA runtime, the server answering) and
changes nothing unless all is there; running it again changes nothing.
"""

from __future__ import annotations

import shlex

from deskgpu.config import SYSTEM_CONFIG, HostConfig
from deskgpu.config.nodes import AGENT, Node
from deskgpu.errors import UsageError
from deskgpu.setup import nodes
from deskgpu.setup import telemetry as telemetry_files
from deskgpu.setup.render import (
    INSTALL_DOC,
    MOUNT_NFS_CHECK,
    Rendered,
    SetupFile,
    Tools,
    _header,
    _oneshot,
    _timer,
    host_config_file,
    installing,
    observe_schedule,
    render,
    shared_mount_files,
    telemetry_preconditions,
)
from deskgpu.setup.schedules import OBSERVE

TMPFILES = "etc/tmpfiles.d/deskgpu.conf"


def pick_node(config: HostConfig, name: str | None) -> Node | None:
    """The node `--node NAME` names (the server's when none is named); None for one box."""
    if not config.nodes:
        if name is not None:
            raise UsageError(
                f"--node {name}: the host config ({config.source}) describes one box (no "
                "`nodes:`); render without --node"
            )
        return None
    if name is None:
        return config.server_node
    node = config.node(name)
    if node is None:
        known = ", ".join(f"{n.name} ({n.role})" for n in config.nodes)
        raise UsageError(
            f"--node {name}: no such node in the host config ({config.source}); its nodes: {known}"
        )
    return node


def render_node(
    config: HostConfig,
    tools: Tools,
    config_text: str | None = None,
    seen_gpus: dict[str, int] | None = None,
    node: str | None = None,
) -> Rendered:
    """The files of one node: the box's or the server's (`render.render`), or an agent's."""
    target = pick_node(config, node)
    if target is not None and target.role == AGENT:
        return render_agent(config, tools, target, config_text)
    return render(config, tools, config_text, seen_gpus)


def tmpfiles(config: HostConfig) -> str:
    """An agent's own state dir (its observations); its roots are the shared mounts'."""
    lines = [
        _header(config).rstrip("\n"),
        "# The state dir: this node's own observations (its GPUs). data_root and",
        "# checkpoint_root are the shared NFS mounts (their .mount units), not created here.",
        "# Type Path Mode User Group Age",
        f"d {config.state_dir} 0755 root root -",
    ]
    return "\n".join(lines) + "\n"


def render_agent(
    config: HostConfig, tools: Tools, node: Node, config_text: str | None = None
) -> Rendered:
    notes = [
        f"before install.sh on {node.name}: copy the server's {nodes.SERVER_TOKEN} to "
        f"{nodes.K3S_TOKEN_FILE} there (root's, mode 0600; {nodes.DOC})",
    ]
    if len(node.gpus) > 1:
        notes.append(
            f"node {node.name} has {len(node.gpus)} GPU models: it gets no "
            "skypilot.co/accelerator label; label it by hand (docs/setup.md)"
        )
    header = _header(config)
    files = [
        SetupFile(
            str(SYSTEM_CONFIG).lstrip("/"),
            host_config_file(config, config_text),
            0o644,
            "the host config (the same on every node: doctor and observe read it)",
        ),
        SetupFile(
            nodes.K3S_CONFIG.lstrip("/"),
            nodes.k3s_agent_config(config, node, header),
            0o644,
            f"k3s agent: joins {nodes.server_url(config)} as {node.name} with its GPU labels "
            f"(the token is read from {nodes.K3S_TOKEN_FILE})",
        ),
        *shared_mount_files(config, node, nodes.K3S_AGENT_UNIT),
        SetupFile(TMPFILES, tmpfiles(config), 0o644, f"{config.state_dir} with its mode"),
        SetupFile(
            f"etc/systemd/system/{OBSERVE.service}",
            _oneshot(
                config,
                tools,
                observe_schedule(config),
                f"one observation of the GPUs of {node.name} (its own history)",
                ["Nice=10", "IOSchedulingClass=idle", "TimeoutStartSec=2min"],
                after=nodes.K3S_AGENT_UNIT,
            ),
            0o644,
            f"one observation of {node.name}'s GPUs",
        ),
        SetupFile(
            f"etc/systemd/system/{OBSERVE.timer_unit}",
            _timer(config, OBSERVE),
            0o644,
            f"runs deskgpu observe {OBSERVE.when}",
        ),
    ]
    files.append(
        SetupFile(
            "install.sh",
            agent_install_script(config, tools, node, files),
            0o755,
            f"joins {node.name} to the cluster: installs the files above, mounts the shared "
            "storage, starts the k3s agent (run as root)",
            install_to=None,
        )
    )
    return Rendered(files=files, notes=notes)


def telemetry_agent_lines(config: HostConfig) -> list[str]:
    """With `telemetry:`: node_exporter serves this node's textfile to the server's Prometheus."""
    if config.telemetry is None:
        return []
    return [f"systemctl enable --now {telemetry_files.NODE_EXPORTER_UNIT}"]


def agent_install_script(
    config: HostConfig, tools: Tools, node: Node, files: list[SetupFile]
) -> str:
    """Checks every precondition before it changes anything; safe to run again."""
    q = shlex.quote
    token = nodes.K3S_TOKEN_FILE
    url = nodes.server_url(config)
    mounts = nodes.shared_mounts(config, node)
    installed = [f for f in files if f.destination is not None]
    agent_unit = f"/etc/systemd/system/{nodes.K3S_AGENT_UNIT}"
    k3s_install = f"install k3s as an agent, not started, as {nodes.DOC} says"
    lines = [
        "#!/bin/sh",
        _header(config).rstrip("\n"),
        f"# Joins {node.name} to the cluster as a k3s agent of {url}:",
        "# installs the files rendered next to it, mounts the shared storage and starts the",
        "# agent. Read it, then run it as root. It changes nothing unless everything it needs",
        "# is there, and running it again is safe. k3s reads the join token from",
        f"# {token} itself: nothing here reads or prints it.",
        "set -eu",
        'here=$(cd "$(dirname "$0")" && pwd)',
        "missing=''",
        'need() { missing="$missing\n  - $1"; }',
        "",
        "# Preconditions: all of them, before any change.",
        "[ \"$(id -u)\" = 0 ] || need 'run it as root: sudo sh install.sh'",
        "[ -d /run/systemd/system ] || need 'systemd is not running as PID 1 "
        "(no /run/systemd/system): the units need it'",
        "command -v k3s >/dev/null 2>&1 || need " + q(f"no k3s command: {k3s_install}"),
        f"[ -f {agent_unit} ] || need "
        + q(f"no {agent_unit}: k3s is not installed as an agent here: {k3s_install}"),
        f"if [ ! -s {token} ]; then",
        "    need "
        + q(
            f"no join token in {token}: copy the server's {nodes.SERVER_TOKEN} there, root's, "
            f"mode 0600 ({nodes.DOC})"
        ),
        f"elif [ \"$(stat -c '%u %a' {token})\" != '0 600' ]; then",
        "    need "
        + q(
            f"{token} must be root's and mode 0600: sudo chown root:root {token} && "
            f"sudo chmod 0600 {token}"
        ),
        "fi",
    ]
    if mounts:
        lines.append(MOUNT_NFS_CHECK)
    lines += telemetry_preconditions(config)
    if node.gpus:
        lines.append(
            "command -v nvidia-container-runtime >/dev/null 2>&1 || need 'no "
            "nvidia-container-runtime: install the NVIDIA Container Toolkit before k3s starts "
            "(docs/setup.md, step 2)'"
        )
    lines += [
        f"{{ [ -f {q(tools.deskgpu)} ] && [ -x {q(tools.deskgpu)} ]; }} || need "
        + q(
            f"{tools.deskgpu} (the deskgpu command the observe timer runs) is not an executable "
            f"file: install deskgpu ({INSTALL_DOC}) or render again with --deskgpu <path>"
        ),
    ]
    for command in ("install", "systemctl", "systemd-tmpfiles", "curl"):
        lines.append(f"command -v {command} >/dev/null 2>&1 || need 'no {command} command'")
    lines += [
        f"if command -v curl >/dev/null 2>&1 && ! curl -ksf --max-time 10 {url}/ping "
        ">/dev/null 2>&1; then",
        "    need "
        + q(
            f"the k3s server at {url} does not answer: is k3s running on the server node, and "
            f"port {nodes.K3S_PORT} open to this box?"
        ),
        "fi",
        f"for f in {' '.join(q(f.path) for f in installed)}; do",
        '    [ -f "$here/$f" ] || need "$here/$f is missing: run the install.sh that '
        'deskgpu setup render wrote next to it"',
        "done",
        'if [ -n "$missing" ]; then',
        "    printf 'install.sh: not installing, nothing was changed:%s\\n' \"$missing\" >&2",
        "    exit 1",
        "fi",
        "",
    ]
    lines += installing(installed)
    lines += [
        f"systemd-tmpfiles --create /{TMPFILES}",
        "systemctl daemon-reload",
    ]
    if mounts:
        lines += [
            "# The shared storage first: k3s-agent requires it (its drop-in).",
            f"systemctl enable --now {' '.join(m.unit for m in mounts)}",
        ]
    lines += [
        f"if systemctl is-active --quiet {nodes.K3S_AGENT_UNIT}; then",
        "    # A running agent keeps the config it started with; labels it registered with",
        "    # change on the server (its install.sh relabels every node of the host config).",
        f"    echo 'install.sh: {nodes.K3S_AGENT_UNIT} was already running; to load a changed "
        f"{nodes.K3S_CONFIG}: systemctl restart {nodes.K3S_AGENT_UNIT}'",
        "fi",
        f"systemctl enable --now {nodes.K3S_AGENT_UNIT} {OBSERVE.timer_unit}",
        *telemetry_agent_lines(config),
        f"echo 'installed; now run: deskgpu doctor (here), and on the server: sudo deskgpu "
        f"doctor (lists {node.name})'",
        "",
    ]
    return "\n".join(lines)
