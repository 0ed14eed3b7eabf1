"""The only module that imports `sky`, and only inside functions (it costs seconds).

Every SkyPilot failure leaves here as an `OutsideError` (exit 1) with one clear line;
SkyPilot's own chatter on stdout is sent to stderr so stdout stays the product.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.errors import OutsideError

DEFAULT_ENDPOINT = "http://127.0.0.1:46580"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def prepare_environment(config: HostConfig, environ: dict[str, str] | None = None) -> str:
    """Point the SDK at the box's one shared API server and forbid private auto-started ones.

    An SDK with no endpoint silently starts a per-user server that sees only that user's
    jobs (DESIGN.md); deskgpu would rather fail loudly. Returns the endpoint used.
    """
    env = os.environ if environ is None else environ
    env["SKYPILOT_DISABLE_LOCAL_API_SERVER"] = "1"  # not setdefault: `=0` must not re-enable it
    env.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    if config.api_server and not env.get("SKYPILOT_API_SERVER_ENDPOINT"):
        env["SKYPILOT_API_SERVER_ENDPOINT"] = config.api_server
    return env.get("SKYPILOT_API_SERVER_ENDPOINT") or config.api_server or DEFAULT_ENDPOINT


def import_sky() -> ModuleType:
    try:
        import sky
    except ImportError as exc:  # pragma: no cover - skypilot is a hard dependency
        raise OutsideError(f"SkyPilot is not installed ({exc}); reinstall deskgpu") from None
    return sky


def clean_message(exc: BaseException) -> str:
    """First meaningful line of a SkyPilot error, without colour codes."""
    text = _ANSI.sub("", str(exc)).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def explain(exc: BaseException, endpoint: str) -> OutsideError:
    """Turn any SkyPilot failure into one line a researcher can act on."""
    name = type(exc).__name__
    message = clean_message(exc)
    unreachable = OutsideError(
        f"SkyPilot API server at {endpoint} is unreachable: ask the box's admin to start it "
        "(`systemctl start skypilot-api`), or set api_server in the host config"
    )
    if name in ("ApiServerConnectionError", "ConnectionError", "ConnectTimeout"):
        return unreachable
    if "No SkyPilot API server endpoint is configured" in message:
        # The SDK says this when the endpoint is the default local one and it may not start
        # a private server there: with an endpoint configured, that server is simply down.
        if os.environ.get("SKYPILOT_API_SERVER_ENDPOINT"):
            return unreachable
        return OutsideError(
            "no SkyPilot API server is configured: set `api_server:` in the host config "
            "(/etc/deskgpu/config.yaml, or the file in $DESKGPU_CONFIG / --config) or export "
            "SKYPILOT_API_SERVER_ENDPOINT"
        )
    if name == "NoCloudAccessError":
        return OutsideError(
            "SkyPilot has no infrastructure enabled on the API server at "
            f"{endpoint}: on the box run `sky check kubernetes` (or `deskgpu doctor`)"
        )
    if name == "ApiServerAuthenticationError":
        return OutsideError(f"SkyPilot API server at {endpoint} refused our login: {message}")
    if name == "APIVersionMismatchError":
        return OutsideError(f"SkyPilot client and API server versions differ: {message}")
    if name == "CloudError" and "requests error" in message:
        return OutsideError(
            "SkyPilot could not fetch its accelerator catalog (no network on the API server?): "
            + message[:200]
        )
    if name == "ResourcesUnavailableError":
        return OutsideError(f"SkyPilot found no resources for the job: {message}")
    if name == "UserRequestRejectedByPolicy":
        # Every rule it broke, each on its line: the first line alone names none.
        lines = [ln.rstrip() for ln in _ANSI.sub("", str(exc)).strip().splitlines() if ln.strip()]
        return OutsideError("the API server refused the request: " + "\n".join(lines))
    return OutsideError(f"SkyPilot rejected the request ({name}): {message}")


@contextlib.contextmanager
def _quiet_sdk() -> Iterator[None]:
    """SkyPilot prints progress on stdout; ours carries the product. Keep it for DESKGPU_DEBUG."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            yield
    finally:
        if os.environ.get("DESKGPU_DEBUG") and chatter.getvalue():
            sys.stderr.write(chatter.getvalue())


def validate_task(task: dict[str, Any]) -> Any:
    """Build a `sky.Task` with SkyPilot's own offline validator; raises on a bad task."""
    sky = import_sky()
    return sky.Task.from_yaml_config(copy.deepcopy(task))  # it consumes the dict it is given


@dataclass(frozen=True)
class Submitted:
    """What the API server said about a submission."""

    request_id: str
    cluster_name: str
    managed: bool
    state: str  # "submitted" (accepted, still provisioning/queued) or "done"
    job_id: int | None = None


