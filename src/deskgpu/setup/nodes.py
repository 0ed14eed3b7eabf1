"""The files a cluster of boxes adds (the host config's `nodes:`): what is shared, and how an
agent joins. Pure text from the host config; `render.py` (the server) and `agent.py` (an
agent) put them into their node's file list and install.sh.

- Storage: `data_root` and `checkpoint_root` are the same directories on every node, so a job
  resumed on another node finds its checkpoints. By default the server exports its own over
  NFS (`/etc/exports.d/deskgpu.exports`) and each agent mounts them with systemd `.mount`
  units; with `storage: {nfs: ...}` every node, the server too, mounts the NAS's exports.
  The k3s service of a node that mounts them requires the mounts (a drop-in with
  `RequiresMountsFor=`): without them no pod starts there, so no job ever writes its
  checkpoints to the local disk under an empty mount point.
- Joining: an agent's k3s reads `/etc/rancher/k3s/config.yaml` (the server's URL, its node
  name, its labels) and the server's node token from a root-only file, by path: the token is
  never rendered, printed or passed on a command line.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import yaml

from deskgpu import __version__
from deskgpu.config import HostConfig
from deskgpu.config.nodes import Node
from deskgpu.kubenames import ACCELERATOR_LABEL, VERSION_ANNOTATION, accelerator_label_value

K3S_PORT = 6443  # k3s's supervisor and API server: what an agent joins
K3S_SERVER_UNIT = "k3s.service"
K3S_AGENT_UNIT = "k3s-agent.service"  # what k3s's installer names an agent's service
K3S_CONFIG = "/etc/rancher/k3s/config.yaml"  # read by `k3s agent` (and `k3s server`) at start
# The server's join token, copied by the admin from the server's
# /var/lib/rancher/k3s/server/node-token; root's, 0600, read by k3s through `token-file`.
K3S_TOKEN_FILE = "/etc/deskgpu/k3s-token"  # noqa: S105 - a path, not a token
SERVER_TOKEN = "/var/lib/rancher/k3s/server/node-token"  # noqa: S105 - a path, not a token
EXPORTS_FILE = "/etc/exports.d/deskgpu.exports"
NFS_SERVER_UNIT = "nfs-server.service"  # Ubuntu's nfs-kernel-server package
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"  # the device plugin chart's node affinity
DOC = "docs/setup.md#adding-a-box"

# exports(5): the data read-only; the checkpoints read-write, and root stays root (the
# kubelet, as root, creates `<root>/<user>` in the root-owned checkpoint root, and a job's
# root writes its checkpoints there, as on the server's own disk). Only the agents' addresses
# are listed; `sync`: a checkpoint the job saw written is on the server's disk.
EXPORT_DATA = ("ro", "sync", "no_subtree_check", "root_squash")
EXPORT_CHECKPOINTS = ("rw", "sync", "no_subtree_check", "no_root_squash")
# nfs(5) / mount(8): `hard` (a job blocks while the server is away rather than getting I/O
# errors mid-checkpoint), no set-uid programs or device files from the share.
MOUNT_DATA = ("ro", "hard", "noatime", "nosuid", "nodev")
MOUNT_CHECKPOINTS = ("rw", "hard", "noatime", "nosuid", "nodev")


@dataclass(frozen=True)
class SharedMount:
    """One NFS mount a node needs: `what` at `where`."""

    what: str  # "10.0.0.10:/data", "nas.lab:/export/checkpoints"
    where: str  # the host config's root
    options: tuple[str, ...]
    purpose: str  # "data (read-only)"

    @property
    def unit(self) -> str:
        return mount_unit_name(self.where)


def mount_unit_name(path: str) -> str:
    """systemd's unit name for a mount point (`systemd-escape --path --suffix=mount`)."""
    trimmed = "/".join(p for p in path.split("/") if p) or "-"
    if trimmed == "-":
        return "-.mount"
    allowed = set(string.ascii_letters + string.digits + ":_.")
    out = []
    for i, ch in enumerate(trimmed):
        if ch == "/":
            out.append("-")
        elif ch in allowed and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out) + ".mount"


def exports_nfs(config: HostConfig) -> bool:
    """The server exports the roots itself (no NAS named, and agents to serve)."""
    return config.storage is None and any(n.role != "server" for n in config.nodes)


