"""Who is asking, who may act on whose things, and names that are safe to hand to Kubernetes
and the filesystem.

Who may act (reap, cancel, logs): root or a member of the `admin_group` on anything; anyone
else only on what they own. A non-root user chooses their config (`--config`,
`DESKGPU_CONFIG`), so `admin_group` counts only when it comes from the root-owned system
config: otherwise a user could name their own group, and tiny thresholds, and reap everyone.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from deskgpu.config import SYSTEM_CONFIG, HostConfig

# SkyPilot appends `-<8 hex>` to a cluster's name on Kubernetes and the pod label
# `skypilot-cluster=<name_on_cloud>` must stay within 63 characters: keep headroom.
MAX_CLUSTER_NAME = 45
MAX_USER_TOKEN = 20
_LABEL_VALUE = re.compile(r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def current_user() -> str:
    """The Unix account running deskgpu (never an environment variable a user can set)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid with no passwd entry, e.g. inside some containers
        return f"uid{os.getuid()}"


def safe_user(user: str) -> str:
    """A Unix user name as a DNS-label-safe token: lowercase, `[a-z0-9-]`, starts with a letter.

    Used in cluster names, label values and the per-user checkpoint directory, so it must
    never contain `/` or `..`, and two users must never share one: a name that had to be
    changed (`john.doe`, `Alice`) or shortened gets a hash of the original appended
    (`john-doe-1a2b3c`), so `john_doe` and `john.doe` stay apart.
    """
    token = re.sub(r"[^a-z0-9-]+", "-", user.lower()).strip("-")
    token = re.sub(r"-{2,}", "-", token)
    if not token or not token[0].isalpha():
        token = f"u-{token}".rstrip("-")
    if token == user and len(token) <= MAX_USER_TOKEN:
        return token
    digest = hashlib.sha256(user.encode("utf-8", "surrogateescape")).hexdigest()[:6]
    return f"{token[: MAX_USER_TOKEN - 7].rstrip('-')}-{digest}"


def cluster_name(user: str, job: str) -> str:
    """`<user>-<job>`: SkyPilot cluster names are global on a shared API server."""
    return f"{safe_user(user)}-{job}"


def is_label_value(text: str) -> bool:
    return len(text) <= 63 and bool(_LABEL_VALUE.match(text))


def is_dns_label(text: str) -> bool:
    return len(text) <= 63 and bool(_DNS_LABEL.match(text))


@dataclass(frozen=True)
class Actor:
    """Who runs reap."""

    user: str
    uid: int
    groups: frozenset[str]

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def current_actor() -> Actor:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid{uid}"
    names = set()
    for gid in {*os.getgroups(), os.getgid()}:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return Actor(user, uid, frozenset(names))


def root_owned(path: Path) -> bool:
    """The file and its directory belong to root and only root may write them."""
    try:
        for p in (path, path.parent):
            st = p.stat()
            if st.st_uid != 0 or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def trusted_admin_group(config: HostConfig, system: Path | None = None) -> str | None:
    """`admin_group`, if this config is the root-owned system config; else None."""
    system = SYSTEM_CONFIG if system is None else system
    if config.admin_group is None or config.source == "built-in defaults":
        return None
    try:
        same = Path(config.source).resolve() == system.resolve()
    except (OSError, RuntimeError):
        return None
    return config.admin_group if same and root_owned(system) else None


def passwd_names() -> list[str]:
    try:
        return [p.pw_name for p in pwd.getpwall()]
    except OSError:  # pragma: no cover - an unreadable passwd database
        return []


def may_act_on(
    actor: Actor, owner: str, admin_group: str | None, users: Iterable[str] = ()
) -> str | None:
    """None if `actor` may warn or tear down `owner`'s session, else why not.

    `admin_group` must be a trusted one (`trusted_admin_group`). Owners are labelled with
    `safe_user(<unix user>)`; an owner name that another account (in `users`) also
    matches is refused rather than guessed.
    """
    if actor.is_root or (admin_group is not None and admin_group in actor.groups):
        return None
    if owner not in (actor.user, safe_user(actor.user)):
        return f"owned by {owner}, needs root or admin_group"
    others = sorted(u for u in users if u != actor.user and owner in (u, safe_user(u)))
    if others:
        return f"owner name {owner} also matches account {others[0]}, needs root or admin_group"
    return None


def is_admin(actor: Actor, config: HostConfig) -> bool:
    """Root, or a member of the trusted `admin_group` (the root-owned system config's)."""
    if actor.is_root:
        return True
    group = trusted_admin_group(config)
    return group is not None and group in actor.groups


def refusals(actor: Actor, config: HostConfig) -> Callable[[str], str | None]:
    """`owner -> why this actor may not warn or tear down their session (None: may)`, the
    same answer for a dry run as for `--yes`: a dry run shows what `--yes` would do."""
    if actor.is_root:
        return lambda _owner: None
    admin = trusted_admin_group(config)
    users = passwd_names()
    untrusted = config.admin_group is not None and admin is None
    suffix = (
        f" (admin_group counts only from the root-owned {SYSTEM_CONFIG}, not {config.source})"
        if untrusted and config.admin_group in actor.groups
        else ""
    )

    def refused(owner: str) -> str | None:
        why = may_act_on(actor, owner, admin, users)
        return None if why is None else why + suffix

    return refused
