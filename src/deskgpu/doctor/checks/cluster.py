"""A cluster of boxes (the host config's `nodes:`): which node this is, and on an agent that it
has joined, carries its labels, advertises its GPUs, mounts the shared storage, runs the
server's deskgpu and keeps the server's time; on the server, every node with its state.

Nothing here runs on a single box (`run_checks` leaves these out there).
"""

from __future__ import annotations

import email.utils
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.config.nodes import AGENT, SERVER, Node
from deskgpu.doctor.checks.base import FAIL, OK, SKIP, WARN, Check, _Component, _json
from deskgpu.doctor.facts import HostFacts
from deskgpu.kubenames import VERSION_ANNOTATION
from deskgpu.setup import nodes as cluster_files
from deskgpu.yamlio import yaml_get

_cluster = _Component("cluster")
GPU_RESOURCE = "nvidia.com/gpu"
MAX_CLOCK_SKEW_S = 2.0  # one history from many nodes: samples minutes apart, 2 s is plenty
NFS_TYPES = ("nfs", "nfs4")
RENDER = "deskgpu setup render --node {node} --out /tmp/box && sudo sh /tmp/box/install.sh"
ADDING_A_BOX = "docs/setup.md#adding-a-box"


def node_name(facts: HostFacts) -> str | None:
    """This host's k3s node name: an agent's `node-name` (its k3s config), else its hostname
    in lower case (what k3s names a node by default)."""
    cluster = facts.cluster
    if cluster is not None and cluster.k3s_config is not None:
        named = yaml_get(cluster.k3s_config.text, ("node-name",))
        if isinstance(named, str) and named:
            return named
    return facts.hostname.lower() if facts.hostname else None


def this_node(facts: HostFacts, config: HostConfig) -> Node | None:
    """The node of `nodes:` doctor runs on (None: one box, or a host the config does not name)."""
    name = node_name(facts)
    return config.node(name) if config.nodes and name else None


def local_gpus(facts: HostFacts, config: HostConfig) -> dict[str, int]:
    """The GPUs this host should have: its node's on a cluster, else the box's `gpus:`."""
    node = this_node(facts, config)
    return dict(node.gpus) if node is not None else dict(config.gpus)


def _node_doc(item: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, str], bool, int]:
    meta = item.get("metadata") or {}
    status = item.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and str(c.get("status")) == "True"
        for c in status.get("conditions") or []
    )
    try:
        gpus = int((status.get("allocatable") or {}).get(GPU_RESOURCE, 0))
    except (TypeError, ValueError):
        gpus = 0
    return (
        str(meta.get("name", "?")),
        dict(meta.get("labels") or {}),
        dict(meta.get("annotations") or {}),
        ready,
        gpus,
    )


def _nodes(facts: HostFacts, node: Node | None) -> tuple[list[dict[str, Any]] | None, str]:
    """k3s's nodes as this node sees them (agent: its kubelet's credentials), or why not."""
    cluster = facts.cluster
    command = cluster.nodes if node is not None and node.role == AGENT and cluster else None
    if command is None:
        command = facts.command("kube_nodes")
    if command is None:
        return None, "nodes were not listed"
    doc = _json(command.stdout) if command.ok else None
    if not isinstance(doc, dict):
        return None, command.first_error_line()
    return [i for i in doc.get("items") or [] if isinstance(i, dict)], ""


