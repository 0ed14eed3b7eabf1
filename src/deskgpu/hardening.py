"""What no client request may change on the shared API server, and who is asking.

SkyPilot 0.14 applies a request's `env_vars` to the server worker that runs it
(`sky/server/requests/executor.py` `override_request_env_and_config`) and merges the client's
config over the server's (`skypilot_config.override_skypilot_config`, where `admin_policy` is
not among `SKIPPED_CLIENT_OVERRIDE_KEYS`). A researcher with the stock CLI or a raw HTTP
request could so point the server at their own config (no policy), their own host config,
their own `PATH`, or their own RESTful policy. The jobs controller's flag
`is_launched_by_jobs_controller` is likewise taken from the request body.

`GuardMiddleware` rewrites every JSON request body at the HTTP boundary before SkyPilot parses
it: it keeps only the request environment variables SkyPilot's own client needs (identity,
logging), drops `admin_policy` from the client's config, and drops the controller flags,
unless the connection comes from a SkyPilot controller process of the server's own account
(a server-side fact read from /proc, not from anything the client sends). For those, the
`INTERNAL_REQUEST` context variable is set so the policy can tell the controller's own
`/validate` from a client's.

Pure Python: no `import sky` (the plugin that installs this lives in `deskgpu.policy`).
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import os
import pwd
import re
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deskgpu import callers

logger = logging.getLogger("deskgpu.hardening")

# The request environment SkyPilot's own client sends that the server may apply: who is
# asking (SkyPilot records it; the box's trust model says it is asserted, not proven), the
# usage run id, and logging switches (sky/server/requests/payloads.py
# `request_body_env_vars`, sky/utils/env_options.py). Everything else a client could put
# there changes how the server itself behaves: SKYPILOT_CONFIG, SKYPILOT_GLOBAL_CONFIG,
# SKYPILOT_PROJECT_CONFIG, SKYPILOT_SERVER_*, DESKGPU_*, HOME, PATH, PYTHONPATH, LD_*,
# KUBECONFIG, cloud credentials, SKYPILOT_DEV, SKYPILOT_ALLOW_ALL_KUBERNETES_CONTEXTS, ...
ALLOWED_REQUEST_ENV = frozenset(
    {
        "SKYPILOT_USER_ID",
        "SKYPILOT_USER",
        "SKYPILOT_USAGE_RUN_ID",
        "SKYPILOT_CLIENT_USER_HASH",
        "SKYPILOT_DEBUG",
        "SKYPILOT_DISABLE_USAGE_COLLECTION",
        "SKYPILOT_MINIMIZE_LOGGING",
        "SKYPILOT_SUPPRESS_SENSITIVE_LOG",
    }
)
# What a SkyPilot user id looks like (an 8-hex hash, `sa-...` service accounts): SkyPilot
# uses it unchecked as a directory name on the server (sky/server/common.py, /upload).
USER_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Keys of the client's SkyPilot config that only the server's own config may set.
SERVER_ONLY_CONFIG_KEYS = ("admin_policy",)
# Request-body flags that SkyPilot's controllers set for their own relaunches.
CONTROLLER_FLAGS = ("is_launched_by_jobs_controller", "is_launched_by_sky_serve_controller")
# How SkyPilot starts its controllers (sky/jobs/scheduler.py `start_controller`,
# sky/serve/serve_utils.py): the process, or one it forked, runs one of these modules.
CONTROLLER_MODULES = ("sky.jobs.controller", "sky.serve.service")

# SkyPilot endpoints that change the server itself rather than run a user's work: its whole
# config (`/workspaces/config`), workspaces, users and tokens, SSH node pools, local
# clusters, node labels (sky/server/server.py and the routers it includes). Without
# authentication SkyPilot treats every client as an admin; on the box only root (or the
# server's own account) may call them.
ADMIN_PATHS = (
    "/workspaces/",
    "/ssh_node_pools",
    "/users/create",
    "/users/update",
    "/users/batch_update",
    "/users/delete",
    "/users/import",
    "/users/service-account-tokens",
    "/local_up",
    "/local_down",
    "/kubernetes_label_gpus",
    # Services and job pools, whose owners the guard does not check: the box runs neither.
    "/serve/",
    "/jobs/pool_apply",
    "/jobs/pool_down",
    "/jobs/pool_logs",
    "/jobs/pool_status",
    "/jobs/pool_sync-down-logs",
)


DASHBOARD_PREFIX = "/internal/dashboard/"  # SkyPilot's InternalDashboardPrefixMiddleware


def route_of(path: str) -> str:
    """The endpoint SkyPilot will route `path` to, as every rule of the guard must name it:
    SkyPilot strips the dashboard prefix once (after the guard has seen the path), and
    `.`/`//`/trailing-slash spellings reach the same handler."""
    import posixpath

    if path.startswith(DASHBOARD_PREFIX):
        path = path.replace(DASHBOARD_PREFIX, "/", 1)
    return posixpath.normpath("/" + path.lstrip("/")).rstrip("/") or "/"


# Reads only an admin may make: a debug dump of the whole server (its databases and logs),
# the export of every user, the server's whole SkyPilot config and its SSH node pools
# (sky/server/server.py, sky/users/server.py, sky/workspaces/server.py).
ADMIN_READ_PATHS = ("/debug/", "/users/export", "/workspaces/config", "/ssh_node_pools")


def is_admin_path(method: str, path: str) -> bool:
    """A call of an admin endpoint (a state-changing one, or an admin's read), however the
    path is spelled."""
    clean = route_of(path)

    def under(prefixes: Iterable[str]) -> bool:
        return any(
            clean == p.rstrip("/") or clean.startswith(p.rstrip("/") + "/") for p in prefixes
        )

    if under(ADMIN_READ_PATHS):
        return True
    if method in ("GET", "HEAD", "OPTIONS"):
        return False
    return under(ADMIN_PATHS)


@dataclass(frozen=True)
class GuardSettings:
    """What the guard needs from the box's host config, read per request (cached by the
    caller). `error`: the config is missing or broken, and every request is refused."""

    frontends: tuple[str, ...] = ()
    admin_group: str | None = None
    shared_logs: bool = False
    error: str | None = None


# Set by the guard in a client request's environment (after dropping any the client sent):
# the uid of the process on the other end of the connection, read from /proc.
PEER_UID_ENV = "DESKGPU_PEER_UID"

# Set by the guard on a request from a trusted front end (after dropping any the client
# sent): the front end's account, for the policy (its cluster names are its own).
FRONTEND_ENV = "DESKGPU_FRONTEND"

# True while the current HTTP request comes from a SkyPilot controller of this server.
INTERNAL_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "deskgpu_internal_request", default=False
)

# Set by the guard in the ASGI scope of a client's request without a body (a GET): whom it
# runs as (a `callers.Acting`), for the guard's own read endpoints (the queue). Absent on a
# controller's connection; a client cannot set it (it is no header, no field).
ACTING_KEY = "deskgpu.acting"


@dataclass(frozen=True)
class Scrubbed:
    """What `scrub_request_body` removed from one request."""

    env: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.env or self.config or self.flags)

    def __str__(self) -> str:
        parts = []
        if self.env:
            parts.append("env_vars " + ", ".join(self.env))
        if self.config:
            parts.append("config " + ", ".join(self.config))
        if self.flags:
            parts.append("flags " + ", ".join(self.flags))
        return "; ".join(parts)


class BadRequest(ValueError):
    """A client request the server must not run at all (answered 400)."""


def check_user_ids(body: Mapping[str, Any] | None, query: str) -> None:
    """The request's user id (body `env_vars.SKYPILOT_USER_ID`, query `user_hash`) must be an
    id, not a path."""
    from urllib.parse import parse_qs

    env = (body or {}).get("env_vars")
    ids = [env.get("SKYPILOT_USER_ID")] if isinstance(env, Mapping) else []
    ids += parse_qs(query, keep_blank_values=True).get("user_hash", [])
    for value in ids:
        if value is not None and not (isinstance(value, str) and USER_ID.fullmatch(value)):
            raise BadRequest(
                f"user id {str(value)[:80]!r} is not a SkyPilot user id (letters, digits, - and _)"
            )


def scrub_request_body(body: MutableMapping[str, Any]) -> Scrubbed:
    """Remove from a client's request body (in place) what only the server may decide."""
    env_dropped: list[str] = []
    env = body.get("env_vars")
    if isinstance(env, dict):
        for key in list(env):
            if key not in ALLOWED_REQUEST_ENV:
                env_dropped.append(str(key))
                del env[key]
    elif "env_vars" in body:
        # Not a mapping: SkyPilot would refuse it; make sure nothing odd reaches it.
        env_dropped.append("<not a mapping>")
        body["env_vars"] = {}
    config_dropped: list[str] = []
    override = body.get("override_skypilot_config")
    if isinstance(override, dict):
        for key in SERVER_ONLY_CONFIG_KEYS:
            if key in override:
                config_dropped.append(key)
                del override[key]
    flags: list[str] = []
    for flag in CONTROLLER_FLAGS:
        if body.get(flag):
            flags.append(flag)
        body.pop(flag, None)
    return Scrubbed(tuple(env_dropped), tuple(config_dropped), tuple(flags))


