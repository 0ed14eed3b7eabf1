"""The host config's `nodes:` and `storage:`: the boxes of one k3s cluster and what they share.

Absent, the host config describes one box (today's). Present, `nodes:` lists every k3s node
once: its node name, its role (exactly one `server`: k3s's server, the API server, the
house rules; the rest `agent`s that join it), its GPUs and, once there are agents, the address
the others reach it at. The top-level `gpus:` is then not written: it is derived, the sum of
every node's (`HostConfig.gpus`), so the inventory lives in one place.

`storage:` names shared storage every node mounts at `data_root` and `checkpoint_root`:
`{nfs: {data: HOST:/PATH, checkpoints: HOST:/PATH}}` (a NAS). Without it, the server exports
its own `data_root` (read-only) and `checkpoint_root` (read-write) over NFS and the agents
mount them, so a job resumed on another node sees the same `/checkpoints/<user>/<job>`.

Imports nothing of deskgpu's but the YAML locations: the config loader builds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deskgpu.yamlio import Located

SERVER = "server"
AGENT = "agent"
ROLES = (SERVER, AGENT)


@dataclass(frozen=True)
class Node:
    """One k3s node of the cluster, as the host config describes it."""

    name: str  # the k3s node name (`kubectl get nodes`, `kubernetes.io/hostname`)
    role: str  # "server" or "agent"
    gpus: dict[str, int] = field(default_factory=dict)  # {MODEL: COUNT}
    address: str | None = None  # hostname or IPv4 the other nodes reach it at

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Node:
        return cls(
            name=str(data["name"]),
            role=str(data["role"]),
            gpus={str(k): int(v) for k, v in (data.get("gpus") or {}).items()},
            address=str(data["address"]) if data.get("address") else None,
        )

    def as_mapping(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "role": self.role}
        if self.address:
            doc["address"] = self.address
        if self.gpus:
            doc["gpus"] = dict(self.gpus)
        return doc

    @property
    def gpu_count(self) -> int:
        return sum(self.gpus.values())

    def describe_gpus(self) -> str:
        return ", ".join(f"{n}x {m}" for m, n in self.gpus.items()) or "no GPUs"


@dataclass(frozen=True)
class SharedStorage:
    """An existing NAS: the NFS exports mounted at `data_root` and `checkpoint_root`."""

    data: str  # "nas.lab:/export/data", mounted read-only
    checkpoints: str  # "nas.lab:/export/checkpoints", mounted read-write

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SharedStorage:
        nfs = data.get("nfs") or {}
        return cls(data=str(nfs["data"]), checkpoints=str(nfs["checkpoints"]))

    def as_mapping(self) -> dict[str, Any]:
        return {"nfs": {"data": self.data, "checkpoints": self.checkpoints}}


def nodes_from(raw: Any) -> tuple[Node, ...]:
    """`nodes:` as written (a list of mappings) or already built."""
    if not raw:
        return ()
    return tuple(n if isinstance(n, Node) else Node.from_mapping(n) for n in raw)


def storage_from(raw: Any) -> SharedStorage | None:
    if raw is None or isinstance(raw, SharedStorage):
        return raw
    return SharedStorage.from_mapping(raw)


def summed_gpus(nodes: Sequence[Node]) -> dict[str, int]:
    """The cluster's inventory: every node's GPUs added up, models in first-seen order."""
    total: dict[str, int] = {}
    for node in nodes:
        for model, count in node.gpus.items():
            total[model] = total.get(model, 0) + count
    return total


def cluster_problems(doc: Located) -> list[str]:
    """What the schema cannot say about `nodes:` / `storage:`, each a located line."""
    data = doc.data if isinstance(doc.data, dict) else {}
    raw = data.get("nodes")
    found: list[tuple[tuple[int, int], str]] = []
    if raw is None:
        if data.get("storage") is not None:
            found.append(
                doc.located(
                    ("storage",),
                    "names the storage the nodes share, and there is no `nodes:`",
                    "add `nodes:` (one box: `nodes: [{name: <k3s node name>, role: server, "
                    "gpus: {A6000: 4}}]`), or remove `storage:`",
                    key=True,
                )
            )
        return [text for _, text in sorted(found)]
    if "gpus" in data:
        found.append(
            doc.located(
                ("gpus",),
                "is derived from `nodes:` (the sum of every node's gpus), so it is not written "
                "beside it",
                "remove the top-level `gpus:`; give each node its own `gpus:`",
                key=True,
            )
        )
    seen: dict[str, int] = {}
    servers: list[int] = []
    for i, item in enumerate(raw):
        name = str(item["name"])
        if name in seen:
            found.append(
                doc.located(
                    ("nodes", i, "name"),
                    f"node {name!r} is listed twice (first at nodes[{seen[name]}])",
                    "give each k3s node one entry, named as `kubectl get nodes` shows it",
                )
            )
        seen.setdefault(name, i)
        if item["role"] == SERVER:
            servers.append(i)
    if not servers:
        found.append(
            doc.located(
                ("nodes",),
                "no node has `role: server`",
                "mark the box that runs k3s's server and the SkyPilot API server `role: server`",
                key=True,
            )
        )
    for i in servers[1:]:
        first = raw[servers[0]]["name"]
        found.append(
            doc.located(
                ("nodes", i, "role"),
                f"a second server; {first!r} is the cluster's server",
                "exactly one node is `role: server`; make this one `role: agent`",
            )
        )
    if any(item["role"] == AGENT for item in raw):
        for i, item in enumerate(raw):
            if not item.get("address"):
                found.append(
                    doc.located(
                        ("nodes", i),
                        f"node {item['name']!r} has no `address`; with agents, every node "
                        "needs one (agents join the server's, the server exports storage to "
                        "the agents')",
                        "add `address: <hostname or IPv4 the other boxes reach it at>`",
                    )
                )
    return [text for _, text in sorted(found)]