def check_cluster(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    del s
    if not config.nodes:
        return []
    node = this_node(facts, config)
    out = [_check_node(facts, config, node)]
    listed, why = _nodes(facts, node)
    out.append(_check_all_nodes(config, listed, why))
    out += _agent_checks(facts, config, node, listed, why)
    out.append(_check_shared_storage(facts, config, node))
    out.append(_check_clock(facts, config, node))
    return out


def _check_node(facts: HostFacts, config: HostConfig, node: Node | None) -> Check:
    server = config.server_node
    if node is None:
        name = node_name(facts)
        return _cluster(
            "node",
            FAIL,
            f"this host ({name or 'no name'}) is none of the host config's nodes "
            f"({config.describe_nodes()})",
            "list it in `nodes:` by its k3s node name, or render its files with "
            f"`{RENDER.format(node='<name>')}` (its k3s then registers by that name)",
        )
    where = f"of a {len(config.nodes)}-node cluster"
    if node.role == SERVER:
        return _cluster("node", OK, f"{node.name}, the server {where}: {node.describe_gpus()}")
    return _cluster(
        "node",
        OK,
        f"{node.name}, an agent {where} (server {server.name if server else '?'} at "
        f"{cluster_files.server_url(config)}): {node.describe_gpus()}",
    )


def _check_all_nodes(config: HostConfig, listed: list[dict[str, Any]] | None, why: str) -> Check:
    """The server's view: every node of `nodes:` with its state."""
    if listed is None:
        return _cluster("nodes", SKIP, f"cannot list k3s's nodes: {why}")
    seen = {name: (labels, ready, gpus) for name, labels, _, ready, gpus in map(_node_doc, listed)}
    states, broken = [], []
    for node in config.nodes:
        if node.name not in seen:
            states.append(f"{node.name}: not joined")
            broken.append(node)
            continue
        _, ready, gpus = seen[node.name]
        state = "Ready" if ready else "NotReady"
        states.append(f"{node.name} ({node.role}): {state}, {gpus}/{node.gpu_count} GPUs")
        if not ready or gpus != node.gpu_count:
            broken.append(node)
    extra = sorted(set(seen) - {n.name for n in config.nodes})
    shown = "; ".join(states)
    if broken:
        first = broken[0]
        if first.name not in seen:
            fix = f"on {first.name}: `{RENDER.format(node=first.name)}` ({ADDING_A_BOX})"
        elif not seen[first.name][1]:
            fix = f"on {first.name}: `sudo journalctl -u k3s-agent -n 50`; `deskgpu doctor` there"
        else:
            fix = (
                f"the device plugin's pod on {first.name} (`kubectl -n nvidia-device-plugin get "
                f"pods -o wide`), or fix its `gpus:` in `nodes:`"
            )
        return _cluster("nodes", FAIL, shown, fix)
    if extra:
        return _cluster(
            "nodes",
            WARN,
            f"{shown}; k3s also has {', '.join(extra)}, which `nodes:` does not list (no house "
            "rule counts its GPUs)",
            f"add it to `nodes:`, or `kubectl delete node {extra[0]}` if it left",
        )
    return _cluster("nodes", OK, shown)


def _agent_checks(
    facts: HostFacts,
    config: HostConfig,
    node: Node | None,
    listed: list[dict[str, Any]] | None,
    why: str,
) -> list[Check]:
    names = ("joined", "labels", "gpus", "version")
    if node is None or node.role != AGENT:
        return [_cluster(n, SKIP, "an agent's check") for n in names]
    render = RENDER.format(node=node.name)
    if listed is None:
        return [
            _cluster(
                "joined",
                FAIL,
                f"{node.name} has not joined: its kubelet cannot list the cluster's nodes ({why})",
                "`sudo systemctl status k3s-agent`, `sudo journalctl -u k3s-agent -n 50` (the "
                f"server URL, the token in {cluster_files.K3S_TOKEN_FILE}); then `{render}`",
            ),
            *(_cluster(n, SKIP, "not joined") for n in names[1:]),
        ]
    by_name = {doc[0]: doc for doc in map(_node_doc, listed)}
    mine = by_name.get(node.name)
    if mine is None:
        return [
            _cluster(
                "joined",
                FAIL,
                f"{node.name} has not joined: k3s has {', '.join(sorted(by_name)) or 'no nodes'}",
                f"`{render}`; then `sudo journalctl -u k3s-agent -n 50`",
            ),
            *(_cluster(n, SKIP, "not joined") for n in names[1:]),
        ]
    _, labels, _, ready, gpus = mine
    out = []
    if not ready:
        out.append(
            _cluster(
                "joined",
                FAIL,
                f"{node.name} has joined but is not Ready",
                "`sudo journalctl -u k3s-agent -n 50`; on the server `kubectl describe node "
                f"{node.name}`",
            )
        )
    else:
        out.append(_cluster("joined", OK, f"{node.name} has joined and is Ready"))
    want = cluster_files.node_labels(node)
    wrong = {k: v for k, v in want.items() if labels.get(k) != v}
    if wrong:
        have = ", ".join(f"{k}={labels.get(k, '(none)')}" for k in wrong)
        pairs = " ".join(f"{k}={v}" for k, v in wrong.items())
        out.append(
            _cluster(
                "labels",
                FAIL,
                f"{node.name} has {have}; its `gpus:` ({node.describe_gpus()}) say "
                + ", ".join(f"{k}={v}" for k, v in wrong.items()),
                f"on the server: `sudo k3s kubectl label node {node.name} --overwrite {pairs}` "
                "(its install.sh does it for every joined node)",
            )
        )
    else:
        shown = ", ".join(f"{k}={v}" for k, v in want.items()) or "none needed"
        out.append(_cluster("labels", OK, shown))
    if gpus != node.gpu_count:
        out.append(
            _cluster(
                "gpus",
                FAIL,
                f"{node.name} advertises {gpus} {GPU_RESOURCE}; its `gpus:` say "
                f"{node.gpu_count} ({node.describe_gpus()})",
                f"on the server: `sudo k3s kubectl -n nvidia-device-plugin get pods -o wide` "
                f"(a plugin pod on {node.name}, labelled nvidia.com/gpu.present=true); here: "
                "`sudo systemctl restart k3s-agent` after installing the container toolkit",
            )
        )
    else:
        out.append(_cluster("gpus", OK, f"{gpus} {GPU_RESOURCE} advertised"))
    out.append(_check_version(facts, config, by_name))
    return out


def _check_version(
    facts: HostFacts, config: HostConfig, by_name: dict[str, tuple[Any, ...]]
) -> Check:
    server = config.server_node
    mine = facts.cluster.deskgpu_version if facts.cluster else None
    doc = by_name.get(server.name) if server else None
    theirs = doc[2].get(VERSION_ANNOTATION) if doc else None
    if not theirs:
        return _cluster(
            "version",
            WARN,
            f"the server's node records no {VERSION_ANNOTATION}: cannot compare with this "
            f"node's deskgpu {mine}",
            "rerun the server's install.sh (it records the version its files came from)",
        )
    if theirs != mine:
        return _cluster(
            "version",
            FAIL,
            f"deskgpu {mine} here, {theirs} on the server ({server.name if server else '?'})",
            "install the same deskgpu on every node (docs/setup.md, step 3, from the same "
            "commit), then render and install again here and on the server",
        )
    return _cluster("version", OK, f"deskgpu {mine}, as on the server")


def _mounts(facts: HostFacts) -> dict[str, tuple[str, str, list[str]]] | None:
    """/proc/self/mounts by mount point: (source, fstype, options); the last mount wins."""
    fact = facts.cluster.mounts if facts.cluster else None
    if fact is None or fact.text is None:
        return None
    found = {}
    for line in fact.text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            point = parts[1].replace("\\040", " ")
            found[point] = (parts[0], parts[2], parts[3].split(","))
    return found


def _check_shared_storage(facts: HostFacts, config: HostConfig, node: Node | None) -> Check:
    if node is None:
        return _cluster("shared_storage", SKIP, "this host is none of the cluster's nodes")
    wanted = cluster_files.shared_mounts(config, node)
    if not wanted:
        return _cluster(
            "shared_storage",
            OK,
            f"{config.data_root} and {config.checkpoint_root} are this node's own disks, "
            "exported to the agents",
        )
    mounts = _mounts(facts)
    if mounts is None:
        return _cluster("shared_storage", SKIP, "the mount table was not read")
    problems, fixes = [], []
    for m in wanted:
        found = mounts.get(m.where)
        if found is None:
            problems.append(f"{m.where} is not mounted (the shared {m.purpose} {m.what})")
            fixes.append(f"`sudo systemctl enable --now {m.unit}`; `systemctl status {m.unit}`")
            continue
        source, fstype, options = found
        if fstype not in NFS_TYPES or source != m.what:
            problems.append(f"{m.where} is {fstype} {source}, not nfs {m.what}")
            fixes.append(f"`sudo umount {m.where} && sudo systemctl restart {m.unit}`")
        elif m.where == config.data_root and "ro" not in options:
            problems.append(f"{m.where} is mounted read-write; data is read-only on every node")
            fixes.append(f"`sudo systemctl restart {m.unit}` (its unit mounts it ro)")
    ckpt = facts.cluster.checkpoints_write if facts.cluster else None
    ckpt_mounted = config.checkpoint_root in mounts
    if ckpt_mounted and ckpt not in (None, "ok"):
        problems.append(f"root cannot write {config.checkpoint_root}: {ckpt}")
        fixes.append(
            "the server's export must be rw,no_root_squash to this node "
            f"({cluster_files.EXPORTS_FILE}); `sudo exportfs -ra` there"
        )
    if problems:
        return _cluster("shared_storage", FAIL, "; ".join(problems), "; ".join(fixes))
    detail = ", ".join(f"{m.where} from {m.what}" for m in wanted)
    if ckpt is None:
        return _cluster(
            "shared_storage",
            OK,
            f"{detail} (run as root to try a write to {config.checkpoint_root})",
        )
    return _cluster("shared_storage", OK, f"{detail}; root writes {config.checkpoint_root}")


def _check_clock(facts: HostFacts, config: HostConfig, node: Node | None) -> Check:
    cluster = facts.cluster
    ntp = cluster.ntp if cluster else None
    synced = ntp.stdout.strip() if ntp is not None and ntp.ok else None
    fix = "`sudo timedatectl set-ntp true`, then `timedatectl timesync-status`"
    if synced == "no":
        return _cluster(
            "clock",
            FAIL,
            "the clock is not NTP-synchronised (timedatectl: NTPSynchronized=no): one history "
            "from many nodes needs one time",
            fix,
        )
    offset = _server_offset(facts) if node is not None and node.role == AGENT else None
    if offset is not None and abs(offset) > MAX_CLOCK_SKEW_S:
        return _cluster(
            "clock",
            FAIL,
            f"this clock is {abs(offset):.0f} s {'behind' if offset > 0 else 'ahead of'} the "
            f"server's (more than {MAX_CLOCK_SKEW_S:g} s)",
            fix + "; on both nodes the same NTP servers (`/etc/systemd/timesyncd.conf`)",
        )
    if synced is None:
        why = ntp.first_error_line() if ntp is not None else "not asked"
        return _cluster("clock", WARN, f"cannot tell whether NTP synchronises ({why})", fix)
    against = ""
    if offset is not None:
        against = f", within {max(1, round(abs(offset)))} s of the server's clock"
    return _cluster("clock", OK, f"NTP-synchronised{against}")


def _server_offset(facts: HostFacts) -> float | None:
    """The server's clock minus ours, from its `Date:` header (1 s resolution)."""
    cluster = facts.cluster
    if cluster is None or cluster.server_date is None or cluster.server_date_at is None:
        return None
    for line in cluster.server_date.stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "date":
            try:
                when = email.utils.parsedate_to_datetime(value.strip())
            except (TypeError, ValueError):
                return None
            return when.timestamp() - cluster.server_date_at
    return None
