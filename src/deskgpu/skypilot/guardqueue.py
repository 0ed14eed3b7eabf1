"""The guard's queue endpoint: the queue's whole SkyPilot half in one request.

The queue's SkyPilot half is every user's clusters (`POST /status`) and managed jobs (`POST
/jobs/queue/v2`); the second makes the jobs controller run a program of its own (about 1.5 s
on the test machine). The guard runs inside the API server, where that state is a database
read away: in consolidation mode (the box's) the managed jobs' database is the server's own.
So `GET /plugins/api/deskgpu/queue` answers both halves from SkyPilot's own state functions
(`deskgpu.policy.read_queue`) and never starts the controller's program.

Both ends of the wire live here, and nothing else: the answer's shape (`answer` on the server,
`records` on the client), its caps, and the bounded read (`serve`: SkyPilot's state is read in
a worker thread with a timeout, so the server's event loop never waits on a database). Pure
Python: no `import sky`, nothing happens at import time.

What a caller is shown is what the two stock requests show them: every user's clusters as
`/status` lists them without credentials, and every managed job as `/jobs/queue/v2` with
`all_users` lists it, in the workspaces the caller's account may read (root and the server's
account, the box's administrators, read every workspace). Only the fields the queue's
parsers read travel (`CLUSTER_FIELDS`, `JOB_FIELDS`): never a handle, credentials, an ssh key,
a task's YAML or the command that launched it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeGuard

logger = logging.getLogger("deskgpu.guard.queue")

ROUTE = "/plugins/api/deskgpu/queue"
KIND = "deskgpu.guard/queue"
# Bumped when the answer changes shape; a client that speaks another falls back to SkyPilot's
# own two requests (`deskgpu.skypilot.sdk.fetch_queue`).
VERSION = 1
# Records of each kind in one answer: clusters, and managed jobs (a job's tasks count as one).
# A queue of this many answers in a few MiB; past it the answer says so (`truncated`) and the
# client reads the whole queue the old way.
MAX_RECORDS = 10_000
# How long the guard reads SkyPilot's state before it answers 503; the client waits a little
# longer than that before it gives up on the guard and asks SkyPilot itself.
READ_TIMEOUT_S = 10.0
CLIENT_WAIT_S = READ_TIMEOUT_S + 5.0
# Reads at once in one server process; more wait their turn (within their own timeout).
_READERS = 2

# `/status` records (sky.schemas.api.responses.StatusResponse) as `parse_clusters` reads them.
CLUSTER_FIELDS = (
    "name",
    "user_name",
    "status",
    "init_kind",
    "init_status_reason",
    "autostop",
    "to_down",
    "launched_at",
    "accelerators",
    "resources_str",
    "labels",
    "cluster_name_on_cloud",
    "is_managed",
)
# The managed-job fields `queue` asks `/jobs/queue/v2` for (SkyPilot's default set lacks user,
# reason and labels); `parse_jobs` reads them.
JOB_FIELDS = (
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
)


@dataclass
class Read:
    """What the server read for one caller: records as SkyPilot's endpoints shape them, and
    how many there were before the cap."""

    clusters: list[dict[str, Any]] = field(default_factory=list)
    clusters_total: int = 0
    jobs: list[dict[str, Any]] = field(default_factory=list)  # every task of each job
    jobs_total: int = 0  # managed jobs, not tasks


class Unavailable(Exception):
    """The guard cannot answer the queue on this server (answered with `status`)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _only(record: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    return {name: record[name] for name in names if record.get(name) is not None}


def answer(read: Read, caller: str) -> dict[str, Any]:
    """The endpoint's JSON answer: the allowed fields of each record, at most `MAX_RECORDS`
    of each kind, and `truncated` naming each kind that had more (its total)."""
    clusters = [_only(r, CLUSTER_FIELDS) for r in read.clusters[:MAX_RECORDS]]
    jobs: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for record in read.jobs:
        if record.get("job_id") not in seen and len(seen) >= MAX_RECORDS:
            continue
        seen.add(record.get("job_id"))
        jobs.append(_only(record, JOB_FIELDS))
    truncated = {}
    if read.clusters_total > len(clusters):
        truncated["clusters"] = read.clusters_total
    if read.jobs_total > len(seen):
        truncated["jobs"] = read.jobs_total
    return {
        "kind": KIND,
        "version": VERSION,
        "caller": caller,
        "max_records": MAX_RECORDS,
        "truncated": truncated,
        "clusters": clusters,
        "jobs": jobs,
    }


_pool: list[ThreadPoolExecutor] = []
_pool_lock = threading.Lock()


def _readers() -> ThreadPoolExecutor:
    with _pool_lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(_READERS, thread_name_prefix="deskgpu-queue"))
        return _pool[0]


async def serve(
    read: Callable[[], Read], caller: str, timeout_s: float = READ_TIMEOUT_S
) -> tuple[int, dict[str, Any]]:
    """Run `read` in a worker thread, at most `timeout_s`; the HTTP status and JSON answer.

    A read past its time keeps its thread until the database lets go (threads cannot be
    stopped), but never the event loop: the caller is answered 503 and reads the old way.
    """
    loop = asyncio.get_running_loop()
    try:
        got = await asyncio.wait_for(loop.run_in_executor(_readers(), read), timeout_s)
    except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
        logger.warning("deskgpu guard: the queue read for %s took over %g s", caller, timeout_s)
        detail = f"the deskgpu guard could not read SkyPilot's state within {timeout_s:g} s"
        return 503, {"detail": detail}
    except Unavailable as exc:
        return exc.status, {"detail": exc.detail}
    except Exception:  # a broken read is a refusal to answer, never a traceback to the client
        logger.exception("deskgpu guard: the queue read failed")
        return 500, {"detail": "the deskgpu guard could not read SkyPilot's state (see the log)"}
    return 200, answer(got, caller)


def records(doc: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | str:
    """The client's side: (cluster records, managed-job records) of an answer, or why it
    cannot be used (then the client reads SkyPilot the old way)."""
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        return "the answer is not the guard's queue"
    if doc.get("version") != VERSION:
        return f"the guard speaks queue version {doc.get('version')!r}, this deskgpu {VERSION}"
    truncated = doc.get("truncated")
    if truncated:
        what = ", ".join(f"{n} {k}" for k, n in sorted(dict(truncated).items()))
        return f"the guard's answer stops at {doc.get('max_records')} records of each kind ({what})"
    clusters, jobs = doc.get("clusters"), doc.get("jobs")
    if not _list_of_dicts(clusters) or not _list_of_dicts(jobs):
        return "the guard's queue answer is malformed"
    return clusters, jobs


def _list_of_dicts(value: Any) -> TypeGuard[list[dict[str, Any]]]:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)
