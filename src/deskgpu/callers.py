"""Who is asking the box's API server: the Unix account on the other end of the connection.

SkyPilot without authentication believes the `SKYPILOT_USER` and `SKYPILOT_USER_ID` a client
puts into a request's `env_vars`, and keys its own ownership on that id. On the box the guard
(`deskgpu.hardening.GuardMiddleware`) reads the connecting uid from /proc instead, and binds
every request to that account before SkyPilot parses it:

- an ordinary account runs as itself: `SKYPILOT_USER` is its name (a request that names
  someone else is refused, naming both), and `SKYPILOT_USER_ID` is derived from that name
  (`user_id_for`, the derivation SkyPilot's own auth-proxy mode uses), whatever id the
  client sent. No table, nothing to forget: the same account gets the same id after a
  reinstall of SkyPilot, and nobody else can present it;
- a trusted front end (`trusted_frontends` in the host config, e.g. Transformer Lab's
  server) may name the researcher it acts for; the named account must be a real, ordinary
  account, and the request gets that researcher's rights, never an admin's;
- root and the server's own account are the box's administrators and are taken at their
  word, as are SkyPilot's controllers (told apart by `hardening.is_internal_peer`).

Pure Python: no `import sky`.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

USER_ENV = "SKYPILOT_USER"
USER_ID_ENV = "SKYPILOT_USER_ID"
# Only meaningful to a server with basic auth (sky/server/requests/payloads.py); a bound
# request must not carry another account's.
CLIENT_HASH_ENV = "SKYPILOT_CLIENT_USER_HASH"
USER_ID_LENGTH = 8  # sky.utils.common_utils.USER_HASH_LENGTH
NOBODY = 65534
LOGIN_DEFS = Path("/etc/login.defs")

ROOT, SERVER, FRONTEND, USER = "root", "server", "frontend", "user"


def user_id_for(account: str) -> str:
    """The SkyPilot user id of `account` on the box.

    The same derivation SkyPilot uses for a user named by an authenticating proxy
    (sky/server/server.py `_extract_user_from_header`): md5 of the name, first 8 hex digits.
    Not a secret, and it need not be: the guard overwrites the id of every bound request.
    """
    digest = hashlib.md5(account.encode(), usedforsecurity=False).hexdigest()
    return digest[:USER_ID_LENGTH]


def uid_min(login_defs: Path = LOGIN_DEFS) -> int:
    """The lowest uid of an ordinary account (`UID_MIN` of /etc/login.defs, else 1000)."""
    try:
        for line in login_defs.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "UID_MIN" and parts[1].isdigit():
                return int(parts[1])
    except OSError:
        pass
    return 1000


def group_names(account: str, gid: int) -> frozenset[str]:
    names: set[str] = set()
    try:
        gids = os.getgrouplist(account, gid)
    except OSError:
        gids = [gid]
    for one in gids:
        try:
            names.add(grp.getgrgid(one).gr_name)
        except KeyError:
            continue
    return frozenset(names)


@dataclass(frozen=True)
class Caller:
    """The account on the other end of one connection."""

    uid: int
    account: str
    role: str  # ROOT, SERVER, FRONTEND or USER
    groups: frozenset[str] = frozenset()

    @property
    def exempt(self) -> bool:
        """Root and the server's account: taken at their word (the box's administrators)."""
        return self.role in (ROOT, SERVER)


@dataclass(frozen=True)
class Acting:
    """Whom a request runs as once bound: the researcher, and whether they are an admin."""

    caller: Caller
    user: str  # the SkyPilot user name the request runs as
    admin: bool

    @property
    def via(self) -> str:
        """`bob`, or `alice (via transformerlab)` for a front end acting for alice."""
        if self.caller.role == FRONTEND:
            return f"{self.user} (via {self.caller.account})"
        return self.user


class Refused(Exception):
    """A request the guard will not let through as sent (answered 403 with this line)."""


def caller_for_uid(
    uid: int | None, *, server_uid: int, frontends: Iterable[str] = ()
) -> Caller | None:
    """Who `uid` is on this box; None when the connection's owner could not be read."""
    if uid is None:
        return None
    try:
        entry = pwd.getpwuid(uid)
        account, gid = entry.pw_name, entry.pw_gid
    except KeyError:
        account, gid = f"uid{uid}", -1
    groups = group_names(account, gid) if gid >= 0 else frozenset()
    if uid == 0:
        return Caller(uid, account, ROOT, groups)
    if uid == server_uid:
        return Caller(uid, account, SERVER, groups)
    if account in set(frontends):
        return Caller(uid, account, FRONTEND, groups)
    return Caller(uid, account, USER, groups)


