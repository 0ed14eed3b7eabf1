"""Owners act on their own things: the guard's rule for requests on existing clusters and jobs.

SkyPilot without authentication checks no owner when a request ends, changes or runs code on
an existing cluster or managed job (`sky/jobs/server/core.py` `cancel` cancels whatever ids it
is given; `down`, `stop`, `autostop`, `exec` and log reads are the same). On the box the guard
applies reap's rule to every such request, after binding it to its account
(`deskgpu.callers`): the caller must be the owner SkyPilot recorded, root, the server's
account, a member of the host config's `admin_group`, or one of SkyPilot's controllers (which
never reach this rule). A trusted front end has the rights of the researcher it names.

Pure Python over three lookups, so the table and the rule are tested without a server;
`deskgpu.policy` supplies the lookups from SkyPilot's own state functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deskgpu.callers import Acting, describe_rights, may_act_for

# Endpoint -> (what the request does, whether it only reads logs). Every one names an
# existing cluster in `cluster_name` (sky/server/requests/payloads.py). `/launch` onto an
# existing cluster runs code on it; a launch of a new cluster has no owner yet.
CLUSTER_ACTIONS: Mapping[str, tuple[str, bool]] = {
    "/down": ("tear down", False),
    "/stop": ("stop", False),
    "/start": ("start", False),
    "/autostop": ("change the autostop of", False),
    "/cancel": ("cancel jobs on", False),
    "/exec": ("run code on", False),
    "/launch": ("launch onto", False),
    "/logs": ("read the logs of", True),
    "/download_logs": ("download the logs of", True),
    "/provision_logs": ("read the provision logs of", True),
    "/hook_logs": ("read the hook logs of", True),
    # SkyPilot's SSH proxies (websockets, `ssh <cluster>`): a shell on it.
    "/kubernetes-pod-ssh-proxy": ("open a shell on", False),
    "/slurm-job-ssh-proxy": ("open a shell on", False),
}
# Managed-job endpoints: `job_ids` / `job_id` and `name` (payloads.JobsCancelBody,
# JobsLogsBody, JobsDownloadLogsBody).
JOB_ACTIONS: Mapping[str, tuple[str, bool]] = {
    "/jobs/cancel": ("cancel", False),
    "/jobs/logs": ("read the logs of", True),
    "/jobs/download_logs": ("download the logs of", True),
}
JOBS_LAUNCH = "/jobs/launch"
# `sky volumes delete NAMES` (payloads.VolumeDeleteBody); `sky storage delete` removes a
# bucket SkyPilot keeps no owner of that the box uses: an admin's.
VOLUME_DELETE = "/volumes/delete"
ADMIN_ONLY: Mapping[str, str] = {"/storage/delete": "delete a storage bucket"}


@dataclass(frozen=True)
class Found:
    """A cluster or managed job SkyPilot knows, and the user name it recorded as owner."""

    owner: str | None


@dataclass(frozen=True)
class Lookups:
    """Reads of SkyPilot's own records (None: there is no such cluster, job or volume)."""

    cluster: Callable[[str], Found | None]
    job: Callable[[int], Found | None]
    jobs_named: Callable[[str], list[int]]  # every managed job of that name, any state
    volume: Callable[[str], Found | None] = lambda _name: None


def _clean(path: str) -> str:
    from deskgpu.hardening import route_of

    return route_of(path)


def _refused(
    acting: Acting, verb: str, what: str, owner: str | None, admin_group: str | None
) -> str:
    whose = f"belongs to {owner}" if owner else "has no recorded owner"
    return (
        f"{what} {whose}: {acting.via} may not {verb} it; only {describe_rights(admin_group)} "
        "may (deskgpu guard)"
    )


