"""The client side's only module that imports `sky`, and only inside functions (it costs
seconds); the server side's is `policy.py` (import contract in pyproject.toml). The queue's
reads (`fetch_queue`) take plain HTTP through `skypilot.http` and import nothing of SkyPilot.

Every SkyPilot failure leaves here as an `OutsideError` (exit 1) with one clear line;
SkyPilot's own chatter on stdout is sent to stderr so stdout stays the product.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.deadline import Deadline, DeadlineExpired, bounded
from deskgpu.errors import OutsideError
from deskgpu.skypilot import guardqueue
from deskgpu.skypilot import http as skyhttp

DEFAULT_ENDPOINT = "http://127.0.0.1:46580"
# Terminal escape sequences (colours, bold, cursor moves) in SkyPilot's text.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def prepare_environment(config: HostConfig, environ: dict[str, str] | None = None) -> str:
    """Point the SDK at the box's one shared API server and forbid private auto-started ones.

    An SDK with no endpoint silently starts a per-user server that sees only that user's
    jobs (DESIGN.md); deskgpu would rather fail loudly. Returns the endpoint used; raises
    `OutsideError` when none is configured anywhere (what the SDK would say, at once).
    """
    env = os.environ if environ is None else environ
    env["SKYPILOT_DISABLE_LOCAL_API_SERVER"] = "1"  # not setdefault: `=0` must not re-enable it
    env.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    if config.api_server and not env.get("SKYPILOT_API_SERVER_ENDPOINT"):
        env["SKYPILOT_API_SERVER_ENDPOINT"] = config.api_server
    endpoint, source = resolve_endpoint(dict(env), config, _client_config_text(env))
    if source == "default":
        raise OutsideError(_NOT_CONFIGURED)
    return endpoint


def resolve_endpoint(
    env: dict[str, str], config: HostConfig, client_config_text: str | None
) -> tuple[str, str]:
    """The API server endpoint a deskgpu/SkyPilot client on this host talks to, and why."""
    if env.get("SKYPILOT_API_SERVER_ENDPOINT"):
        return env["SKYPILOT_API_SERVER_ENDPOINT"], "env SKYPILOT_API_SERVER_ENDPOINT"
    if config.api_server:
        return config.api_server, "host config api_server"
    from deskgpu.yamlio import yaml_get  # PyYAML only when there is a client config to read

    endpoint = yaml_get(client_config_text, ("api_server", "endpoint"))
    if isinstance(endpoint, str) and endpoint:
        return endpoint, "~/.sky/config.yaml api_server.endpoint"
    return DEFAULT_ENDPOINT, "default"


def _client_config_text(env: Any) -> str | None:
    """The SDK's client config (~/.sky/config.yaml, or $SKYPILOT_GLOBAL_CONFIG), if any."""
    path = env.get("SKYPILOT_GLOBAL_CONFIG") or "~/.sky/config.yaml"
    try:
        return Path(path).expanduser().read_text(errors="replace")
    except OSError:
        return None


_NOT_CONFIGURED = (
    "no SkyPilot API server is configured: set `api_server:` in the host config "
    "(/etc/deskgpu/config.yaml, or the file in $DESKGPU_CONFIG / --config) or export "
    "SKYPILOT_API_SERVER_ENDPOINT"
)


def import_sky() -> ModuleType:
    try:
        import sky
    except ImportError as exc:  # pragma: no cover - skypilot is a hard dependency
        raise OutsideError(f"SkyPilot is not installed ({exc}); reinstall deskgpu") from None
    return sky


def clean_message(exc: BaseException) -> str:
    """First meaningful line of a SkyPilot error, without colour codes."""
    return _first_line(str(exc)) or type(exc).__name__


