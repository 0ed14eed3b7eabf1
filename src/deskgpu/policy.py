"""The house rules as a SkyPilot admin policy, for every request reaching the shared API server.

In the API server's config: `admin_policy: deskgpu.policy.HouseRules`. Whoever submits
(`sky launch`, `sky jobs launch`, Transformer Lab, `deskgpu submit`), the request's task
goes through the same `house_rules.apply_house_rules` that `deskgpu submit --dry-run`
prints, then `check_house_rules`; a broken rule rejects the request with the rule's name
and how to comply.

This module runs inside the API server and imports `sky` at the top, which is why nothing
in deskgpu's CLI imports it. It reads the host config per request, so an edited config
applies without a server restart; which file is decided by the server's start-up
environment (`$DESKGPU_CONFIG` when the server started, else `/etc/deskgpu/config.yaml`),
never by a request, and the file must belong to root or the server's account.

`Guard` is the server plugin (`~/.sky/plugins.yaml` of the server's account, written by
`deskgpu setup render`) that makes the policy a boundary: see `deskgpu.hardening`.
"""

from __future__ import annotations

import copy
import getpass
import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import fastapi
import sky
from fastapi.responses import JSONResponse
from sky import exceptions as sky_exceptions
from sky.server import plugins as sky_plugins

from deskgpu import callers, hardening, owners
from deskgpu.config import CONFIG_ENV, SYSTEM_CONFIG, HostConfig, load_config
from deskgpu.errors import DeskgpuError
from deskgpu.house_rules import (
    BATCH,
    INTERACTIVE,
    Violation,
    apply_house_rules,
    check_house_rules,
    cluster_name_violation,
    lifted_config,
    replaced_mount_notes,
    sky_config_violations,
    volume_registration_violation,
)
from deskgpu.labels import LABEL_FRONTEND_JOB, LABEL_USER, LABEL_VIA
from deskgpu.skypilot import guardqueue

# What each SkyPilot request is, for the house rules (sky/server/requests/request_names.py).
_BATCH_REQUESTS = {
    "jobs.launch",
    "jobs.launch_cluster",
    "jobs.pool_apply",
    "serve.up",
    "serve.update",
    "serve.launch_replica",
}
_SESSION_REQUESTS = {"launch"}
_CHECK_ONLY_REQUESTS = {"exec"}  # runs on an existing cluster: its resources are fixed
# SkyPilot's own controllers: not shaped, and only their Kubernetes config is checked (a
# user's pod_config must not ride along on a controller pod).
_PASS_REQUESTS = {"jobs.launch_controller", "serve.launch_controller"}
# Relaunches by SkyPilot's controllers of a task this policy already shaped: the owner is the
# one recorded then, not the controller's account.
_RELAUNCH_REQUESTS = {"jobs.launch_cluster", "serve.launch_replica"}


# Requests whose task's local file sources SkyPilot has already moved to where the client's
# upload landed on the server (sky/server/requests/payloads.py: every `to_kwargs` that calls
# `process_mounts_in_task_on_api_server`). `validate`/`optimize` still carry client paths.
_UPLOADED_SOURCE_REQUESTS = {
    "launch",
    "exec",
    "jobs.launch",
    "jobs.pool_apply",
    "serve.up",
    "serve.update",
}

# What SkyPilot's jobs controller adds to a task it relaunches (sky/jobs/controller.py
# `_add_k8s_annotations`): reserved for the box on a client's request, expected on its own.
CONTROLLER_ANNOTATIONS = ("skypilot-managed-job-id", "skypilot-managed-job-name")


@dataclass(frozen=True)
class Decision:
    """How a request is treated: mutate as `kind`, only check, or leave alone."""

    kind: str | None  # BATCH or INTERACTIVE when the task is shaped
    check: bool = True
    check_cluster_name: bool = False
    relaunch: bool = False  # a controller's own request for a task the policy shaped before