def submit(
    task_config: dict[str, Any],
    *,
    cluster_name: str,
    managed: bool,
    idle_minutes: int | None,
    config: HostConfig,
    wait_s: float = 30.0,
    user: str | None = None,
) -> Submitted:
    """Hand a task to the shared API server; wait up to `wait_s` for an early verdict.

    `user`: who the task was shaped for; the server is told the same name (SkyPilot takes
    the request's user from `SKYPILOT_USER`, which a stray export would otherwise make
    someone else, and the server's policy would then refuse the job as not theirs).

    The request keeps running on the server after we return (and after the user's SSH
    session ends): managed jobs retry until GPUs free up, and a session's pod waits
    Pending with `provision_timeout: -1`.
    """
    endpoint = prepare_environment(config)
    if user:
        os.environ["SKYPILOT_USER"] = user
    sky = import_sky()
    try:
        with _quiet_sdk():
            task = sky.Task.from_yaml_config(copy.deepcopy(task_config))
            if managed:
                request_id = sky.jobs.launch(task, name=cluster_name)
            else:
                request_id = sky.launch(
                    task,
                    cluster_name=cluster_name,
                    idle_minutes_to_autostop=idle_minutes,
                    down=True,
                )
            return _await_verdict(sky, str(request_id), cluster_name, managed, wait_s)
    except OutsideError:
        raise
    except Exception as exc:
        raise explain(exc, endpoint) from None


def _await_verdict(
    sky: ModuleType, request_id: str, cluster_name: str, managed: bool, wait_s: float
) -> Submitted:
    deadline = time.monotonic() + wait_s
    while True:
        payloads = sky.api_status([request_id])
        status = str(payloads[0].status).upper() if payloads else "PENDING"
        status = status.rsplit(".", 1)[-1]
        if status in _FINAL:
            result = sky.get(request_id)  # raises the server-side error on FAILED
            job_id = _first_job_id(result)
            return Submitted(request_id, cluster_name, managed, "done", job_id)
        if time.monotonic() >= deadline:
            return Submitted(request_id, cluster_name, managed, "submitted")
        time.sleep(0.5)


def _first_job_id(result: Any) -> int | None:
    """`jobs.launch` returns ([job ids], handle); `launch` returns (job id, handle)."""
    if isinstance(result, tuple) and result:
        first = result[0]
        if isinstance(first, list) and first:
            first = first[0]
        if isinstance(first, int):
            return first
    return None


# ---------------------------------------------------------------------------------------------
# deskgpu queue: all users' clusters and managed jobs, mapped to deskgpu's states.
#
# Live responses (pydantic `StatusResponse` / `ManagedJobRecord`) are turned into plain dicts
# by `record_dict` and parsed by `parse_clusters` / `parse_jobs`; tests feed the same parsers
# recorded dicts, so live and recorded take one path.
# ---------------------------------------------------------------------------------------------

# The managed-job fields `queue` shows (SkyPilot's default set lacks user, reason, labels).
QUEUE_JOB_FIELDS = [
    "job_id",
    "task_id",
    "job_name",
    "task_name",
    "resources",
    "submitted_at",
    "start_at",
    "end_at",
    "job_duration",
    "status",
    "schedule_state",
    "details",
    "failure_reason",
    "user_name",
    "accelerators",
    "labels",
    "cluster_name_on_cloud",
]
_HEAVY_FIELDS = {"handle", "credentials", "last_creation_yaml", "user_yaml", "metadata"}
_CONTROLLER_PREFIXES = ("sky-jobs-controller-", "sky-serve-controller-")
# SkyPilot's words for "waiting for GPUs": backoff retries, a Pending pod, Kueue admission.
_WAITING = re.compile(
    r"backoff|waiting for|pending|insufficient|unschedulable|queue admission|no resources",
    re.IGNORECASE,
)
_ACCEL = re.compile(r"([A-Za-z][A-Za-z0-9_.]*(?:-[A-Za-z0-9_.]+)*)\s*['\"]?\s*:\s*(\d+(?:\.\d+)?)")