def _first_line(text: str) -> str:
    for line in _ANSI.sub("", text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def explain(exc: BaseException, endpoint: str) -> OutsideError:
    """Turn any SkyPilot failure into one line a researcher can act on."""
    return explain_text(type(exc).__name__, str(exc), endpoint)


def explain_text(name: str, text: str, endpoint: str) -> OutsideError:
    """`explain` for a failure known by its SkyPilot exception's name and text (a managed
    job's `failure_reason` names its exception in brackets, `[sky.exceptions.X] ...`)."""
    message = _first_line(text) or name
    unreachable = OutsideError(skyhttp.unreachable_message(endpoint))
    # SkyPilot's own catalog download on the server (its URL says so), not our connection.
    catalog_fetch = "skypilot-catalog" in message
    if name in ("ApiServerConnectionError", "ConnectionError", "ConnectTimeout") and not (
        catalog_fetch
    ):
        return unreachable
    if "No SkyPilot API server endpoint is configured" in message:
        # The SDK says this when the endpoint is the default local one and it may not start
        # a private server there: with an endpoint configured, that server is simply down.
        if os.environ.get("SKYPILOT_API_SERVER_ENDPOINT"):
            return unreachable
        return OutsideError(_NOT_CONFIGURED)
    if name == "NoCloudAccessError":
        return OutsideError(
            "SkyPilot has no infrastructure enabled on the API server at "
            f"{endpoint}: on the box run `sky check kubernetes` (or `deskgpu doctor`)"
        )
    if name == "ApiServerAuthenticationError":
        return OutsideError(f"SkyPilot API server at {endpoint} refused our login: {message}")
    if name == "APIVersionMismatchError":
        return OutsideError(f"SkyPilot client and API server versions differ: {message}")
    if (name == "CloudError" and "requests error" in message) or catalog_fetch:
        return OutsideError(  # whole: the URL it could not fetch is the clue
            "SkyPilot could not fetch its accelerator catalog (no network on the API server? "
            "`deskgpu setup render` writes the box's own): "
            + " ".join(_ANSI.sub("", message).split())
        )
    if name == "ResourcesUnavailableError":
        return OutsideError(f"SkyPilot found no resources for the job: {message}")
    if name == "UserRequestRejectedByPolicy":
        # Every rule it broke, each on its line: the first line alone names none.
        lines = [ln.rstrip() for ln in _ANSI.sub("", text).strip().splitlines() if ln.strip()]
        return OutsideError("the API server refused the request: " + "\n".join(lines))
    return OutsideError(f"SkyPilot rejected the request ({name}): {message}")


@contextlib.contextmanager
def _quiet_sdk() -> Iterator[None]:
    """SkyPilot prints progress on stdout; ours carries the product. Keep it for DESKGPU_DEBUG.
    What it writes to stderr (the upload's progress lines) keeps its colours on a terminal
    only: in a pipe or a log file the words come without escape codes."""
    chatter = io.StringIO()
    plain = not (sys.stderr.isatty() and not os.environ.get("NO_COLOR"))
    errors: Any = PlainText(sys.stderr) if plain else sys.stderr
    # SkyPilot's loggers hold the stdout they found at import (sky/sky_logging.py): their
    # lines (the upload's progress) go to stderr for the call, never into our stdout.
    handlers = _sky_stream_handlers()
    before = [_swap_stream(h, errors) for h in handlers]
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(errors):
            yield
    finally:
        for handler, stream in zip(handlers, before, strict=True):
            _swap_stream(handler, stream)
        if os.environ.get("DESKGPU_DEBUG") and chatter.getvalue():
            sys.stderr.write(chatter.getvalue())


def _swap_stream(handler: logging.StreamHandler[Any], stream: Any) -> Any:
    """Point `handler` at `stream`; returns the one it had. Unlike `setStream`, the old stream
    is not flushed: it may be closed already (a test runner's captured stdout)."""
    with handler.lock or contextlib.nullcontext():
        old = handler.stream
        handler.stream = stream
    return old


def _sky_stream_handlers() -> list[logging.StreamHandler[Any]]:
    """SkyPilot's stream handlers on its loggers (`sky` and its children), once imported."""
    names = [n for n in logging.Logger.manager.loggerDict if n == "sky" or n.startswith("sky.")]
    found: list[logging.StreamHandler[Any]] = []
    for name in names:
        for handler in logging.getLogger(name).handlers:
            # SkyPilot's own handlers only (sky.sky_logging's), not one a host program added.
            own = type(handler).__module__.startswith("sky.")
            if own and isinstance(handler, logging.StreamHandler) and handler not in found:
                found.append(handler)
    return found


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


# What a command that loads the SDK may take beyond the user's budget: `import sky` (about
# 2 s here, more on a loaded machine) and one request it cannot take back.
SDK_GRACE_S = 5.0


def reach(config: HostConfig, deadline: Deadline) -> str:
    """Point the SDK at the shared server and prove one answers there, before `import sky`.

    Raises `OutsideError` with the one line for what is wrong (unreachable, silent, not
    SkyPilot, an HTTP error); returns the endpoint.
    """
    endpoint = prepare_environment(config)
    skyhttp.probe(endpoint, deadline)
    return endpoint


def submit(
    task_config: dict[str, Any],
    *,
    cluster_name: str,
    managed: bool,
    idle_minutes: int | None,
    config: HostConfig,
    wait_s: float = 30.0,
    user: str | None = None,
    deadline: Deadline | None = None,
) -> Submitted:
    """Hand a task to the shared API server; wait until `deadline` for an early verdict.

    `deadline` (default: `wait_s` from now) bounds the whole submission: the probe, `import
    sky`, the request and the wait. Past it (plus `SDK_GRACE_S` for loading the SDK), a
    submission the server already took is reported as submitted, one it may or may not
    have taken as one `OutsideError` line saying so.

    `user`: who the task was shaped for; the server is told the same name (SkyPilot takes
    the request's user from `SKYPILOT_USER`, which a stray export would otherwise make
    someone else, and the server's policy would then refuse the job as not theirs).

    The request keeps running on the server after we return (and after the user's SSH
    session ends): managed jobs retry until GPUs free up, and a session's pod waits
    Pending with `provision_timeout: -1`.
    """
    deadline = deadline or Deadline.after(wait_s)
    # Even `--wait 0` may take a second to learn that nobody answers.
    endpoint = reach(config, Deadline(max(deadline.at, time.monotonic() + 1.0), deadline.budget_s))
    if user:
        os.environ["SKYPILOT_USER"] = user
    progress: dict[str, str] = {"phase": "loading SkyPilot"}

    def work() -> Submitted:
        sky = import_sky()
        try:
            with _quiet_sdk():
                task = sky.Task.from_yaml_config(copy.deepcopy(task_config))
                progress["phase"] = "sending the job"
                if managed:
                    request_id = sky.jobs.launch(task, name=cluster_name)
                else:
                    request_id = sky.launch(
                        task,
                        cluster_name=cluster_name,
                        idle_minutes_to_autostop=idle_minutes,
                        down=True,
                    )
                progress["request_id"] = str(request_id)
                return _await_verdict(sky, str(request_id), cluster_name, managed, deadline)
        except OutsideError:
            raise
        except Exception as exc:
            raise explain(exc, endpoint) from None

    def expired() -> str:
        spent = f"{deadline.budget_s + SDK_GRACE_S:g} s"
        if progress["phase"] == "loading SkyPilot":
            return f"gave up after {spent} while loading SkyPilot: nothing was submitted"
        return (
            f"SkyPilot API server at {endpoint} did not confirm the submission within {spent}: "
            f"it may still have taken it (see `deskgpu queue` before submitting again)"
        )

    try:
        return bounded(work, deadline.extended(SDK_GRACE_S), expired)
    except DeadlineExpired:
        if "request_id" in progress:  # taken; only the verdict is late
            return Submitted(progress["request_id"], cluster_name, managed, "submitted")
        raise


def _await_verdict(
    sky: ModuleType, request_id: str, cluster_name: str, managed: bool, deadline: Deadline
) -> Submitted:
    while True:
        payloads = sky.api_status([request_id])
        status = str(payloads[0].status).upper() if payloads else "PENDING"
        status = status.rsplit(".", 1)[-1]
        if status in _FINAL:
            result = sky.get(request_id)  # raises the server-side error on FAILED
            job_id = _first_job_id(result)
            return Submitted(request_id, cluster_name, managed, "done", job_id)
        if deadline.expired:
            return Submitted(request_id, cluster_name, managed, "submitted")
        time.sleep(min(0.5, deadline.left()))


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
# deskgpu submit, a managed job's first seconds. The server takes a managed job before its jobs
# controller has tried to launch it: with no infrastructure the job turned FAILED_PRECHECKS
# seconds after `submit` had said "submitted" and exited 0 (issue #24, item 5).
# ---------------------------------------------------------------------------------------------

# After a job has left the controller's queue, how often `watch_launch` looks again.
LAUNCH_POLL_S = 1.0
_LAUNCH_READS_TRIED = 3  # failed reads of its state in a row before the watch gives up
_EXCEPTION_NAME = re.compile(r"\[(?:[\w.]+\.)?(\w+)\]\s*")


@dataclass(frozen=True)
class LaunchState:
    """Where a managed job stands in its first seconds.

    `state`: a deskgpu state once the launch has shown its hand (Running; Starting with its
    cluster provisioning, so past SkyPilot's prechecks; Queued in backoff for resources;
    Done, Cancelled or Failed), None while SkyPilot has not tried it far enough to say.
    """

    state: str | None
    sky_status: str | None = None
    reason: str | None = None


def launch_state(record: dict[str, Any]) -> LaunchState:
    """One `sky jobs queue` record of a just-submitted job -> its `LaunchState`."""
    from deskgpu import snapshot as s

    status = _enum_name(record.get("status")) or ""
    schedule = (_enum_name(record.get("schedule_state")) or "").upper()
    details = plain(record.get("details"))
    state, reason = job_state(status, schedule, details, plain(record.get("failure_reason")))
    if state in (s.RUNNING, s.DONE, s.CANCELLED, s.FAILED) or status == "RECOVERING":
        return LaunchState(state, status, reason)
    # In backoff for resources, or parked until a launch slot frees (ALIVE_WAITING). Not a
    # PENDING job the scheduler just claimed (ALIVE, LAUNCHING: "Job submitted to queue"):
    # its prechecks are still ahead (CI saw such a job reported queued, then fail them).
    backoff = schedule in ("ALIVE_BACKOFF", "ALIVE_WAITING")
    if backoff:
        return LaunchState(s.QUEUED, status, details or "in backoff, waiting for resources")
    if status == "STARTING" and (state == s.QUEUED or record.get("cluster_name_on_cloud")):
        # A cluster record exists only once provisioning began, after the prechecks
        # (sky/backends/cloud_vm_ray_backend.py adds it "before provisioning").
        return LaunchState(state, status, reason)
    return LaunchState(None, status, reason)


def watch_launch(job_id: int, config: HostConfig, deadline: Deadline) -> LaunchState:
    """Watch a just-accepted managed job until its launch shows its hand or `deadline`.

    Plain HTTP (`jobs/queue/v2` for this one job). The job is taken either way: a state that
    cannot be read is `LaunchState(None)`, never a failed submission.
    """
    endpoint = prepare_environment(config)
    body = {**jobs_body(), "job_ids": [job_id]}
    last = LaunchState(None)
    failed_reads = 0
    while not deadline.expired:
        try:
            answer = skyhttp.call(endpoint, "jobs/queue/v2", body, deadline)
        except (OutsideError, skyhttp.RequestFailed):
            failed_reads += 1
            if failed_reads >= _LAUNCH_READS_TRIED:  # not a passing hiccup of a busy server
                return last
            time.sleep(min(LAUNCH_POLL_S, deadline.left()))
            continue
        failed_reads = 0
        records = [record_dict(r) for r in _job_records(answer) if isinstance(r, dict)]
        mine = sorted(
            (r for r in records if r.get("job_id") == job_id),
            key=lambda r: (
                not str(r.get("status") or "").startswith("FAILED"),
                r.get("task_id") or 0,
            ),
        )
        if mine:
            last = launch_state(mine[0])  # a failed task first: it fails the job
            if last.state is not None:
                return last
        time.sleep(min(LAUNCH_POLL_S, deadline.left()))
    return last


def launch_failed(job_id: int, name: str, launch: LaunchState, config: HostConfig) -> OutsideError:
    """The one line for a managed job that failed before it started (`FAILED_PRECHECKS`: no
    infrastructure, a bad storage spec; `FAILED_NO_RESOURCE`)."""
    endpoint = prepare_environment(config)
    reason = launch.reason or ""
    found = _EXCEPTION_NAME.match(reason)
    if found:  # `[sky.exceptions.NoCloudAccessError] Cloud access is not set up. ...`
        why = str(explain_text(found.group(1), reason[found.end() :], endpoint))
    else:
        why = _first_line(reason) or "SkyPilot gave no reason"
    return OutsideError(
        f"managed job {job_id} {name} failed before it started ({launch.sky_status}): {why}"
    )


def _job_records(answer: Any) -> list[Any]:
    """`jobs/queue/v2`'s answer: `{"jobs": [...], ...}` (older servers: the list itself)."""
    if isinstance(answer, dict):
        jobs = answer.get("jobs", [])
        return jobs if isinstance(jobs, list) else []
    return answer if isinstance(answer, list) else []


# ---------------------------------------------------------------------------------------------
# deskgpu queue: all users' clusters and managed jobs, mapped to deskgpu's states.
#
# Live responses (pydantic `StatusResponse` / `ManagedJobRecord`) are turned into plain dicts
# by `record_dict` and parsed by `parse_clusters` / `parse_jobs`; tests feed the same parsers
# recorded dicts, so live and recorded take one path.
# ---------------------------------------------------------------------------------------------

# The managed-job fields `queue` shows (SkyPilot's default set lacks user, reason, labels):
# the same the guard's queue endpoint answers with.
QUEUE_JOB_FIELDS = list(guardqueue.JOB_FIELDS)
_HEAVY_FIELDS = {"handle", "credentials", "last_creation_yaml", "user_yaml", "metadata"}
_CONTROLLER_PREFIXES = ("sky-jobs-controller-", "sky-serve-controller-")
# SkyPilot's words for "waiting for GPUs": backoff retries, a Pending pod, Kueue admission.
_WAITING = re.compile(
    r"backoff|waiting for|pending|insufficient|unschedulable|queue admission|no resources",
    re.IGNORECASE,
)
_ACCEL = re.compile(r"([A-Za-z][A-Za-z0-9_.]*(?:-[A-Za-z0-9_.]+)*)\s*['\"]?\s*:\s*(\d+(?:\.\d+)?)")


# Set to `skypilot`, the queue skips the guard's endpoint and asks SkyPilot itself (what a
# newer deskgpu does against an older guard; bench/queue.py times that path this way).
QUEUE_VIA_ENV = "DESKGPU_QUEUE_VIA"


def fetch_queue(
    config: HostConfig, timeout_s: float = 30.0, deadline: Deadline | None = None
) -> Any:
    """All users' clusters and managed jobs as a `SkyView`; never raises.

    Plain HTTP, not the SDK: `import sky` alone costs more than the answers. First the
    guard's queue endpoint (one request, answered from the server's own state:
    skypilot/guardqueue.py); where it cannot answer (an older guard, no guard, a capped
    answer), SkyPilot's own `/status` and `/jobs/queue/v2` at once, the view saying why in
    `fallback`. A failure of either of those becomes a note (or the view's `error` when
    nothing came back), so the GPU half still renders.
    """
    from deskgpu.snapshot import VIA_SKYPILOT, SkyView

    deadline = deadline or Deadline.after(timeout_s)
    view = SkyView(available=False)
    try:
        view.endpoint = endpoint = prepare_environment(config)
        skyhttp.probe(endpoint, deadline)
    except OutsideError as exc:
        view.error = str(exc)
        return view
    if os.environ.get(QUEUE_VIA_ENV) == VIA_SKYPILOT:
        view.fallback = f"{QUEUE_VIA_ENV}={VIA_SKYPILOT}"
    else:
        through_guard = _queue_from_guard(endpoint, deadline)
        if isinstance(through_guard, SkyView):
            return through_guard
        view.fallback = through_guard
    view.via = VIA_SKYPILOT
    answers: dict[str, Any] = {}

    def ask(name: str, route: str, body: dict[str, Any]) -> None:
        try:
            answers[name] = skyhttp.call(endpoint, route, body, deadline)
        except (OutsideError, skyhttp.RequestFailed) as exc:
            answers[name] = exc

    asks = [
        threading.Thread(target=ask, args=("clusters", "status", STATUS_BODY), daemon=True),
        threading.Thread(target=ask, args=("jobs", "jobs/queue/v2", jobs_body()), daemon=True),
    ]
    for thread in asks:
        thread.start()
    for thread in asks:
        thread.join()  # each exchange ends by the deadline on its own
    got_any = False
    clusters = answers.get("clusters")
    if isinstance(clusters, list):
        view.clusters = parse_clusters([record_dict(r) for r in clusters])
        got_any = True
    else:
        view.notes.append(f"clusters unavailable: {_failure(clusters, endpoint)}")
    jobs = answers.get("jobs")
    if isinstance(jobs, skyhttp.RequestFailed) and jobs.type_name == "ClusterNotUpError":
        got_any = True  # no managed job ever launched: an empty queue
    elif isinstance(jobs, (dict, list)):
        view.jobs = parse_jobs([record_dict(r) for r in _job_records(jobs)])
        got_any = True
    else:
        view.notes.append(f"managed jobs unavailable: {_failure(jobs, endpoint)}")
    view.available = got_any
    if not got_any:
        first = view.notes[0].split(": ", 1)[1] if view.notes else "no answer"
        both_same = len({n.split(": ", 1)[1] for n in view.notes}) == 1
        view.error = first if both_same else "; ".join(view.notes)
        view.notes = []
    return view


def _queue_from_guard(endpoint: str, deadline: Deadline) -> Any:
    """The queue through the guard's endpoint as a `SkyView`, or why not (a line for
    `fallback`). A server that stopped answering is the view's error: asking it twice more
    would only spend the rest of the budget."""
    from deskgpu.snapshot import VIA_GUARD, SkyView

    wait_s = min(deadline.left(), guardqueue.CLIENT_WAIT_S)
    reply = skyhttp.request(
        "GET", endpoint.rstrip("/") + guardqueue.ROUTE, timeout_s=wait_s, deadline=deadline
    )
    if reply.unreachable:
        return SkyView(False, endpoint, skyhttp.unreachable_message(endpoint, reply.error))
    if reply.timed_out:
        if deadline.left() < 0.5:
            said = skyhttp.silent_message(endpoint, deadline.budget_s, started=reply.answered)
            return SkyView(False, endpoint, said)
        return f"the guard's queue endpoint did not answer within {wait_s:.3g} s"
    if reply.status == 404:
        return "the server's guard has no queue endpoint (HTTP 404: an older deskgpu, or no guard)"
    if reply.status != 200:
        return f"the guard's queue endpoint answered HTTP {reply.status}: {skyhttp.detail(reply)}"
    try:
        doc = reply.json()
    except ValueError:
        return "the guard's queue endpoint answered something that is not JSON"
    found = guardqueue.records(doc)
    if isinstance(found, str):
        return found
    clusters, jobs = found
    view = SkyView(available=True, endpoint=endpoint, via=VIA_GUARD)
    view.clusters = parse_clusters([record_dict(r) for r in clusters])
    view.jobs = parse_jobs([record_dict(r) for r in jobs])
    return view


# The SDK's `sky.status(all_users=True)` and `sky.jobs.queue_v2(...)` request bodies
# (sky/server/requests/payloads.py StatusBody, JobsQueueV2Body), minus what queue ignores.
STATUS_BODY: dict[str, Any] = {
    "refresh": "NONE",
    "all_users": True,
    "include_credentials": False,
    "include_handle": False,
}


def jobs_body() -> dict[str, Any]:
    return {
        "refresh": False,
        "skip_finished": False,
        "all_users": True,
        "fields": QUEUE_JOB_FIELDS,
    }


def _failure(answer: Any, endpoint: str) -> str:
    if isinstance(answer, OutsideError):
        return str(answer)
    if isinstance(answer, skyhttp.RequestFailed):
        message = clean_message(Exception(answer.message)) if answer.message else ""
        return f"SkyPilot rejected the request ({answer.type_name}): {message}".rstrip(": ")
    return skyhttp.not_skypilot(endpoint, f"unexpected answer {type(answer).__name__}")


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


def plain(text: str | None) -> str | None:
    """SkyPilot's text without its terminal escape codes (`Run: \x1b[1msky check\x1b[0m`):
    the queue's tables, `--json` and messages carry the words, not the colours."""
    return None if text is None else _ANSI.sub("", text)


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
            _enum_name(rec.get("status")),
            rec.get("init_kind"),
            plain(rec.get("init_status_reason")),
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
            plain(rec.get("details")),
            plain(rec.get("failure_reason")),
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


def cluster_jobs(cluster_name: str, config: HostConfig, timeout_s: float = 30.0) -> tuple[int, int]:
    """(running, pending) jobs on a cluster, all users'; raises `OutsideError`.

    Plain HTTP like the queue (`sky queue` would cost an `import sky` per reap run).
    """
    endpoint = prepare_environment(config)
    body = {"cluster_name": cluster_name, "skip_finished": True, "all_users": True}
    try:
        records = skyhttp.call(endpoint, "queue", body, Deadline.after(timeout_s))
    except OutsideError as exc:
        raise OutsideError(f"{cluster_name}: job queue unavailable: {exc}") from None
    except skyhttp.RequestFailed as exc:
        failure = _failure(exc, endpoint)
        raise OutsideError(f"{cluster_name}: job queue unavailable: {failure}") from None
    if not isinstance(records, list):
        raise OutsideError(f"{cluster_name}: job queue unavailable: not a list of jobs")
    return count_cluster_jobs([record_dict(r) for r in records if isinstance(r, dict)])


# A teardown on the box's k3s takes seconds to a minute; a server that has not finished
# one in this long is stuck, and reap (cron, holding its lock) must not wait on it forever.
DOWN_TIMEOUT_S = 600.0


def down_cluster(cluster_name: str, config: HostConfig, timeout_s: float = DOWN_TIMEOUT_S) -> None:
    """`sky down <cluster>` and wait for it; any failure is one clean `OutsideError` line."""
    endpoint = prepare_environment(config)

    def work() -> None:
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
            raise OutsideError(
                f"{cluster_name}: teardown failed: {explain(exc, endpoint)}"
            ) from None

    bounded(
        work,
        Deadline.after(timeout_s),
        lambda: (
            f"{cluster_name}: teardown not confirmed within {timeout_s:g} s: it may still "
            "finish (see `deskgpu queue`)"
        ),
    )


# ---------------------------------------------------------------------------------------------
# deskgpu logs / cancel / ssh: one job or session the researcher named (skypilot.lookup
# resolves the name over plain HTTP first, so a dead server has already answered before
# `import sky`).
# ---------------------------------------------------------------------------------------------


class PlainText(io.TextIOBase):
    """A text stream onto `out` that drops terminal escape codes (SkyPilot colours its log
    lines: `\x1b[33mJob 1 is already in terminal state\x1b[0m`)."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        # SkyPilot writes whole lines (sky/client/sdk.py stream_response), so no escape
        # sequence is split across two writes.
        self._out.write(_ANSI.sub("", text))
        return len(text)

    def flush(self) -> None:
        self._out.flush()


def tail_logs(
    *,
    config: HostConfig,
    deadline: Deadline,
    follow: bool,
    tail: int | None,
    job_id: int | None = None,
    cluster: str | None = None,
    colour: bool = False,
) -> None:
    """Stream a managed job's logs (`job_id`) or a session's job logs (`cluster`) to stdout.

    The logs are the product, so SkyPilot's own writer prints them; with `follow` this
    returns when the job ends or on Ctrl-C (a `KeyboardInterrupt`, exit 130 above).
    `colour`: keep SkyPilot's colour codes (for a terminal); otherwise they are dropped.
    """
    endpoint = reach(config, deadline)
    sky = import_sky()
    out = None if colour else PlainText(sys.stdout)  # None: SkyPilot prints to stdout as is
    try:
        if job_id is not None:
            code = sky.jobs.tail_logs(job_id=job_id, follow=follow, tail=tail, output_stream=out)
        else:
            code = sky.tail_logs(
                cluster, job_id=None, follow=follow, tail=tail or 0, output_stream=out
            )
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise _logs_error(exc, endpoint) from None
    # The job's own outcome (sky.exceptions.JobExitCode: 0, 100 failed, 101 not finished,
    # 103 cancelled) is not a failure to show its logs; anything else (255: ssh to the pod
    # failed, 102: no such job there) is.
    if isinstance(code, int) and code not in _JOB_OUTCOMES:
        what = f"managed job {job_id}" if job_id is not None else f"session {cluster}"
        raise OutsideError(f"SkyPilot could not fetch the logs of {what} (exit {code})")


_JOB_OUTCOMES = {0, 100, 101, 103}


def _logs_error(exc: BaseException, endpoint: str) -> OutsideError:
    if type(exc).__name__ == "ClusterNotUpError":
        return OutsideError(f"no logs to show: {clean_message(exc)}")
    return explain(exc, endpoint)


def cancel_job(job_id: int, config: HostConfig, deadline: Deadline) -> None:
    """`sky jobs cancel JOB_ID` and wait for the server's answer, within `deadline`."""
    endpoint = reach(config, deadline)

    def work() -> None:
        sky = import_sky()
        try:
            with _quiet_sdk():
                sky.get(sky.jobs.cancel(job_ids=[job_id]))
        except Exception as exc:
            raise OutsideError(
                f"managed job {job_id}: cancel failed: {explain(exc, endpoint)}"
            ) from None

    bounded(
        work,
        deadline.extended(SDK_GRACE_S),
        lambda: (
            f"managed job {job_id}: cancel not confirmed within {deadline.budget_s:g} s: it may "
            "still happen (see `deskgpu queue`)"
        ),
    )


def ssh_config_file(cluster: str, config: HostConfig, deadline: Deadline) -> Path:
    """(Re)write SkyPilot's ssh entry for `cluster` the way `sky status CLUSTER` does, and
    return its file (`~/.sky/generated/ssh/<cluster>`, a `Host <cluster>` block; on
    Kubernetes its ProxyCommand tunnels through the API server).

    SkyPilot 0.14 keeps that writer in its CLI module
    (`_get_cluster_records_and_set_ssh_config`); without it, or without an entry after it
    (a session not up yet), this raises `OutsideError` rather than guess an ssh config.
    """
    endpoint = reach(config, deadline)

    def work() -> Path:
        import_sky()
        try:
            from sky.client.cli import command
            from sky.utils import cluster_utils
        except ImportError as exc:  # pragma: no cover - a SkyPilot that moved them
            raise OutsideError(f"this SkyPilot cannot write ssh entries ({exc})") from None
        writer = getattr(command, "_get_cluster_records_and_set_ssh_config", None)
        if writer is None:  # pragma: no cover - a SkyPilot that renamed it
            raise OutsideError("this SkyPilot has no ssh-entry writer: use `sky status` + ssh")
        try:
            with _quiet_sdk():
                writer([cluster])
        except Exception as exc:
            raise explain(exc, endpoint) from None
        path = Path(cluster_utils.SSHConfigHelper.ssh_cluster_path.format(cluster)).expanduser()
        if not path.is_file():
            raise OutsideError(
                f"session {cluster} has no ssh address yet (not up, or its pod is gone): "
                "see `deskgpu queue`"
            )
        return path

    return bounded(
        work,
        deadline.extended(SDK_GRACE_S),
        lambda: (
            f"SkyPilot API server at {endpoint} gave no ssh details within {deadline.budget_s:g} s"
        ),
    )
