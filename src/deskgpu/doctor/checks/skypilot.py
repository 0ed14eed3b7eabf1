"""SkyPilot: one shared API server on loopback, with the house rules pinned."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deskgpu.config import HostConfig
from deskgpu.config.doctor import Settings
from deskgpu.doctor.checks.base import (
    FAIL,
    INSTALL,
    OK,
    RENDER,
    SKIP,
    WARN,
    Check,
    _Component,
    _config_file,
    _json,
)
from deskgpu.doctor.facts import (
    FileFact,
    HostFacts,
    ServerProcess,
)
from deskgpu.skypilot.sdk import DEFAULT_ENDPOINT
from deskgpu.skypilot.sdk import resolve_endpoint as resolve_endpoint  # its home is skypilot.sdk
from deskgpu.yamlio import yaml_get

DOC_API_SERVER = (
    "https://docs.skypilot.co/en/latest/reference/api-server/api-server-admin-deploy.html"
)
DOC_KUEUE = "https://kueue.sigs.k8s.io/docs/installation/"

_sky = _Component("skypilot")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")  # noqa: S104 - names, not binds


def _endpoint_port(endpoint: str) -> tuple[str, int]:
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.hostname or "", port


def check_skypilot(facts: HostFacts, config: HostConfig, s: Settings) -> list[Check]:
    sky = facts.sky
    out: list[Check] = []
    if sky.version:
        out.append(_sky("installed", OK, f"skypilot {sky.version}"))
    else:
        out.append(
            _sky(
                "installed",
                FAIL,
                "skypilot is not installed next to deskgpu",
                "reinstall deskgpu with its dependencies (`uv tool install --reinstall deskgpu`)",
            )
        )
    endpoint = sky.endpoint or DEFAULT_ENDPOINT
    out.append(_check_endpoint(facts, config))
    out.append(_check_health(facts, endpoint))
    out.append(_check_shared(facts, config, s, endpoint))
    out.append(_check_infra(facts, config))
    out.append(_check_policy(facts, s))
    out.append(_check_hardening(facts, config, s))
    out.append(_check_kueue(facts, config))
    return out


# How to run the one shared server: the unit `deskgpu setup render` writes, which binds
# 127.0.0.1 (`sky api start --deploy` would bind 0.0.0.0: an unauthenticated server on every
# interface).
SHARED_SERVER = (
    f"the rendered skypilot-api.service (`{RENDER}`, then `{INSTALL}`; it binds 127.0.0.1)"
)


def _check_endpoint(facts: HostFacts, config: HostConfig) -> Check:
    sky = facts.sky
    source = sky.endpoint_source or "default"
    start_shared = (
        f"run ONE shared server as a service, {SHARED_SERVER}, then set "
        f"`api_server: <its URL>` in {_config_file(config)} and export "
        "SKYPILOT_API_SERVER_ENDPOINT in /etc/profile.d/skypilot.sh"
    )
    if source == "default":
        return _sky(
            "endpoint",
            FAIL,
            f"no shared API server configured: each user's SDK would auto-start a private "
            f"server at {DEFAULT_ENDPOINT} that sees only their own jobs",
            start_shared,
        )
    env_endpoint = facts.env.get("SKYPILOT_API_SERVER_ENDPOINT")
    if (
        env_endpoint
        and config.api_server
        and env_endpoint.rstrip("/") != config.api_server.rstrip("/")
    ):
        return _sky(
            "endpoint",
            WARN,
            f"SKYPILOT_API_SERVER_ENDPOINT={env_endpoint} overrides the box's shared server "
            f"{config.api_server}: this user's jobs go elsewhere",
            f"`export SKYPILOT_API_SERVER_ENDPOINT={config.api_server}` (or unset it)",
        )
    return _sky("endpoint", OK, f"{sky.endpoint} ({source})")


def _check_health(facts: HostFacts, endpoint: str) -> Check:
    health = facts.sky.health
    if health is None:
        return _sky("api_server", SKIP, "the API server was not probed")
    if health.status_code != 200 or health.body is None:
        why = health.error or f"HTTP {health.status_code}"
        return _sky(
            "api_server",
            FAIL,
            f"no SkyPilot API server answers at {endpoint}: {why}",
            "start the shared server: `sudo systemctl start skypilot-api`; not installed yet: "
            f"{SHARED_SERVER}; see {DOC_API_SERVER}",
        )
    body = _json(health.body)
    if not isinstance(body, dict):
        return _sky(
            "api_server", FAIL, f"{endpoint}/api/health is not SkyPilot JSON", DOC_API_SERVER
        )
    status = str(body.get("status", "?"))
    version = body.get("version") or "?"
    detail = f"{status}, SkyPilot {version} (API {body.get('api_version', '?')}) at {endpoint}"
    if status != "healthy":
        return _sky(
            "api_server",
            WARN,
            detail,
            "log in (`sky api login`) or check the server's logs (`sky api logs`)",
        )
    client = facts.sky.version
    if client and version != "?" and client != version:
        return _sky(
            "api_server",
            WARN,
            f"{detail}; this host's client is {client}",
            f"install the same SkyPilot on both sides (`pip install skypilot=={version}` in "
            "deskgpu's env, or upgrade the server)",
        )
    return _sky("api_server", OK, detail)


def _is_human(proc: ServerProcess) -> bool:
    """A regular login account (UID_MIN is 1000 on Debian/Ubuntu/Fedora)."""
    return proc.uid is not None and 1000 <= proc.uid < 65534


def _owner(proc: ServerProcess) -> str:
    return proc.user or (f"uid {proc.uid}" if proc.uid is not None else "?")


def _check_shared(facts: HostFacts, config: HostConfig, s: Settings, endpoint: str) -> Check:
    host, port = _endpoint_port(endpoint)
    local = host in _LOCAL_HOSTS or host == (facts.hostname or "\0")
    serving = [p for p in facts.sky.processes if local and p.port == port]
    others = [p for p in facts.sky.processes if p not in serving]
    stray = [p for p in others if _is_human(p)]
    stray_note = ""
    if stray:
        stray_note = "; private servers also run: " + ", ".join(
            f"{_owner(p)} (pid {p.pid}, port {p.port})" for p in stray
        )
    stop_private = (
        "as that user: `sky api stop`, then `export SKYPILOT_API_SERVER_ENDPOINT="
        f"{config.api_server or '<shared URL>'}`; run one shared server as a service account: "
        f"{SHARED_SERVER}"
    )
    if serving:
        proc = serving[0]
        private = (s.api_server_user and proc.user != s.api_server_user) or (
            not s.api_server_user and _is_human(proc) and not proc.deploy
        )
        state = f", state in {proc.home}/.sky/api_server" if proc.home else ""
        if private:
            expected = (
                f" (doctor.api_server_user is {s.api_server_user})" if s.api_server_user else ""
            )
            return _sky(
                "shared_server",
                FAIL,
                f"the server on port {port} is {_owner(proc)}'s private one (pid {proc.pid}"
                f"{', no --deploy' if not proc.deploy else ''}{state}){expected}: other users' "
                "jobs are invisible to it" + stray_note,
                stop_private,
            )
        bind = bind_host(proc.cmdline)
        if bind not in _LOOPBACK:
            return _sky(
                "shared_server",
                FAIL,
                f"the server on port {port} ({_owner(proc)}, pid {proc.pid}) listens on "
                f"{bind}: SkyPilot's API server does not authenticate, so anyone who reaches "
                f"this host on port {port} can act as any user" + stray_note,
                f"stop it and run {SHARED_SERVER}",
            )
        if stray:
            return _sky(
                "shared_server",
                WARN,
                f"{_owner(proc)} serves port {port}" + stray_note,
                stop_private,
            )
        if not proc.deploy:
            return _sky(
                "shared_server",
                WARN,
                f"{_owner(proc)} (pid {proc.pid}) serves port {port} without --deploy: sized "
                "for one user",
                f"stop it (`sky api stop` as {_owner(proc)}) and run {SHARED_SERVER}",
            )
        return _sky(
            "shared_server",
            OK,
            f"{_owner(proc)} (pid {proc.pid}) serves port {port} with --deploy",
        )
    state_dir = facts.sky.private_state_dir
    mine = state_dir is not None and state_dir.exists and (facts.uid or 0) >= 1000
    if stray or mine:
        what = stray_note.lstrip("; ") if stray else ""
        if mine:
            what = ", ".join(
                x
                for x in (what, f"{facts.user} has a private server's state in ~/.sky/api_server")
                if x
            )
        return _sky("shared_server", WARN, what, stop_private)
    if not local:
        return _sky("shared_server", OK, f"remote server {host}:{port}, not a per-user one")
    if facts.sky.health and facts.sky.health.status_code == 200:
        return _sky(
            "shared_server",
            OK,
            f"no server process visible for port {port} (in a container, or hidden without "
            f"root); no private per-user servers seen{_others_note(others)}",
        )
    return _sky("shared_server", SKIP, f"no server runs on port {port}{_others_note(others)}")


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVER_DEFAULT_HOST = "127.0.0.1"  # `python -m sky.server.server`'s --host default


def bind_host(cmdline: str) -> str:
    """The address a `sky.server.server` command line listens on: argparse takes the last
    `--host`, and any prefix of it (`--ho 0.0.0.0`)."""
    host = SERVER_DEFAULT_HOST
    words = cmdline.split()
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if len(flag) > 3 and "--host".startswith(flag):
            if eq:
                host = value
            elif i + 1 < len(words):
                host = words[i + 1]
    return host


def _others_note(others: list[ServerProcess]) -> str:
    """Servers on other ports (tests, experiments): worth a mention, not a verdict."""
    if not others:
        return ""
    shown = ", ".join(f"{_owner(p)} pid {p.pid} port {p.port}" for p in others[:3])
    more = f" (+{len(others) - 3} more)" if len(others) > 3 else ""
    return f"; other API servers on this host: {shown}{more}"


def _check_infra(facts: HostFacts, config: HostConfig) -> Check:
    sky = facts.sky
    wanted = "ssh" if config.infra.startswith("ssh") else "kubernetes"
    if sky.enabled_infra is None:
        if sky.enabled_infra_error:
            return _sky(
                "infra", WARN, f"could not ask the server: {sky.enabled_infra_error}", "`sky check`"
            )
        return _sky("infra", SKIP, "no API server to ask")
    enabled = [x.lower() for x in sky.enabled_infra]
    if any(x.split("/", 1)[0] == wanted for x in enabled):
        return _sky("infra", OK, f"enabled on the server: {', '.join(sky.enabled_infra)}")
    return _sky(
        "infra",
        FAIL,
        f"{wanted} is not enabled on the API server (enabled: "
        f"{', '.join(sky.enabled_infra) or 'nothing'}): jobs cannot reach the box's GPUs",
        f"on the server, as its user: `sky check {wanted}`",
    )


def _admin_policy(fact: FileFact) -> Any:
    return yaml_get(fact.text, ("admin_policy",))


def _check_policy(facts: HostFacts, s: Settings) -> Check:
    configs = facts.sky.server_configs
    readable = [f for f in configs if f.text is not None]
    policies = [(f.path, _admin_policy(f)) for f in readable]
    ours = [(p, v) for p, v in policies if isinstance(v, str) and v.startswith("deskgpu.")]
    if ours:
        return _sky("admin_policy", OK, f"admin_policy: {ours[0][1]} ({ours[0][0]})")
    other = [(p, v) for p, v in policies if v]
    if not s.require_admin_policy:
        seen = f"; {other[0][0]} has admin_policy: {other[0][1]}" if other else ""
        return _sky(
            "admin_policy",
            SKIP,
            f"not required by the host config (doctor.require_admin_policy){seen}",
        )
    where = (
        readable[0].path if readable else s.skypilot_server_config
    ) or "the server's ~/.sky/config.yaml"
    fix = (
        f"add `admin_policy: deskgpu.policy.<Class>` (see docs/house-rules.md) to {where}, then "
        "restart the API server"
    )
    if other:
        return _sky(
            "admin_policy",
            FAIL,
            f"{other[0][0]} has admin_policy: {other[0][1]}, not deskgpu's",
            fix,
        )
    if readable:
        return _sky(
            "admin_policy",
            FAIL,
            f"no admin_policy in {', '.join(f.path for f in readable)}: house rules are not "
            "enforced for plain `sky launch`",
            fix,
        )
    hidden = [f"{f.path} ({f.error})" for f in configs if f.error]
    return _sky(
        "admin_policy",
        WARN,
        "could not read the API server's config"
        + (f": {', '.join(hidden)}" if hidden else " (not found)"),
        "set doctor.skypilot_server_config to its config.yaml, or rerun as root",
    )


GUARD_FIX = (
    f"install the server plugin that `{RENDER}` writes ({{path}}: "
    "`plugins: [{{class: deskgpu.policy.Guard}}]`), then `sudo systemctl restart skypilot-api`"
)


def _check_hardening(facts: HostFacts, config: HostConfig, s: Settings) -> Check:
    """The running server has deskgpu's guard: no request can switch the house rules off."""
    health = facts.sky.health
    guard = facts.sky.guard
    path = s.skypilot_server_config or "/var/lib/skypilot/.sky/config.yaml"
    plugins = str(Path(path).with_name("plugins.yaml"))
    fix = GUARD_FIX.format(path=plugins)
    if health is None or health.status_code != 200 or guard is None:
        return _sky("hardening", SKIP, "the API server did not answer (skypilot.api_server)")
    if guard.status_code == 404:
        if not s.require_admin_policy:
            return _sky(
                "hardening",
                SKIP,
                "the server runs without deskgpu's guard; not required by the host config "
                "(doctor.require_admin_policy)",
            )
        return _sky(
            "hardening",
            FAIL,
            "the server runs without deskgpu's guard: any client can switch the house rules "
            "off (SKYPILOT_CONFIG in its environment, admin_policy in its config) and claim "
            "to be the jobs controller",
            fix,
        )
    body = _json(guard.body) if guard.status_code == 200 and guard.body else None
    if not isinstance(body, dict) or body.get("guard") != "active":
        why = guard.error or f"HTTP {guard.status_code}"
        return _sky("hardening", FAIL, f"the guard did not say it is active ({why})", fix)
    policy = str(body.get("admin_policy") or "")
    enforced = body.get("host_config")
    if not policy.startswith("deskgpu."):
        return _sky(
            "hardening",
            FAIL,
            f"the guard pins admin policy {policy or '(none)'}, not deskgpu's",
            fix,
        )
    broken = body.get("host_config_error")
    if broken:
        return _sky(
            "hardening",
            FAIL,
            f"the guard refuses every request: {broken}",
            f"install the host config: `{RENDER}`, then `{INSTALL}` (an empty file means the "
            "built-in defaults)",
        )
    frontends = body.get("trusted_frontends")
    who = (
        "requests bound to the connecting account"
        if body.get("identity")
        else "requests NOT bound to the connecting account (an older guard)"
    )
    trusted = (
        f"front ends trusted to name a researcher: {', '.join(map(str, frontends))}"
        if isinstance(frontends, list) and frontends
        else "no trusted front ends"
    )
    detail = (
        f"guard active: {policy} whatever a request sends; host config "
        f"{enforced or '(built-in defaults)'}; {who}; {trusted}"
    )
    if not body.get("identity"):
        return _sky(
            "hardening",
            FAIL,
            detail + ": any researcher can submit as another",
            "upgrade deskgpu in the server's venv, then `sudo systemctl restart skypilot-api`",
        )
    skewed = frontend_version_problems(body)
    if skewed:
        return _sky(
            "hardening",
            WARN,
            f"{detail}; {'; '.join(skewed)}",
            "install a SkyPilot client the server accepts in the front end's environment "
            "(docs/transformerlab.md, Versions)",
        )
    unknown = body.get("trusted_frontends_problems")
    if isinstance(unknown, list) and unknown:
        return _sky(
            "hardening",
            WARN,
            f"{detail}; trusted_frontends: {'; '.join(map(str, unknown))}",
            "list only the accounts front ends run as (`getent passwd NAME`)",
        )
    mine = config.source if config.source.startswith("/") else None
    if mine and enforced and str(enforced) != mine:
        return _sky(
            "hardening",
            WARN,
            f"{detail}, but this doctor run read {mine}: the server enforces other rules",
            f"install {mine} as the box's config: `{RENDER} --config {mine}`, then `{INSTALL}`; "
            f"or judge the config it enforces: `deskgpu doctor --config {enforced}`",
        )
    return _sky("hardening", OK, detail)


