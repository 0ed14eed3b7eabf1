"""Who is asking, and names that are safe to hand to Kubernetes and the filesystem."""

from __future__ import annotations

import hashlib
import os
import pwd
import re

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