def refusal(
    path: str,
    doc: Mapping[str, Any],
    acting: Acting,
    lookups: Lookups,
    *,
    shared_logs: bool = False,
    admin_group: str | None = None,
) -> str | None:
    """Why this bound request may not act on what it names (None: it may go on)."""
    path = _clean(path)
    if acting.admin:
        return None
    if path in CLUSTER_ACTIONS:
        verb, reads_logs = CLUSTER_ACTIONS[path]
        if reads_logs and shared_logs:
            return None
        name = doc.get("cluster_name")
        if name is None or name == "":
            return None  # SkyPilot refuses a request without one
        if not isinstance(name, str):
            return "a cluster name is text (deskgpu guard)"
        found = lookups.cluster(name)
        if found is None or may_act_for(acting, found.owner):
            return None
        return _refused(acting, verb, f"cluster {name}", found.owner, admin_group)
    if path == JOBS_LAUNCH and doc.get("parent_job_id") is not None:
        # A job launched into another job's group runs beside it, on its network.
        try:
            parents = _ids(doc.get("parent_job_id"))
        except _NotAnId as exc:
            return f"managed job ids are whole numbers, not {exc} (deskgpu guard)"
        for job_id in parents:
            found = lookups.job(job_id)
            if found is not None and not may_act_for(acting, found.owner):
                return _refused(
                    acting, "add a job to", f"managed job {job_id}", found.owner, admin_group
                )
        return None
    if path in JOB_ACTIONS:
        verb, reads_logs = JOB_ACTIONS[path]
        if reads_logs and shared_logs:
            return None
        return _job_refusal(path, verb, doc, acting, lookups, admin_group)
    if path == VOLUME_DELETE:
        names = doc.get("names")
        if names is not None and not (
            isinstance(names, list) and all(isinstance(n, str) for n in names)
        ):
            return "volume names are a list of text (deskgpu guard)"
        for name in names or []:
            found = lookups.volume(str(name))
            if found is not None and not may_act_for(acting, found.owner):
                return _refused(acting, "delete", f"volume {name}", found.owner, admin_group)
        return None
    if path in ADMIN_ONLY:
        rights = describe_rights(admin_group).replace("its owner, ", "")
        return f"{acting.via} may not {ADMIN_ONLY[path]}; only {rights} may (deskgpu guard)"
    return None


class _NotAnId(ValueError):
    pass


def _ids(value: Any) -> list[int]:
    """Managed-job ids as the request gives them: whole JSON numbers only. SkyPilot's
    payloads read `1.0`, `"+1"`, `" 1"`, `"1_0"` or `true` as ids too; the guard cannot
    judge what it does not read the same way, so a non-admin's request with one is refused."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        raise _NotAnId(str(value)[:40])
    return list(items)


def _job_refusal(
    path: str,
    verb: str,
    doc: Mapping[str, Any],
    acting: Acting,
    lookups: Lookups,
    admin_group: str | None,
) -> str | None:
    rights = describe_rights(admin_group)
    if doc.get("all_users"):
        return f"{acting.via} may not {verb} every user's managed jobs; only {rights} may (drop --all-users) (deskgpu guard)"  # noqa: E501
    if doc.get("pool"):
        return f"{acting.via} may not {verb} every job of pool {doc['pool']}: the pool's jobs are everyone's; only {rights} may (deskgpu guard)"  # noqa: E501
    if doc.get("controller"):
        return f"{acting.via} may not read the jobs controller's log (it covers everyone's jobs); only {rights} may (deskgpu guard)"  # noqa: E501
    try:
        ids = _ids(doc.get("job_ids")) + _ids(doc.get("job_id"))
    except _NotAnId as exc:
        return f"managed job ids are whole numbers, not {exc} (deskgpu guard)"
    name = doc.get("name")
    if isinstance(name, str) and name:
        ids += lookups.jobs_named(name)
    elif not ids and path != "/jobs/cancel":
        # No id and no name: SkyPilot picks the newest job, whoever's it is.
        return f"{acting.via} must name the managed job to {verb} (its id or name) (deskgpu guard)"
    for job_id in sorted(set(ids)):
        found = lookups.job(job_id)
        if found is not None and not may_act_for(acting, found.owner):
            return _refused(acting, verb, f"managed job {job_id}", found.owner, admin_group)
    return None