# ---------------------------------------------------------------------------------------------
# Who is on the other end of a loopback connection (/proc, as identd would)


def _hex_addr(host: str, port: int) -> set[str]:
    """The forms /proc/net/tcp{,6} use for host:port (IPv4, and IPv4-mapped IPv6)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return set()
    forms: set[str] = set()
    if isinstance(ip, ipaddress.IPv4Address):
        v4 = ip.packed[::-1].hex().upper()
        forms.add(f"{v4}:{port:04X}")
        mapped = ipaddress.IPv6Address(f"::ffff:{ip}").packed
    else:
        mapped = ip.packed
    # /proc/net/tcp6 prints each 32-bit word in host (little-endian) order.
    words = [mapped[i : i + 4][::-1].hex().upper() for i in range(0, 16, 4)]
    forms.add(f"{''.join(words)}:{port:04X}")
    return forms


@dataclass(frozen=True)
class Peer:
    uid: int
    inode: int


def socket_owner(
    client: tuple[str, int], server: tuple[str, int], proc: Path = Path("/proc")
) -> Peer | None:
    """The uid and socket inode of the client end of the TCP connection client -> server."""
    local = _hex_addr(*client)
    remote = _hex_addr(*server)
    if not local or not remote:
        return None
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            if fields[1] in local and fields[2] in remote:
                try:
                    return Peer(uid=int(fields[7]), inode=int(fields[9]))
                except ValueError:
                    return None
    return None


def _pids_of_uid(uid: int, proc: Path) -> Iterable[int]:
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    yield int(entry.name)
            except OSError:
                continue


def pid_holding_socket(inode: int, uid: int, proc: Path = Path("/proc")) -> int | None:
    """The process (of `uid`) that has socket `inode` open."""
    target = f"socket:[{inode}]"
    try:
        pids = list(_pids_of_uid(uid, proc))
    except OSError:
        return None
    for pid in pids:
        try:
            fds = list((proc / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if str(fd.readlink()) == target:
                    return pid
            except OSError:
                continue
    return None


def _cmdline(pid: int, proc: Path) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _parent(pid: int, proc: Path) -> int | None:
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its closing paren.
    rest = text.rsplit(")", 1)[-1].split()
    try:
        return int(rest[1])
    except (IndexError, ValueError):
        return None


def runs_controller_module(args: list[str]) -> bool:
    """`python -u -msky.jobs.controller UUID`, `python -m sky.serve.service ...`.

    Python's own options are read up to the first argument that is not one (a script, `-c`
    code): a module named after that is only an argument of someone else's program.
    """
    rest = iter(args[1:])
    for arg in rest:
        if not arg.startswith("-") or arg in ("-", "--"):
            return False
        letters = arg[1:]
        for i, letter in enumerate(letters):
            if letter == "m":
                module = letters[i + 1 :] or next(rest, "")
                return module in CONTROLLER_MODULES
            if letter == "c":
                return False
            if letter in "XW":  # takes a value: attached, or the next argument
                if i + 1 == len(letters):
                    next(rest, None)
                break
            if letter not in "bBdEhiIOPqsSuvVR":
                return False
    return False


def is_controller_process(pid: int, uid: int, proc: Path = Path("/proc"), depth: int = 4) -> bool:
    """`pid`, or one of its nearest ancestors of the same uid, is a SkyPilot controller."""
    current: int | None = pid
    for _ in range(depth):
        if current is None or current <= 1:
            return False
        try:
            if (proc / str(current)).stat().st_uid != uid:
                return False
        except OSError:
            return False
        if runs_controller_module(_cmdline(current, proc)):
            return True
        current = _parent(current, proc)
    return False


def is_internal_peer(
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
    *,
    server_uid: int | None = None,
    proc: Path = Path("/proc"),
) -> bool:
    """Whether the connection comes from a SkyPilot controller run by this server's account.

    Users of the box never run as the server's account, so their connections fail at the uid;
    a process of that account counts only if it (or a parent) runs a controller module.
    """
    if not client or not server:
        return False
    peer = socket_owner((str(client[0]), int(client[1])), (str(server[0]), int(server[1])), proc)
    uid = os.geteuid() if server_uid is None else server_uid
    if peer is None or peer.uid != uid:
        return False
    pid = pid_holding_socket(peer.inode, uid, proc)
    return pid is not None and is_controller_process(pid, uid, proc)


def _peer_uid(scope: Mapping[str, Any]) -> int | None:
    client, server = scope.get("client"), scope.get("server")
    if not client or not server:
        return None
    peer = socket_owner((str(client[0]), int(client[1])), (str(server[0]), int(server[1])))
    return None if peer is None else peer.uid


def _is_internal(scope: Mapping[str, Any]) -> bool:
    return is_internal_peer(scope.get("client"), scope.get("server"))


def readable_by(uid: int, path: str) -> bool:
    """Whether `uid` could read `path` itself (Unix modes of the path and its parents).

    What a job copies in from the server's disk must be what its submitter could read: the
    server's account reads more (its kubeconfig, its databases).
    """
    if uid == 0:
        return True
    try:
        entry = pwd.getpwuid(uid)
        groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except KeyError:
        groups = set()

    def allowed(st: os.stat_result, want: int) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & (want << 6))
        if st.st_gid in groups:
            return bool(st.st_mode & (want << 3))
        return bool(st.st_mode & want)

    real = Path(os.path.realpath(path))
    try:
        for parent in reversed(real.parents):
            if not allowed(parent.stat(), 1):
                return False
        st = real.stat()
    except OSError:
        return False
    # A directory is read by listing it and entering it.
    return allowed(st, 4) and (not stat.S_ISDIR(st.st_mode) or allowed(st, 1))


# ---------------------------------------------------------------------------------------------
# The ASGI middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY = 64 * 1024 * 1024  # a request SkyPilot parses as JSON in memory anyway


def _headers(scope: Scope, *names: bytes) -> tuple[str | None, ...]:
    """The values of `names` (lower case) in the request's headers, None where absent."""
    found: dict[bytes, str] = {}
    for name, value in scope.get("headers") or []:
        found.setdefault(name.lower(), value.decode("latin-1")[:40])
    return tuple(found.get(n) for n in names)