def decide(request_name: str, has_request_options: bool, internal: bool = False) -> Decision:
    """`sky jobs launch` is batch; every `sky launch` cluster is a session (it holds its GPUs
    until torn down, run or no run); `sky exec` is only checked.

    `internal`: the request comes from a SkyPilot controller of this server (told by the guard
    from the connection, never from the request): its validate and relaunch of a job.
    """
    if request_name in _PASS_REQUESTS:
        return Decision(kind=None, check=False)
    if request_name in _RELAUNCH_REQUESTS or (internal and request_name != "exec"):
        return Decision(kind=BATCH, relaunch=True)
    if request_name in _BATCH_REQUESTS:
        return Decision(kind=BATCH)
    if request_name in _SESSION_REQUESTS:
        return Decision(kind=INTERACTIVE, check_cluster_name=True)
    if request_name in _CHECK_ONLY_REQUESTS:
        # `sky exec NAME`: NAME must be the user's own cluster too.
        return Decision(kind=None, check_cluster_name=True)
    # `validate` / `optimize` ahead of a launch carry request options (and its cluster name);
    # ahead of a jobs launch or an exec they carry none.
    if has_request_options:
        return Decision(kind=INTERACTIVE, check_cluster_name=True)
    return Decision(kind=BATCH)


def request_user(
    request_name: str,
    user_name: str | None,
    task_labels: Mapping[str, Any] | None,
    *,
    relaunch: bool = False,
) -> str:
    """Whose request this is: the API server's user, or the recorded owner on a relaunch."""
    recorded = (task_labels or {}).get(LABEL_USER)
    if (relaunch or request_name in _RELAUNCH_REQUESTS) and recorded:
        return str(recorded)
    if user_name:
        return user_name
    if recorded:
        return str(recorded)
    return os.environ.get("SKYPILOT_USER") or getpass.getuser()