def frontend_version_problems(status: dict[str, Any]) -> list[str]:
    """A trusted front end whose SkyPilot client speaks an API version outside what the
    running server accepts (its own range, as the guard reads it from SkyPilot)."""
    server = status.get("server_api")
    clients = status.get("frontend_clients")
    if not isinstance(server, dict) or not isinstance(clients, dict):
        return []
    low, high = server.get("min_compatible_api_version"), server.get("api_version")
    problems = []
    for account, seen in sorted(clients.items()):
        raw = seen.get("api_version") if isinstance(seen, dict) else None
        if not (isinstance(raw, str) and raw.isdigit()) or not isinstance(low, int):
            continue
        if int(raw) < low or (isinstance(high, int) and int(raw) > high):
            version = seen.get("version") or "?"
            problems.append(
                f"{account}'s SkyPilot client {version} speaks API version {raw}, outside "
                f"{low}..{high} that this server accepts"
            )
    return problems


def _check_kueue(facts: HostFacts, config: HostConfig) -> Check:
    queue = config.kueue_local_queue
    if not queue:
        return _sky("kueue", SKIP, "kueue_local_queue not set in the host config")
    cmd = facts.command("kube_localqueues")
    if cmd is None:
        return _sky("kueue", SKIP, "Kubernetes not reachable: cannot look for Kueue")
    if not cmd.ok:
        text = (cmd.stderr + cmd.stdout).lower()
        if "doesn't have a resource type" in text or "no matches for kind" in text:
            return _sky(
                "kueue",
                FAIL,
                f"Kueue is not installed (no LocalQueue resource) but the host config uses "
                f"LocalQueue {queue!r}",
                f"install Kueue ({DOC_KUEUE}) and create LocalQueue {queue!r}",
            )
        return _sky("kueue", FAIL, f"cannot list LocalQueues: {cmd.first_error_line()}", DOC_KUEUE)
    doc = _json(cmd.stdout)
    items = doc.get("items", []) if isinstance(doc, dict) else []
    names = [
        f"{(i.get('metadata') or {}).get('namespace', '?')}/{(i.get('metadata') or {}).get('name')}"
        for i in items
    ]
    match = [n for n in names if n.split("/", 1)[1] == queue]
    if match:
        return _sky("kueue", OK, f"LocalQueue {match[0]}")
    return _sky(
        "kueue",
        FAIL,
        f"no LocalQueue named {queue!r} (found: {', '.join(names) or 'none'})",
        f"create LocalQueue {queue!r} in the namespace SkyPilot uses ({DOC_KUEUE})",
    )