def _is_form(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind in (b"multipart/form-data", b"application/x-www-form-urlencoded")
    return False


class GuardMiddleware:
    """Scrubs every JSON request body of a client (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        is_internal: Callable[[Mapping[str, Any]], bool] | None = None,
        peer_uid: Callable[[Mapping[str, Any]], int | None] | None = None,
        body_rule: Callable[[str, Mapping[str, Any], callers.Acting], str | None] | None = None,
        settings: Callable[[], GuardSettings] | None = None,
        server_uid: int | None = None,
        open_paths: Iterable[str] = (),
        frontend_seen: Callable[[str, str | None, str | None], None] | None = None,
        request_owners: Callable[[str], Awaitable[list[str]]] | None = None,
    ) -> None:
        self.app = app
        self.is_internal = is_internal or _is_internal
        self.peer_uid = peer_uid or _peer_uid
        # What the admin policy never sees (`sky volumes apply`, `sky down`, `sky jobs cancel`,
        # logs): the rule says why a bound request is refused (403), or None.
        self.body_rule = body_rule
        self.settings = settings or GuardSettings
        self.server_uid = os.geteuid() if server_uid is None else server_uid
        # Answered whoever asks and whatever the host config: health and the guard's status.
        self.open_paths = frozenset(OPEN_PATHS) | frozenset(open_paths)
        # Told the SkyPilot API version of each trusted front end's client (doctor checks it).
        self.frontend_seen = frontend_seen
        # The user ids of the API requests a request-id prefix names (SkyPilot's records).
        self.request_owners = request_owners

    def _uid(self, scope: Scope) -> int | None:
        """The connecting uid, or None when it cannot be read (then trusted for nothing)."""
        try:
            return self.peer_uid(scope)
        except Exception:
            logger.exception("deskgpu guard: could not read the peer's uid")
            return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        internal = False
        try:
            internal = self.is_internal(scope)
        except Exception:  # a /proc oddity must fail closed (as a client), never open
            logger.exception("deskgpu guard: could not tell who is connecting")
        if internal:
            token = INTERNAL_REQUEST.set(True)
            try:
                await self.app(scope, receive, send)
            finally:
                INTERNAL_REQUEST.reset(token)
            return
        query = (scope.get("query_string") or b"").decode("latin-1")
        try:
            check_user_ids(None, query)
        except BadRequest as exc:
            await _refuse(send, 400, str(exc))
            return
        method = str(scope.get("method") or "")
        path = str(scope.get("path") or "")
        route = route_of(path)  # what every rule below judges: the handler SkyPilot runs
        if route in self.open_paths and method in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        settings = self._settings()
        if settings.error:
            await _refuse(send, 403, settings.error)
            return
        uid = self._uid(scope)
        caller = callers.caller_for_uid(
            uid, server_uid=self.server_uid, frontends=settings.frontends
        )
        if caller is None:
            await _refuse(
                send,
                403,
                "the deskgpu guard cannot tell which account this connection comes from, so "
                "it is refused (connect from this host, to 127.0.0.1)",
            )
            return
        if caller.role == callers.FRONTEND and self.frontend_seen is not None:
            found = _headers(scope, b"x-skypilot-api-version", b"x-skypilot-version")
            try:
                if found[0] is not None:  # SkyPilot's client says it on every request it sends
                    self.frontend_seen(caller.account, *found)
            except Exception:  # a note for doctor, never a reason to fail a request
                logger.exception("deskgpu guard: could not note a front end's client version")
        if is_admin_path(method, path) and not caller.exempt:
            await _refuse(
                send,
                403,
                f"{path} changes the API server itself: on this box only root may call it "
                "(deskgpu guard)",
            )
            return
        if caller.role == callers.USER and _names_user_hash(query):
            # An upload lands under the id its launch will carry: the account's.
            scope = {**scope, "query_string": _bound_query(query, caller.account).encode()}
        reads_body = method in ("POST", "PUT", "PATCH") and not _is_form(scope.get("headers") or [])
        if not reads_body:
            reader = self._reader(caller, settings)
            if route in REQUEST_READS and not reader.admin and caller.role != callers.FRONTEND:
                refusal = await self._request_read_refusal(route, query, reader)
                if refusal:
                    await _refuse(send, 403, refusal)
                    return
            if route in REQUEST_LISTINGS and not reader.admin and caller.role != callers.FRONTEND:
                send = _only_own_requests(send, callers.user_id_for(reader.user))
            await self.app({**scope, ACTING_KEY: reader}, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message.get("type") != "http.request":
                # The client went away before sending its body: nothing to run.
                return
            chunk = message.get("body", b"") or b""
            size += len(chunk)
            if size > MAX_BODY:
                await _refuse(send, 413, "request body too large for the deskgpu guard")
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        try:
            body, doc, acting = self._scrubbed(scope, body, uid, caller, settings)
        except BadRequest as exc:
            await _refuse(send, 400, str(exc))
            return
        except callers.Refused as exc:
            logger.warning(
                "deskgpu guard: %s %s from %s (uid %s): refused: %s",
                method, path, caller.account, caller.uid, exc,
            )  # fmt: skip
            await _refuse(send, 403, str(exc))
            return
        refusal = self._refusal(scope, doc, acting) if doc is not None else None
        if refusal:
            logger.warning(
                "deskgpu guard: %s %s from %s (uid %s): refused: %s",
                method, path, caller.account, caller.uid, refusal.splitlines()[0],
            )  # fmt: skip
            await _refuse(send, 403, refusal)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, replay, send)

    def _reader(self, caller: callers.Caller, settings: GuardSettings) -> callers.Acting:
        """Whom a request without a body (a GET, a websocket) runs as: the account itself."""
        admin = caller.exempt or (
            caller.role == callers.USER
            and settings.admin_group is not None
            and settings.admin_group in caller.groups
        )
        return callers.Acting(caller, caller.account, admin=admin)

    async def _request_read_refusal(
        self, route: str, query: str, reader: callers.Acting
    ) -> str | None:
        """`/api/get`, `/api/stream`: a request's result and output are its owner's."""
        from urllib.parse import parse_qs

        params = parse_qs(query, keep_blank_values=True)
        request_ids = params.get("request_id") or []
        if params.get("log_path"):
            return (
                f"{reader.via} may not stream a server log file; only an admin may (deskgpu guard)"
            )
        if not request_ids:
            return (
                f"{reader.via} must name one of their own requests (request_id): the latest "
                "request on the server may be someone else's (deskgpu guard)"
            )
        if self.request_owners is None:
            return None
        mine = callers.user_id_for(reader.user)
        for request_id in request_ids:
            try:
                owners_ = await self.request_owners(request_id)
            except Exception:  # fail closed
                logger.exception("deskgpu guard: could not look up a request's owner")
                return "the deskgpu guard could not check this request (see the server log)"
            if any(owner != mine for owner in owners_):
                return (
                    f"request {request_id[:40]} is not one of {reader.via}'s: a request's result "
                    "and output are its owner's (deskgpu guard)"
                )
        return None

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A websocket (SkyPilot's SSH proxies) is bound like any request: the connecting
        account must own the cluster it names, or be an admin."""
        try:
            internal = self.is_internal(scope)
        except Exception:
            logger.exception("deskgpu guard: could not tell who is connecting")
            internal = False
        if internal:
            await self.app(scope, receive, send)
            return
        settings = self._settings()
        caller = None
        if not settings.error:
            caller = callers.caller_for_uid(
                self._uid(scope), server_uid=self.server_uid, frontends=settings.frontends
            )
        refusal = settings.error or (
            None if caller is not None else "cannot tell which account is connecting"
        )
        route = route_of(str(scope.get("path") or ""))
        if refusal is None and caller is not None:
            reader = self._reader(caller, settings)
            if route in ADMIN_WEBSOCKETS and not reader.admin:
                refusal = f"{route} is an admin's (deskgpu guard)"
            elif route in CLUSTER_WEBSOCKETS and self.body_rule is not None:
                from urllib.parse import parse_qs

                query = (scope.get("query_string") or b"").decode("latin-1")
                names = parse_qs(query, keep_blank_values=True).get("cluster_name") or []
                for name in names or [""]:
                    try:
                        refusal = self.body_rule(route, {"cluster_name": name}, reader)
                    except Exception:
                        logger.exception("deskgpu guard: the websocket rule failed")
                        refusal = "the deskgpu guard could not check this connection"
                    if refusal:
                        break
        if refusal:
            logger.warning("deskgpu guard: websocket %s refused: %s", route, refusal)
            message = await receive()
            if message.get("type") == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008, "reason": refusal[:120]})
            return
        await self.app(scope, receive, send)

    def _settings(self) -> GuardSettings:
        try:
            return self.settings()
        except Exception:  # a broken loader must fail closed
            logger.exception("deskgpu guard: could not read the host config")
            return GuardSettings(
                error="the deskgpu guard could not read the box's host config, so every "
                "request is refused (see the server log; the admin runs `deskgpu doctor`)"
            )

    def _refusal(
        self, scope: Scope, doc: dict[str, Any], acting: callers.Acting | None
    ) -> str | None:
        """The body rule on the scrubbed, bound request (what SkyPilot will see)."""
        if self.body_rule is None or acting is None:
            return None
        try:
            return self.body_rule(route_of(str(scope.get("path") or "")), doc, acting)
        except Exception:  # a broken rule must fail closed, never let the request through
            logger.exception("deskgpu guard: the request rule failed")
            return "the deskgpu guard could not check this request (see the server log)"

    def _scrubbed(
        self,
        scope: Scope,
        body: bytes,
        uid: int | None = None,
        caller: callers.Caller | None = None,
        settings: GuardSettings | None = None,
    ) -> tuple[bytes, dict[str, Any] | None, callers.Acting | None]:
        """The body SkyPilot gets, the JSON object it holds (None: not an object), and whom
        it runs as (None: not bound)."""
        try:
            doc = json.loads(body)
        except ValueError:
            return body, None, None  # not JSON: SkyPilot cannot parse it into a request either
        if not isinstance(doc, dict):
            return body, None, None
        check_user_ids(doc, "")
        removed = scrub_request_body(doc)
        acting = None
        if caller is not None:
            env = doc.get("env_vars")
            if not isinstance(env, dict):
                env = {} if caller.exempt else doc.setdefault("env_vars", {})
            acting = callers.bind(
                env,
                caller,
                server_uid=self.server_uid,
                admin_group=(settings or GuardSettings()).admin_group,
            )
            if caller.role == callers.FRONTEND:
                env[FRONTEND_ENV] = caller.account
            route = route_of(str(scope.get("path") or ""))
            if (
                route == STATUS
                and not acting.admin
                and doc.get("include_credentials", True) is not False
            ):
                # SkyPilot's /status hands out each cluster's ssh private key when asked
                # (its payload's default): only for the caller's own clusters.
                doc["all_users"] = False
            if not acting.admin and route_of(str(scope.get("path") or "")) == API_CANCEL:
                # SkyPilot scopes a cancel to its caller only when it authenticates them
                # (sky/server/requests/role_filter.py); on the box the guard does.
                doc["user_id"] = callers.user_id_for(acting.user)
        attempt = noteworthy(removed, caller)
        if attempt:
            logger.warning(
                "deskgpu guard: %s %s from %s: removed %s (set by the server, not clients)",
                scope.get("method"),
                scope.get("path"),
                caller.account if caller is not None else (scope.get("client") or ("?",))[0],
                attempt,
            )
        env = doc.get("env_vars")
        if uid is not None and isinstance(env, dict):
            env[PEER_UID_ENV] = str(uid)
        # Always re-serialized: SkyPilot parses exactly what was checked (duplicate keys,
        # odd encodings and the like cannot differ between this parser and its).
        return json.dumps(doc).encode(), doc, acting