def researcher_refusal(name: str, *, server_uid: int, floor: int | None = None) -> str | None:
    """Why a front end may not act for `name` (None: a real, ordinary account)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return f"{name!r} is not an account on this box"
    floor = uid_min() if floor is None else floor
    if entry.pw_uid == 0:
        return f"{name!r} is root"
    if entry.pw_uid == server_uid:
        return f"{name!r} is the API server's own account"
    if entry.pw_uid < floor or entry.pw_uid == NOBODY:
        return f"{name!r} is a system account (uid {entry.pw_uid})"
    return None


def bind(
    env: dict[str, object],
    caller: Caller,
    *,
    server_uid: int,
    admin_group: str | None,
) -> Acting:
    """Rewrite a request's `env_vars` (in place) to the account it comes from.

    Raises `Refused` for a request that names another account (an ordinary caller), or that
    names no researcher, or not a real one (a front end).
    """
    claimed = env.get(USER_ENV)
    claimed_name = claimed if isinstance(claimed, str) and claimed else None
    if caller.exempt:
        return Acting(caller, claimed_name or caller.account, admin=True)
    if caller.role == FRONTEND:
        if claimed_name is None:
            raise Refused(
                f"front end {caller.account} must name the researcher it acts for in "
                f"env_vars.{USER_ENV} (deskgpu guard)"
            )
        why = researcher_refusal(claimed_name, server_uid=server_uid)
        if why:
            raise Refused(
                f"front end {caller.account} may act only for a researcher's account: {why} "
                "(deskgpu guard)"
            )
        user = claimed_name
    else:
        if claimed_name is not None and claimed_name != caller.account:
            raise Refused(
                f"this request says it is from {claimed_name}, but it comes from Unix account "
                f"{caller.account}: on this box a request runs as the account that sends it "
                f"(unset {USER_ENV}; a front end acting for researchers is listed in the host "
                "config's trusted_frontends) (deskgpu guard)"
            )
        user = caller.account
    env[USER_ENV] = user
    env[USER_ID_ENV] = user_id_for(user)
    env.pop(CLIENT_HASH_ENV, None)
    admin = caller.role == USER and admin_group is not None and admin_group in caller.groups
    return Acting(caller, user, admin=admin)


def may_act_for(acting: Acting, owner: str | None) -> bool:
    """Whether the request may end, change or run code on something `owner` owns."""
    if acting.admin:
        return True
    return owner is not None and owner == acting.user


def describe_rights(admin_group: str | None) -> str:
    group = f", a member of {admin_group}" if admin_group else ""
    return f"its owner, root{group} or the API server's account"


def frontends_problems(names: Iterable[str], passwd: Mapping[str, int] | None = None) -> list[str]:
    """What is wrong with a `trusted_frontends` list on this box (doctor shows it)."""
    problems = []
    for name in names:
        try:
            uid = passwd[name] if passwd is not None else pwd.getpwnam(name).pw_uid
        except KeyError:
            problems.append(f"{name}: no such account")
            continue
        if uid == 0:
            problems.append(f"{name}: is root (root needs no listing)")
    return problems