def fetch_queue(config: HostConfig, timeout_s: float = 30.0) -> Any:
    """All users' clusters and managed jobs as a `SkyView`; never raises.

    Both requests go to the API server at once; a failure of either becomes a note (or
    the view's `error` when nothing came back), so the GPU half still renders.
    """
    from deskgpu.snapshot import SkyView

    endpoint = prepare_environment(config)
    view = SkyView(available=False, endpoint=endpoint)
    try:
        sky = import_sky()
        with _quiet_sdk():
            status_req = sky.status(all_users=True)
            jobs_req = sky.jobs.queue_v2(
                refresh=False, skip_finished=False, all_users=True, fields=QUEUE_JOB_FIELDS
            )
    except Exception as exc:
        view.error = str(exc if isinstance(exc, OutsideError) else explain(exc, endpoint))
        return view
    got_any = False
    try:
        with _quiet_sdk():
            view.clusters = parse_clusters([record_dict(r) for r in sky.get(status_req)])
        got_any = True
    except Exception as exc:
        view.notes.append(f"clusters unavailable: {explain(exc, endpoint)}")
    try:
        with _quiet_sdk():
            result = sky.get(jobs_req)
        records = result[0] if isinstance(result, tuple) else result
        view.jobs = parse_jobs([record_dict(r) for r in records])
        got_any = True
    except Exception as exc:
        if type(exc).__name__ == "ClusterNotUpError":  # no managed job ever launched
            got_any = True
        else:
            view.notes.append(f"managed jobs unavailable: {explain(exc, endpoint)}")
    view.available = got_any
    if not got_any:
        view.error = view.notes[0].split(": ", 1)[1] if view.notes else "no answer"
        view.notes = []
    return view


def record_dict(record: Any) -> dict[str, Any]:
    """A live SkyPilot response object (or an already-plain dict) as a JSON-able dict."""
    if hasattr(record, "model_dump"):
        data = record.model_dump(mode="json", exclude=_HEAVY_FIELDS)
    elif isinstance(record, dict):
        data = {k: v for k, v in record.items() if k not in _HEAVY_FIELDS}
    else:
        data = dict(vars(record))
    return {k: _plain(v) for k, v in data.items()}


def _plain(value: Any) -> Any:
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return value.value  # enums
    return value


def parse_clusters(records: list[dict[str, Any]]) -> list[Any]:
    """`sky status -u` records -> deskgpu `Cluster`s (managed jobs' and controllers' left out)."""
    from deskgpu.labels import LABEL_KIND
    from deskgpu.snapshot import Cluster

    clusters = []
    for rec in records:
        name = str(rec.get("name") or "")
        if not name or rec.get("is_managed") or name.startswith(_CONTROLLER_PREFIXES):
            continue
        labels = {str(k): str(v) for k, v in (rec.get("labels") or {}).items()}
        state, reason = cluster_state(
            _enum_name(rec.get("status")), rec.get("init_kind"), rec.get("init_status_reason")
        )
        autostop = rec.get("autostop")
        clusters.append(
            Cluster(
                name=name,
                user=rec.get("user_name"),
                state=state,
                sky_status=_enum_name(rec.get("status")),
                reason=reason,
                gpus=gpus_text(rec.get("accelerators")) or gpus_text(rec.get("resources_str")),
                launched_at=_float(rec.get("launched_at")),
                autostop_min=int(autostop) if isinstance(autostop, int) and autostop >= 0 else None,
                to_down=bool(rec.get("to_down")),
                interactive=labels.get(LABEL_KIND, "interactive") == "interactive",
                cluster_name_on_cloud=rec.get("cluster_name_on_cloud"),
                labels=labels,
            )
        )
    return clusters


def parse_jobs(records: list[dict[str, Any]]) -> list[Any]:
    """`sky jobs queue -u` records -> deskgpu `Job`s, Queued ones numbered by submission."""
    from deskgpu.snapshot import QUEUED, Job

    jobs: dict[int, Any] = {}
    for rec in records:
        job_id = rec.get("job_id")
        if not isinstance(job_id, int) or job_id in jobs:  # one row per job, first task wins
            continue
        state, reason = job_state(
            _enum_name(rec.get("status")),
            rec.get("schedule_state"),
            rec.get("details"),
            rec.get("failure_reason"),
        )
        jobs[job_id] = Job(
            id=job_id,
            name=rec.get("job_name") or rec.get("task_name"),
            user=rec.get("user_name"),
            state=state,
            sky_status=_enum_name(rec.get("status")),
            reason=reason,
            gpus=gpus_text(rec.get("accelerators")) or gpus_text(rec.get("resources")),
            submitted_at=_float(rec.get("submitted_at")),
            started_at=_float(rec.get("start_at")),
            ended_at=_float(rec.get("end_at")),
            cluster_name_on_cloud=rec.get("cluster_name_on_cloud"),
            labels={str(k): str(v) for k, v in (rec.get("labels") or {}).items()},
        )
    ordered = sorted(jobs.values(), key=lambda j: (j.submitted_at or 0.0, j.id))
    waiting = [j for j in ordered if j.state == QUEUED]
    for position, job in enumerate(waiting, start=1):
        job.queue_position = position
    return ordered