# What SkyPilot's own client (and so deskgpu's) forwards from a researcher's shell on every
# request (payloads.request_body_env_vars: every SKYPILOT_* but SKYPILOT_SERVER_*): client
# settings, dropped without a word. Anything else dropped is worth a line in the server log.
ROUTINE_CLIENT_ENV = frozenset(
    {
        "SKYPILOT_API_SERVER_ENDPOINT",
        "SKYPILOT_API_SERVER_LOCAL_PORT",
        "SKYPILOT_DISABLE_LOCAL_API_SERVER",
        "SKYPILOT_DEV",
    }
)


def noteworthy(removed: Scrubbed, caller: callers.Caller | None) -> Scrubbed:
    """What of `removed` the server log should show: not the routine client settings, and
    nothing of a trusted front end's env (its task envs, secrets among them, ride along)."""
    env: tuple[str, ...] = ()
    if caller is None or caller.role != callers.FRONTEND:
        env = tuple(name for name in removed.env if name not in ROUTINE_CLIENT_ENV)
    return Scrubbed(env, removed.config, removed.flags)


API_CANCEL = "/api/cancel"
STATUS = "/status"
# Reads of one API request's result or output, and the listing of all of them: SkyPilot
# scopes them to their owner only for authenticated users (sky/server/requests/role_filter.py).
REQUEST_READS = ("/api/get", "/api/stream")
REQUEST_LISTINGS = ("/api/status",)
# SkyPilot's websockets (sky/server/server.py): SSH into a named cluster, and the PTY of an
# interactive SSH authentication (an admin's: SSH node pools).
CLUSTER_WEBSOCKETS = ("/kubernetes-pod-ssh-proxy", "/slurm-job-ssh-proxy")
ADMIN_WEBSOCKETS = ("/ssh-interactive-auth",)


