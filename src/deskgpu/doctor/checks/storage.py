"""Storage: /data and /checkpoints exist, with safe modes, on a local disk with room."""

from __future__ import annotations

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.doctor.checks.base import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    _Component,
)
from deskgpu.doctor.facts import (
    HostFacts,
    PathFact,
)

NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "glusterfs", "ceph", "lustre", "9p", "afs")
NETWORK_FUSE = ("sshfs", "s3fs", "gcsfuse", "rclone", "juicefs", "goofys", "glusterfs")

_storage = _Component("storage")


def _gib(n: int) -> str:
    if n >= 2**40:
        return f"{n / 2**40:.1f} TiB"
    return f"{n / 2**30:.1f} GiB"


def check_storage(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    data = facts.storage.get("data") or PathFact(path=config.data_root)
    ckpt = facts.storage.get("checkpoints") or PathFact(path=config.checkpoint_root)
    return [
        _check_root("data", data, "data_root", s, writable=False),
        _check_root("checkpoints", ckpt, "checkpoint_root", s, writable=True),
        _check_free_space([data, ckpt], s),
        _check_local_disk([data, ckpt], config),
    ]


def _check_root(name: str, fact: PathFact, key: str, s: Settings, writable: bool) -> Check:
    """`writable` is the checkpoint root: jobs write `<root>/<user>` through a kubelet subPath.

    The root itself must be root's alone: anyone who can write it can plant
    `ln -s / <root>/<user>` and turn that user's read-write mount into the host's `/`.
    """
    if not fact.exists:
        why = f" ({fact.error})" if fact.error else ""
        return _storage(
            name,
            FAIL,
            f"{fact.path} does not exist{why}",
            f"`sudo install -d -o root -g root -m 0755 {fact.path}` on a local disk "
            f"(or set {key} in the host config)",
        )
    if not fact.is_dir:
        return _storage(name, FAIL, f"{fact.path} is not a directory", f"set {key} to a directory")
    mode = fact.mode or 0
    shown = f"{fact.path} {oct(mode)[2:]:>04} {fact.owner}:{fact.group}"
    if not writable:
        group = s.research_group
        if not mode & 0o005 and not (group and fact.group == group and mode & 0o050):
            return _storage(
                name,
                WARN,
                f"{shown}: researchers cannot read it",
                f"`sudo chmod o+rx {fact.path}`",
            )
        return _storage(name, OK, shown)
    if mode & 0o022 or fact.owner not in ("root", None):
        who = (
            "everyone"
            if mode & 0o002
            else (f"group {fact.group}" if mode & 0o020 else f"its owner {fact.owner}")
        )
        return _storage(
            name,
            FAIL,
            f"{shown}: {who} can write it, so a symlink planted as <root>/<user> would give that "
            "user's jobs the host's files",
            f"`sudo chown root:root {fact.path} && sudo chmod 0755 {fact.path}`; give each "
            f"researcher `sudo install -d -o <user> -m 0755 {fact.path.rstrip('/')}/<user>`",
        )
    return _storage(name, OK, f"{shown}: root's alone; jobs write <root>/<user> through a subPath")


def _check_free_space(roots: list[PathFact], s: Settings) -> Check:
    parts: list[str] = []
    worst = OK
    low: list[str] = []
    for root in roots:
        if not root.exists or not root.total_bytes or root.free_bytes is None:
            continue
        pct = 100.0 * root.free_bytes / root.total_bytes
        parts.append(f"{root.path} {_gib(root.free_bytes)} free ({pct:.0f}%)")
        if pct < s.min_free_pct:
            worst = FAIL
            low.append(root.path)
        elif pct < s.warn_free_pct:
            worst = WARN if worst == OK else worst
            low.append(root.path)
    if not parts:
        return _storage("free_space", SKIP, "no storage root to measure")
    detail = ", ".join(parts)
    if worst != OK:
        threshold = s.min_free_pct if worst == FAIL else s.warn_free_pct
        return _storage(
            "free_space",
            worst,
            f"{detail}: below {threshold:g}%",
            f"`sudo du -xh --max-depth=2 {low[0]} | sort -h | tail` and prune old checkpoints",
        )
    return _storage("free_space", OK, detail)


def _check_local_disk(roots: list[PathFact], config: HostConfig) -> Check:
    seen: list[str] = []
    remote: list[str] = []
    memory: list[str] = []
    for root in roots:
        if not root.exists or not root.fstype:
            continue
        fs = root.fstype
        where = f"{root.path} on {root.mount_source or '?'} ({fs})"
        seen.append(where)
        if fs in NETWORK_FS or (fs.startswith("fuse.") and fs[5:] in NETWORK_FUSE):
            remote.append(where)
        elif fs in ("tmpfs", "ramfs", "overlay"):
            memory.append(where)
    if remote:
        return _storage(
            "local_disk",
            WARN,
            f"{'; '.join(remote)}: a network mount, slow for data and checkpoints",
            "mount the local NVMe there (or point data_root/checkpoint_root at it)",
        )
    if memory:
        return _storage(
            "local_disk",
            WARN,
            f"{'; '.join(memory)}: not a persistent local disk",
            "mount the local NVMe there (or point data_root/checkpoint_root at it)",
        )
    if not seen:
        return _storage("local_disk", SKIP, "no storage root to inspect")
    return _storage("local_disk", OK, "; ".join(seen))