def job_state(
    status: str | None,
    schedule_state: str | None = None,
    details: str | None = None,
    failure_reason: str | None = None,
) -> tuple[str, str | None]:
    """A managed job's SkyPilot status -> (deskgpu state, reason)."""
    from deskgpu import snapshot as s

    status = (status or "").upper()
    schedule = (schedule_state or "").upper()
    if status in ("PENDING", "SUBMITTED"):
        if schedule in ("WAITING", "ALIVE_WAITING", "INACTIVE", ""):
            return s.QUEUED, details or "waiting for the jobs controller to launch it"
        return s.QUEUED, details or "launching"
    if status == "STARTING":
        if schedule == "ALIVE_BACKOFF" or (details and _WAITING.search(details)):
            return s.QUEUED, details or "in backoff, waiting for resources"
        return s.STARTING, details
    if status == "RECOVERING":
        return s.STARTING, details or "recovering after a preemption or failure"
    if status in ("RUNNING", "WINDING_DOWN"):
        return s.RUNNING, details if status == "RUNNING" else "winding down"
    if status == "SUCCEEDED":
        return s.DONE, None
    if status in ("CANCELLED", "CANCELLING"):
        return s.CANCELLED, "cancelling" if status == "CANCELLING" else None
    if status.startswith("FAILED"):
        reason = failure_reason or details or status.replace("_", " ").lower()
        return s.FAILED, reason
    return s.STARTING, f"unknown SkyPilot status {status or '?'}"


def cluster_state(
    status: str | None, init_kind: str | None = None, init_reason: str | None = None
) -> tuple[str, str | None]:
    """A cluster's SkyPilot status -> (deskgpu state, reason).

    INIT is overloaded: a pod Pending for GPUs (`provision_timeout: -1`) is Queued, a
    launch in progress is Starting, an abnormal refresh ("unhealthy") is Failed.
    """
    from deskgpu import snapshot as s

    status = (status or "").upper()
    if status == "UP":
        return s.RUNNING, None
    if status == "STOPPED":
        return s.STOPPED, None
    if status == "INIT":
        if init_kind == "unhealthy":
            return s.FAILED, init_reason or "unhealthy"
        if init_reason and _WAITING.search(init_reason):
            return s.QUEUED, init_reason
        return s.STARTING, init_reason
    return s.STARTING, f"unknown SkyPilot status {status or '?'}"


def gpus_text(value: Any) -> str | None:
    """`{'A6000': 2}`, `"{'A6000': 2}"`, `1x[A6000:2]` -> `A6000:2`."""
    if not value:
        return None
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    else:
        items = [(m.group(1), m.group(2)) for m in _ACCEL.finditer(str(value))]
    shown = []
    for model, count in items:
        if model.upper() in ("CPU", "CPUS", "MEMORY"):
            continue
        number = float(count)
        shown.append(f"{model}:{int(number) if number.is_integer() else number:g}")
    return ",".join(shown) or None


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    value = getattr(value, "value", value)
    return str(value).rsplit(".", 1)[-1].upper()


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# deskgpu reap: a cluster's own job queue, and teardown. Kubernetes cannot stop a cluster, so
# reclaiming a session is `sky down`; its /checkpoints hostPath survives by design.
# ---------------------------------------------------------------------------------------------

_CLUSTER_JOB_RUNNING = {"SETTING_UP", "RUNNING"}
_CLUSTER_JOB_PENDING = {"INIT", "PENDING"}


def count_cluster_jobs(records: list[dict[str, Any]]) -> tuple[int, int]:
    """`sky queue <cluster>` records -> (running, pending)."""
    running = pending = 0
    for rec in records:
        status = _enum_name(rec.get("status")) or ""
        running += status in _CLUSTER_JOB_RUNNING
        pending += status in _CLUSTER_JOB_PENDING
    return running, pending


def cluster_jobs(cluster_name: str, config: HostConfig) -> tuple[int, int]:
    """(running, pending) jobs on a cluster, all users'; raises `OutsideError`."""
    endpoint = prepare_environment(config)
    sky = import_sky()
    try:
        with _quiet_sdk():
            records = sky.get(sky.queue(cluster_name, skip_finished=True, all_users=True))
    except Exception as exc:
        raise OutsideError(
            f"{cluster_name}: job queue unavailable: {explain(exc, endpoint)}"
        ) from None
    return count_cluster_jobs([record_dict(r) for r in records or []])


def down_cluster(cluster_name: str, config: HostConfig) -> None:
    """`sky down <cluster>` and wait for it; any failure is one clean `OutsideError` line."""
    endpoint = prepare_environment(config)
    sky = import_sky()
    try:
        with _quiet_sdk():
            sky.get(sky.down(cluster_name, purge=False, graceful=False))
    except Exception as exc:
        name = type(exc).__name__
        if name == "ClusterDoesNotExist":
            raise OutsideError(
                f"{cluster_name}: already gone (SkyPilot has no such cluster)"
            ) from None
        raise OutsideError(f"{cluster_name}: teardown failed: {explain(exc, endpoint)}") from None