def shared_mounts(config: HostConfig, node: Node) -> list[SharedMount]:
    """The NFS mounts `node` needs: the NAS's on every node, else the server's on agents."""
    if config.storage is not None:
        data, ckpt = config.storage.data, config.storage.checkpoints
    elif node.role == "server":
        return []  # its own disks: it is what the others mount
    else:
        server = config.server_node
        address = server.address if server else None
        data, ckpt = f"{address}:{config.data_root}", f"{address}:{config.checkpoint_root}"
    return [
        SharedMount(data, config.data_root, MOUNT_DATA, "data (read-only)"),
        SharedMount(ckpt, config.checkpoint_root, MOUNT_CHECKPOINTS, "checkpoints (read-write)"),
    ]


def mount_unit(config: HostConfig, mount: SharedMount, header: str) -> str:
    lines = [
        header.rstrip("\n"),
        f"# The cluster's shared {mount.purpose}: the same {mount.where} on every node, so a",
        "# job resumed on another node sees the same files. The node's k3s requires it.",
        "[Unit]",
        f"Description=deskgpu shared {mount.purpose} from {mount.what}",
        f"Documentation=https://github.com/deskgpu/deskgpu/blob/main/{DOC}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Mount]",
        f"What={mount.what}",
        f"Where={mount.where}",
        "Type=nfs",
        f"Options={','.join(mount.options)}",
        "TimeoutSec=2min",
        "",
        "[Install]",
        "WantedBy=remote-fs.target",
        "",
    ]
    return "\n".join(lines)


def mounts_dropin(mounts: list[SharedMount], header: str) -> str:
    """A k3s unit's drop-in: it starts only with the shared mounts in place."""
    lines = [
        header.rstrip("\n"),
        "# No pod starts on this node without the shared storage: a job would otherwise write",
        "# its checkpoints to the local disk under the empty mount point.",
        "[Unit]",
        f"RequiresMountsFor={' '.join(m.where for m in mounts)}",
        "",
    ]
    return "\n".join(lines)


def exports(config: HostConfig, header: str) -> str:
    """/etc/exports.d/deskgpu.exports on the server: the roots, to the agents only."""
    agents = [n.address for n in config.nodes if n.role != "server" and n.address]

    def line(path: str, options: tuple[str, ...]) -> str:
        return path + "".join(f" {a}({','.join(options)})" for a in agents)

    lines = [
        header.rstrip("\n"),
        "# exports(5): the data read-only, the checkpoints read-write, to the agents only.",
        "# no_root_squash on the checkpoints: the agents' kubelets (root) create <root>/<user>",
        "# in the root-owned checkpoint root and jobs write there as on the server's own disk;",
        "# so root on an agent is root on the checkpoints. `exportfs -ra` after a change.",
        line(config.data_root, EXPORT_DATA),
        line(config.checkpoint_root, EXPORT_CHECKPOINTS),
    ]
    return "\n".join(lines) + "\n"


def node_labels(node: Node) -> dict[str, str]:
    """The labels a node carries from the host config (SkyPilot's GPU type, the plugin's)."""
    labels = {GPU_PRESENT_LABEL: "true"} if node.gpus else {}
    if len(node.gpus) == 1:
        (model,) = node.gpus
        labels[ACCELERATOR_LABEL] = accelerator_label_value(model)
    return labels


def label_command(node: Node) -> str | None:
    """The `kubectl` arguments (after `kubectl`) that give a joined node its labels."""
    labels = node_labels(node)
    if not labels:
        return None
    pairs = " ".join(f"{k}={v}" for k, v in labels.items())
    return f"label node {node.name} --overwrite {pairs}"


def version_annotation() -> str:
    """What the server's node is annotated with: the deskgpu that rendered its files."""
    return f"{VERSION_ANNOTATION}={__version__}"


def server_url(config: HostConfig) -> str:
    server = config.server_node
    return f"https://{server.address if server else '127.0.0.1'}:{K3S_PORT}"


def k3s_agent_config(config: HostConfig, node: Node, header: str) -> str:
    """An agent's /etc/rancher/k3s/config.yaml: whom it joins, as what, with which labels."""
    doc = {
        "server": server_url(config),
        "token-file": K3S_TOKEN_FILE,
        "node-name": node.name,
        "node-label": [f"{k}={v}" for k, v in node_labels(node).items()],
    }
    if not doc["node-label"]:
        del doc["node-label"]
    about = (
        "# k3s reads this at start (`k3s agent`): the server it joins, its node name, and the\n"
        "# labels it registers with (the server's install.sh keeps them in line afterwards).\n"
        f"# The token is read from {K3S_TOKEN_FILE} (root's, 0600), never written here.\n"
    )
    return header + about + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