def without_controller_annotations(task: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `task` without the annotations SkyPilot's jobs controller adds."""

    def strip(node: Any) -> Any:
        if isinstance(node, Mapping):
            out = {}
            for key, value in node.items():
                if key == "annotations" and isinstance(value, Mapping):
                    value = {k: v for k, v in value.items() if k not in CONTROLLER_ANNOTATIONS}
                out[key] = strip(value)
            return out
        if isinstance(node, list):
            return [strip(x) for x in node]
        return copy.deepcopy(node)

    stripped: dict[str, Any] = strip(task)
    return stripped


def _local_sources(task: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, path) for the task's workdir and file mounts that are server paths, not URLs."""
    found: list[tuple[str, str]] = []
    workdir = task.get("workdir")
    if isinstance(workdir, str):
        found.append(("workdir", workdir))
    for dst, src in (task.get("file_mounts") or {}).items():
        sources = src.get("source") if isinstance(src, Mapping) else src
        for one in sources if isinstance(sources, list) else [sources]:
            if isinstance(one, str):
                found.append((f"file_mounts {dst}", one))
    service = task.get("service")
    tls = service.get("tls") if isinstance(service, Mapping) else None
    if isinstance(tls, Mapping):
        for key in ("keyfile", "certfile"):
            if isinstance(tls.get(key), str):
                found.append((f"service.tls.{key}", tls[key]))
    return [(w, path) for w, path in found if "://" not in path]


def file_source_violations(
    task: Mapping[str, Any], upload_root: Path | None, peer_uid: int | None
) -> list[Violation]:
    """A job may copy in only what its submitter could: the client's own upload on the server
    (`upload_root`; SkyPilot 0.14 joins the client's `file_mounts_mapping` onto it without
    refusing `..`), or, from a client on this host (SkyPilot then reads the path itself, as
    the server's account), a path the connecting uid (`peer_uid`, told by the guard) can read;
    never what only the server's account can (its kubeconfig, its databases)."""
    found = []
    for where, path in _local_sources(task):
        real = os.path.realpath(Path(path).expanduser())
        inside = upload_root is not None and (
            real == str(upload_root) or real.startswith(str(upload_root) + os.sep)
        )
        if not inside and not (peer_uid is not None and hardening.readable_by(peer_uid, real)):
            found.append(
                Violation(
                    "file_mount_source",
                    f"{where} reads {path} on the API server, which its submitter cannot "
                    "read: a job may only copy in files its submitter could",
                    "use a path you can read (or a bucket URL)",
                )
            )
    return found


def _frontend() -> str | None:
    """The trusted front end the guard says sent this request (never a client; and only
    where the guard runs: without it, `DESKGPU_*` in a request's env would be the client's)."""
    value = os.environ.get(hardening.FRONTEND_ENV, "")
    return value if value and GUARD.active else None


def _peer_uid() -> int | None:
    """The connecting uid the guard put into this request's environment (never a client)."""
    value = os.environ.get(hardening.PEER_UID_ENV, "")
    return int(value) if value.isdigit() else None


def upload_root(user_id: str | None) -> Path | None:
    """Where the server keeps `user_id`'s uploaded files (sky/server/common.py)."""
    if not user_id or not hardening.USER_ID.fullmatch(user_id):
        return None
    from sky.server import common as server_common

    base = Path(os.path.realpath(server_common.API_SERVER_CLIENT_DIR.expanduser()))
    return base / user_id / "file_mounts"


def shape_task_config(
    task_config: Mapping[str, Any],
    config: HostConfig,
    *,
    request_name: str,
    user: str,
    cluster_name: str | None = None,
    has_request_options: bool = False,
    volume_host_paths: Mapping[str, str | None] | None = None,
    internal: bool = False,
    in_job_group: bool = False,
    frontend: str | None = None,
) -> tuple[dict[str, Any], list[Violation]]:
    """The policy without SkyPilot objects: a task dict in, the shaped dict and violations out.

    `frontend`: the trusted front end that sent the request for `user` (told by the guard):
    its cluster names are its own (unique by its job ids, and it finds its clusters by
    them), and the task is labelled with it and its job id.
    """
    decision = decide(request_name, has_request_options, internal)
    shaped = dict(task_config)
    if decision.kind is not None:
        if not shaped.get("name") and cluster_name:
            shaped["name"] = cluster_name
        # A controller relaunches what the first pass shaped: its name stays (a job group's
        # `server` and `client` are addresses; a prefixed name is prefixed already).
        keep = in_job_group or decision.relaunch
        shaped = apply_house_rules(shaped, config, user, decision.kind, keep_name=keep)
        if not decision.relaunch:
            mark_frontend(shaped, frontend)
    found: list[Violation] = []
    if decision.check:
        judged = without_controller_annotations(shaped) if decision.relaunch else shaped
        found = check_house_rules(judged, config, user, volume_host_paths=volume_host_paths)
    else:
        found = sky_config_violations(lifted_config(shaped), config, user, where="config")
    if decision.check_cluster_name and not frontend:
        bad = cluster_name_violation(cluster_name, user)
        if bad:
            found.insert(0, bad)
    return shaped, found


# The task env in which a front end carries its own job id (Transformer Lab: `_TFL_JOB_ID`,
# seen in shared/recordings/transformerlab).
FRONTEND_JOB_ENVS = ("_TFL_JOB_ID",)
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def mark_frontend(task: dict[str, Any], frontend: str | None) -> None:
    """Label `task` (in place) with the front end that sent it and its job id; a task that
    did not come from one loses any such labels its sender wrote."""
    ours = (LABEL_VIA, LABEL_FRONTEND_JOB)
    res = task.get("resources")
    parts = [res] if isinstance(res, dict) else []
    if isinstance(res, dict):
        parts += [
            c for key in ("any_of", "ordered") for c in res.get(key) or [] if isinstance(c, dict)
        ]
    for part in parts:
        if isinstance(part.get("labels"), dict):
            for key in ours:
                part["labels"].pop(key, None)
    if not frontend or not isinstance(res, dict):
        return
    marks = {LABEL_VIA: frontend}
    given = [task.get(k) for k in ("envs", "secrets")]
    sources: list[Mapping[str, Any]] = [g for g in given if isinstance(g, Mapping)]
    for key in FRONTEND_JOB_ENVS:
        value = str(next((src[key] for src in sources if src.get(key)), ""))
        if _LABEL_VALUE.match(value):
            marks[LABEL_FRONTEND_JOB] = value
            break
    for part in parts:
        if part is res or "labels" in part:
            part["labels"] = {**(part.get("labels") or {}), **marks}


def rejection_text(violations: list[Violation], config: HostConfig) -> str:
    lines = [f"rejected by the house rules of {config.box_name}:"]
    lines += [f"  - {v}" for v in violations]
    lines.append("  (see `deskgpu submit --dry-run` for a job shaped to fit; rules come from ")
    lines[-1] += f"{config.source})"
    return "\n".join(lines)


def _labels(task_config: Mapping[str, Any]) -> dict[str, Any]:
    res = task_config.get("resources") or {}
    labels = dict(res.get("labels") or {})
    for key in ("any_of", "ordered"):
        for cand in res.get(key) or []:
            labels.update((cand or {}).get("labels") or {})
    return labels


def _volume_host_paths(task_config: Mapping[str, Any]) -> dict[str, str | None]:
    """Host paths of the registered volumes the task names (server-side state)."""
    names: set[str] = set()
    for vol in (task_config.get("volumes") or {}).values():
        name = vol if isinstance(vol, str) else (vol or {}).get("name")
        if name:
            names.add(str(name))
    if not names:
        return {}
    found: dict[str, str | None] = {}
    try:
        from sky import global_user_state
    except ImportError:  # pragma: no cover - part of every SkyPilot install
        return found
    for name in names:
        try:
            record = global_user_state.get_volume_by_name(name)
        except Exception:  # noqa: S112 - an unknown volume is SkyPilot's to report, after us
            continue
        handle = (record or {}).get("handle")
        vtype = str(getattr(handle, "type", "") or "")
        cfg = getattr(handle, "config", None) or {}
        found[name] = str(cfg.get("host_path")) if "hostpath" in vtype and cfg else None
    return found


def enclosing_job_group() -> Any | None:
    """The job group SkyPilot is applying the policy to, if the task is one of its jobs.

    `admin_policy_utils.apply` hands the policy one task at a time; a job group's header (its
    name, `primary_tasks`) stays on the Dag it copies to the mutated one, and its jobs reach
    each other as `<task>-<i>.<group>` (sky/jobs/job_group_networking.py): a renamed task
    breaks both. The Dag is `apply`'s own local (SkyPilot 0.14, sky/utils/admin_policy_utils.py);
    tests/test_policy_portable.py runs the real `apply` on a real job group to hold this.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_FRAMES_TO_APPLY):
        if frame is None:
            return None
        if (
            frame.f_code.co_name == "apply"
            and frame.f_globals.get("__name__") == "sky.utils.admin_policy_utils"
        ):
            dag = frame.f_locals.get("dag")
            is_group = getattr(dag, "is_job_group", None)
            return dag if callable(is_group) and is_group() else None
        frame = frame.f_back
    return None


_FRAMES_TO_APPLY = 12  # apply -> policy.apply -> validate_and_mutate -> mutate -> here


VOLUME_APPLY_PATH = "/volumes/apply"  # sky/volumes/server/server.py volume_apply


def volume_apply_refusal(
    path: str, body: Mapping[str, Any], acting: callers.Acting | None = None
) -> str | None:
    """Why the guard refuses a client's `sky volumes apply` (None: it may go on)."""
    if hardening.route_of(path) != VOLUME_APPLY_PATH:
        return None
    config = load_server_config()
    env = body.get("env_vars")
    claimed = (env if isinstance(env, Mapping) else {}).get("SKYPILOT_USER")
    user = acting.user if acting is not None else str(claimed or "this user")
    cfg = body.get("config")
    bad = volume_registration_violation(
        str(body.get("volume_type") or ""),
        str(body.get("name") or "?"),
        cfg if isinstance(cfg, Mapping) else None,
        config,
        user,
    )
    return rejection_text([bad], config) if bad else None


def _logger() -> Any:
    """The API server's own log (`sky api logs`), where SkyPilot's policy machinery logs."""
    from sky import sky_logging

    return sky_logging.init_logger("deskgpu.policy")


def _reject(text: str) -> Exception:
    return sky_exceptions.UserRequestRejectedByPolicy(text)


def mutate(user_request: Any, config: HostConfig, *, internal: bool | None = None) -> Any:
    """`validate_and_mutate` with the host config given (tests pass their own).

    `internal` defaults to what the guard found out about the connection (`hardening`).
    """
    name = getattr(user_request.request_name, "value", str(user_request.request_name))
    options = user_request.request_options
    if internal is None:
        # A SkyPilot controller process applies the policy to its own relaunches before it
        # sends them (client side); over HTTP the guard tells the server who is connecting.
        internal = GUARD.in_controller or hardening.INTERNAL_REQUEST.get()
    decision = decide(name, options is not None, internal)
    task = user_request.task
    original = task.to_yaml_config()
    labels = _labels(original)
    if decision.relaunch:
        if not GUARD.active:
            # Without the guard the controller flag is whatever a client sent.
            raise _reject(
                f"rejected by the house rules of {config.box_name}: this API server runs "
                "without deskgpu's guard, so a controller's relaunch cannot be told from a "
                "client's (ask the admin to install the server plugin from "
                "`deskgpu setup render` and run `deskgpu doctor`)"
            )
        if not labels.get(LABEL_USER):
            raise _reject(
                f"rejected by the house rules of {config.box_name}: a controller relaunch of "
                "a task without an owner label, which the house rules never shaped"
            )
    user = request_user(
        name,
        getattr(user_request.user, "name", None) if user_request.user else None,
        labels,
        relaunch=decision.relaunch,
    )
    shaped, violations = shape_task_config(
        original,
        config,
        request_name=name,
        user=user,
        cluster_name=getattr(options, "cluster_name", None) if options else None,
        has_request_options=options is not None,
        volume_host_paths=_volume_host_paths(original),
        internal=internal,
        in_job_group=enclosing_job_group() is not None,
        frontend=_frontend(),
    )
    if name in _UPLOADED_SOURCE_REQUESTS and not decision.relaunch:
        user_id = getattr(user_request.user, "id", None) if user_request.user else None
        violations = (
            file_source_violations(original, upload_root(user_id), _peer_uid()) + violations
        )
    # The request's SkyPilot config: the server's merged with the client's `~/.sky/config.yaml`
    # / `--config`, whose `kubernetes.pod_config` SkyPilot folds into every pod it creates.
    request_config = dict(user_request.skypilot_config or {})
    if decision.relaunch:
        request_config = without_controller_annotations(request_config)
    violations += sky_config_violations(request_config, config, user, where="SkyPilot config")
    if violations:
        raise _reject(rejection_text(violations, config))
    if decision.kind is None:
        return sky.MutatedUserRequest(task=task, skypilot_config=user_request.skypilot_config)
    for note in replaced_mount_notes(shaped, config):
        _logger().info("deskgpu house rules, %s: %s", shaped.get("name"), note)
    new_task = sky.Task.from_yaml_config(copy.deepcopy(shaped))
    # Not serialized by to_yaml_config; restored the way SkyPilot's RESTful policy does.
    new_task.managed_job_dag = task.managed_job_dag
    new_task.service_name = task.service_name
    return sky.MutatedUserRequest(task=new_task, skypilot_config=user_request.skypilot_config)


def looked_for(environ: Mapping[str, str]) -> Path:
    """The host config a server started with `environ` enforces: `$DESKGPU_CONFIG`, else
    /etc/deskgpu/config.yaml. Unlike the CLI, a server never falls back to built-in
    defaults when the file is missing: it refuses every request (`load_server_config`)."""
    value = environ.get(CONFIG_ENV)
    return Path(value) if value else SYSTEM_CONFIG


def server_config_path() -> Path:
    """The host config file this server enforces.

    Decided by the server's start-up environment (the guard's capture, else SkyPilot's clean
    snapshot of it), never by what a request put into `os.environ`.
    """
    if GUARD.active and GUARD.config_path is not None:
        return GUARD.config_path
    startup: Mapping[str, str] | None = None
    try:
        from sky.server import clean_env

        startup = clean_env.get_clean_server_env()
    except ImportError:  # pragma: no cover - part of every SkyPilot 0.14 install
        startup = None
    return looked_for(dict(startup if startup is not None else os.environ))


def untrusted_config_reason(path: Path | None) -> str | None:
    """Why the server must not take its rules from `path` (another user could write it)."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None  # missing or unreadable: load_config says so, located
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} belongs to uid {st.st_uid}, not root or the server's account"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def missing_config_text(path: Path) -> str:
    return (
        f"the box's deskgpu host config {path} is missing, so no request can be checked and "
        f"every request is refused: install it (`deskgpu setup render` writes it, its "
        "install.sh installs it; an empty file means the built-in defaults), then run "
        "`deskgpu doctor`"
    )


def load_server_config() -> HostConfig:
    path = server_config_path()
    if not path.exists():
        raise _reject(missing_config_text(path))
    reason = untrusted_config_reason(path)
    if reason:
        raise _reject(
            "the box's deskgpu host config is not trusted, so no request can be checked: "
            f"{reason} (ask the admin to run `deskgpu doctor`)"
        )
    try:
        return load_config(path, environ={})
    except DeskgpuError as exc:
        raise _reject(
            "the box's deskgpu host config is broken, so no request can be checked: "
            + "; ".join(exc.lines())
            + " (ask the admin to run `deskgpu doctor`)"
        ) from None


class HouseRules(sky.AdminPolicy):
    """deskgpu's house rules for every SkyPilot request on the box."""

    @classmethod
    def validate_and_mutate(cls, user_request: Any) -> Any:
        return mutate(user_request, load_server_config())


class _GuardState:
    """What the guard captured in this process when the server started."""

    def __init__(self) -> None:
        self.active = False
        self.in_controller = False  # this process is a jobs/serve controller of the server
        self.admin_policy = POLICY_CLASS
        self.config_path: Path | None = None
        self.cached: tuple[tuple[int, int, int, int], hardening.GuardSettings] | None = None
        self.frontend_clients: dict[str, dict[str, str | None]] = {}


POLICY_CLASS = f"{__name__}.HouseRules"
GUARD = _GuardState()
GUARD_ROUTE = "/plugins/api/deskgpu/guard"


class Guard(sky_plugins.BasePlugin):
    """The server plugin that keeps clients from changing what the server enforces.

    In every server process (main, HTTP workers, request executors, controllers):
    - the admin policy is the one named here, whatever config a request swapped in
      (`SKYPILOT_CONFIG` in its env, `admin_policy` in its client config);
    - the host config is the one the server started with.
    In the HTTP workers, `hardening.GuardMiddleware` scrubs each client request body and
    tells SkyPilot's controllers from clients, `GET /plugins/api/deskgpu/guard` says
    what is enforced (what `deskgpu doctor` checks), and `GET /plugins/api/deskgpu/queue`
    answers the queue's SkyPilot half from the server's own state (`read_queue`).
    """

    def __init__(self, admin_policy: str = POLICY_CLASS) -> None:
        self.admin_policy = admin_policy

    @property
    def name(self) -> str:
        return "deskgpu-guard"

    @property
    def hidden_from_display(self) -> bool:
        return True

    def install(self, extension_context: Any) -> None:
        if not GUARD.active:
            GUARD.config_path = looked_for(dict(os.environ))
            GUARD.admin_policy = self.admin_policy
            _pin_admin_policy(self.admin_policy)
            GUARD.active = True
        context = getattr(extension_context, "context", None)
        if context == sky_plugins.PluginContext.CONTROLLER:
            GUARD.in_controller = True
        app = getattr(extension_context, "app", None)
        if app is not None and not getattr(app.state, "deskgpu_guard", False):
            app.state.deskgpu_guard = True
            app.add_middleware(
                hardening.GuardMiddleware,
                body_rule=guard_body_rule,
                settings=guard_settings,
                open_paths=(GUARD_ROUTE,),
                frontend_seen=note_frontend_client,
                request_owners=request_owners,
            )
            app.add_api_route(GUARD_ROUTE, guard_status, methods=["GET"])
            app.add_api_route(guardqueue.ROUTE, queue_endpoint, methods=["GET"])


def guard_settings() -> hardening.GuardSettings:
    """What the guard needs from the host config this server enforces, re-read when the file
    changes; a missing, untrusted or broken file is an error that refuses every request."""
    path = server_config_path()
    try:
        st = path.stat()
    except OSError:
        GUARD.cached = None
        return hardening.GuardSettings(error=missing_config_text(path) + " (deskgpu guard)")
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    if GUARD.cached is not None and GUARD.cached[0] == key:
        return GUARD.cached[1]
    try:
        config = load_server_config()
    except sky_exceptions.UserRequestRejectedByPolicy as exc:
        settings = hardening.GuardSettings(error=f"{exc} (deskgpu guard)")
    else:
        settings = hardening.GuardSettings(
            frontends=config.trusted_frontends,
            admin_group=config.admin_group,
            shared_logs=config.shared_logs,
        )
    GUARD.cached = (key, settings)
    return settings


def _cluster_record(name: str) -> owners.Found | None:
    from sky import global_user_state

    record = global_user_state.get_cluster_from_name(name, summary_response=True)
    if record is None:
        return None
    return owners.Found(owner=record.get("user_name") or None)


def _job_record(job_id: int) -> owners.Found | None:
    from sky import global_user_state
    from sky.jobs import state as jobs_state

    row = jobs_state.get_job_info_row(job_id)
    if row is None:
        return None
    user = global_user_state.get_user(row.user_hash) if row.user_hash else None
    return owners.Found(owner=(user.name if user is not None else None) or None)


def _jobs_named(name: str) -> list[int]:
    from sky.jobs import state as jobs_state

    return list(jobs_state.get_all_job_ids_by_name(name))


def _volume_record(name: str) -> owners.Found | None:
    from sky import global_user_state

    record = global_user_state.get_volume_by_name(name)
    if record is None:
        return None
    user_hash = record.get("user_hash")
    user = global_user_state.get_user(user_hash) if user_hash else None
    return owners.Found(owner=(user.name if user is not None else None) or None)


SKY_LOOKUPS = owners.Lookups(
    cluster=_cluster_record, job=_job_record, jobs_named=_jobs_named, volume=_volume_record
)


async def request_owners(request_id: str) -> list[str]:
    """The user ids of the API requests `request_id` names as a prefix (as `/api/get` and
    `/api/stream` expand it: sky/server/server.py `get_expanded_request_id`)."""
    from sky.server.requests import requests as requests_lib

    found = await requests_lib.get_requests_async_with_prefix(
        request_id, fields=["request_id", "user_id"]
    )
    return [str(task.user_id) for task in found or []]


def guard_body_rule(path: str, body: Mapping[str, Any], acting: callers.Acting) -> str | None:
    """What the guard refuses that SkyPilot never hands the admin policy: a volume
    registration outside the house rules, and acting on someone else's cluster or job."""
    refused = volume_apply_refusal(path, body, acting)
    if refused:
        return refused
    settings = guard_settings()
    return owners.refusal(
        path,
        body,
        acting,
        SKY_LOOKUPS,
        shared_logs=settings.shared_logs,
        admin_group=settings.admin_group,
    )


def _frontends_file() -> Path:
    """Where the server's processes share the client versions front ends were seen with."""
    return Path("~/.sky").expanduser() / "deskgpu-frontends.json"


def _seen_frontends() -> dict[str, Any]:
    import json

    try:
        doc = json.loads(_frontends_file().read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def note_frontend_client(account: str, api_version: str | None, version: str | None) -> None:
    """Remember the SkyPilot client a trusted front end speaks (written when it changes)."""
    import json
    import time

    seen = {"api_version": api_version, "version": version}
    if GUARD.frontend_clients.get(account) == seen:
        return
    GUARD.frontend_clients[account] = seen
    doc = _seen_frontends()
    doc[account] = {**seen, "seen_at": time.time()}
    path = _frontends_file()
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(doc, sort_keys=True))
    temp.replace(path)


def _server_api_range() -> dict[str, Any]:
    """SkyPilot's own compatibility range (sky/server/constants.py; sky/server/versions.py
    refuses a client below MIN_COMPATIBLE_API_VERSION)."""
    from sky.server import constants as server_constants

    return {
        "api_version": int(server_constants.API_VERSION),
        "min_compatible_api_version": int(server_constants.MIN_COMPATIBLE_API_VERSION),
    }


def guard_status() -> dict[str, Any]:
    settings = guard_settings() if GUARD.active else hardening.GuardSettings()
    return {
        "guard": "active" if GUARD.active else "inactive",
        "admin_policy": GUARD.admin_policy,
        "host_config": str(GUARD.config_path) if GUARD.config_path else None,
        "host_config_error": settings.error,
        "identity": "bound to the connecting Unix account",
        "trusted_frontends": list(settings.frontends),
        "trusted_frontends_problems": callers.frontends_problems(settings.frontends),
        "shared_logs": settings.shared_logs,
        "frontend_clients": {k: v for k, v in _seen_frontends().items() if k in settings.frontends},
        "server_api": _server_api_range(),
        "request_env_allowed": sorted(hardening.ALLOWED_REQUEST_ENV),
    }


async def queue_endpoint(request: fastapi.Request) -> JSONResponse:
    """`GET /plugins/api/deskgpu/queue`: the queue's SkyPilot half for the connecting account
    (skypilot/guardqueue.py says what it holds and what it never does)."""
    acting = request.scope.get(hardening.ACTING_KEY)
    if not isinstance(acting, callers.Acting):  # a controller's connection: it never asks
        detail = "the deskgpu guard answers the queue only to an account it has bound"
        return JSONResponse({"detail": detail}, status_code=403)
    # Root and the server's account, the box's administrators (reap and observe run as
    # root), read every workspace; everyone else what SkyPilot lets their account read.
    everything = acting.caller.exempt
    status, doc = await guardqueue.serve(lambda: read_queue(acting.user, everything), acting.user)
    return JSONResponse(doc, status_code=status)


def read_queue(
    user: str, every_workspace: bool = False, max_records: int = guardqueue.MAX_RECORDS
) -> guardqueue.Read:
    """Every cluster and managed job `user` may list, read from SkyPilot's own state as the
    stock `/status` (without credentials) and `/jobs/queue/v2` (`all_users`) read it, minus
    the jobs controller's program: in consolidation mode its database is this server's.
    `every_workspace`: no workspace is hidden (an administrator's read)."""
    from sky import global_user_state
    from sky.jobs import utils as managed_job_utils
    from sky.schemas.api import responses
    from sky.utils import message_utils

    if not managed_job_utils.is_consolidation_mode():
        raise guardqueue.Unavailable(
            501,
            "the managed jobs live with a jobs controller of their own (not consolidation "
            "mode): ask SkyPilot (/jobs/queue/v2)",
        )
    workspaces = None if every_workspace else readable_workspaces(callers.user_id_for(user))
    clusters = [
        _queue_cluster(record)
        for record in global_user_state.get_clusters(
            exclude_managed_clusters=True, workspaces_filter=workspaces, summary_response=True
        )
    ]
    # What the controller's program runs (sky/jobs/utils.py ManagedJobCodeGen.get_job_table),
    # its answer through the same JSON payload, then what the server adds to it
    # (load_managed_job_queue: the owner's name; queue_v2_api: only the fields asked for).
    queue = managed_job_utils.get_managed_job_queue(
        skip_finished=False,
        accessible_workspaces=None if workspaces is None else sorted(workspaces),
        fields=list(guardqueue.JOB_FIELDS),
        page=1,
        limit=max_records,
    )
    queue = message_utils.decode_payload(message_utils.encode_payload(queue))
    names = {u.id: u.name for u in global_user_state.get_all_users()}
    keep = set(guardqueue.JOB_FIELDS) | {"job_id", "task_id", "status"}
    jobs = []
    for job in queue["jobs"]:
        if job.get("user_hash") is not None:
            job["user_name"] = names.get(job["user_hash"])
        record = responses.ManagedJobRecord(**{k: v for k, v in job.items() if k in keep})
        dumped = record.model_dump(by_alias=True, exclude_unset=True, mode="json")
        jobs.append(dumped)
    return guardqueue.Read(
        clusters=clusters,
        clusters_total=len(clusters),
        jobs=jobs,
        jobs_total=int(queue["total"]),
    )


def readable_workspaces(user_id: str) -> set[str]:
    """The workspaces whose clusters and jobs SkyPilot lists to `user_id` (`action='read'`,
    as backend_utils.get_clusters and jobs queue_v2 ask it for the request's user)."""
    from sky import skypilot_config
    from sky.skylet import constants
    from sky.users import permission
    from sky.workspaces import constants as workspace_constants

    configured = skypilot_config.get_nested(("workspaces",), default_value={}) or {}
    names = {str(name) for name in configured} | {constants.SKYPILOT_DEFAULT_WORKSPACE}
    readable = permission.permission_service.get_accessible_workspace_names(
        user_id, names, action=workspace_constants.WORKSPACE_ACTION_READ
    )
    return set(readable)


def _queue_cluster(record: Mapping[str, Any]) -> dict[str, Any]:
    """A `global_user_state.get_clusters` record as `/status` (refresh NONE) shapes the
    fields the queue reads (sky/backends/backend_utils.py get_clusters)."""
    from sky.utils import resources_utils

    handle = record.get("handle")
    launched = getattr(handle, "launched_resources", None)
    status = record.get("status")
    out: dict[str, Any] = {
        "name": record.get("name"),
        "user_name": record.get("user_name"),
        "status": getattr(status, "value", status),
        "init_kind": record.get("init_kind"),
        "init_status_reason": record.get("init_status_reason"),
        "autostop": record.get("autostop"),
        "to_down": record.get("to_down"),
        "launched_at": record.get("launched_at"),
        "is_managed": record.get("is_managed"),
        "labels": {},
    }
    if handle is not None:
        out["cluster_name_on_cloud"] = getattr(handle, "cluster_name_on_cloud", None)
        out["resources_str"] = resources_utils.get_readable_resources_repr(
            handle, simplified_only=True
        )[0]
    if launched is not None:
        out["accelerators"] = f"{launched.accelerators}" if launched.accelerators else None
        out["labels"] = dict(launched.labels) if launched.labels else {}
    return out


def _pin_admin_policy(location: str) -> None:
    """Whatever `admin_policy` the loaded config names, apply `location` on this server."""
    from sky.utils import admin_policy_utils

    original = admin_policy_utils._get_policy_impl
    if getattr(original, "deskgpu_pinned", False):
        return

    def pinned(policy_location: str | None) -> Any:
        del policy_location  # a request may have swapped the loaded config: not its choice
        return original(location)

    pinned.deskgpu_pinned = True  # type: ignore[attr-defined]
    admin_policy_utils._get_policy_impl = pinned