def _only_own_requests(send: Send, user_id: str) -> Send:
    """Wrap `send` so a JSON list of requests keeps only `user_id`'s (`/api/status`)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def filtered(message: Message) -> None:
        nonlocal start
        if message.get("type") == "http.response.start":
            start = message
            return
        if message.get("type") != "http.response.body" or start is None:
            await send(message)
            return
        chunks.append(message.get("body", b"") or b"")
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        headers = [
            (k, v)
            for k, v in start.get("headers") or []
            if k.lower() not in (b"content-length", b"content-encoding")
        ]
        encoding = dict((k.lower(), v) for k, v in start.get("headers") or []).get(
            b"content-encoding", b""
        )
        try:
            if encoding.strip().lower() == b"gzip":
                import gzip

                body = gzip.decompress(body)
            doc = json.loads(body)
        except (ValueError, OSError, EOFError):
            doc = None
        status = int(start.get("status") or 200)
        if isinstance(doc, list):
            doc = [r for r in doc if isinstance(r, dict) and r.get("user_id") == user_id]
            body = json.dumps(doc).encode()
        elif status < 400:
            # A listing the guard cannot read is not passed on unread (fail closed).
            status = 502
            body = json.dumps(
                {"detail": "the deskgpu guard could not scope this listing to its caller"}
            ).encode()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return filtered


OPEN_PATHS = ("/api/health",)


def _names_user_hash(query: str) -> bool:
    """Whether the query carries `user_hash` however it is spelled (`user%5Fhash` too: the
    server decodes the keys before it reads them)."""
    from urllib.parse import parse_qsl

    return any(key == "user_hash" for key, _ in parse_qsl(query, keep_blank_values=True))


def _bound_query(query: str, account: str) -> str:
    """`query` with every `user_hash` replaced by `account`'s SkyPilot user id."""
    from urllib.parse import parse_qsl, urlencode

    pairs = parse_qsl(query, keep_blank_values=True)
    bound = callers.user_id_for(account)
    return urlencode([(k, bound if k == "user_hash" else v) for k, v in pairs])


async def _refuse(send: Send, status: int, text: str) -> None:
    payload = json.dumps({"detail": text}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
