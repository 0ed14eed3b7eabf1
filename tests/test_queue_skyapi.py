"""SkyPilot's cluster and managed-job records -> deskgpu states, through the parser live uses.

The records were built by hand with SkyPilot 0.14's own response models (`StatusResponse`,
`ManagedJobRecord`) and `skyapi.record_dict`, the call the live path makes on every response
(no server with jobs was at hand to record them from); one test rebuilds the models from the
JSON to prove the shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deskgpu.skypilot import sdk as skyapi
from deskgpu.snapshot import CANCELLED, DONE, FAILED, QUEUED, RUNNING, STARTING

FIXTURES = Path(__file__).parent / "fixtures" / "skypilot"


def recorded(name: str) -> list[dict[str, Any]]:
    """The records of a fixture (its `_provenance` says how they were made)."""
    data: list[dict[str, Any]] = json.loads((FIXTURES / name).read_text())["records"]
    return data


def test_clusters_map_to_deskgpu_states() -> None:
    clusters = {c.name: c for c in skyapi.parse_clusters(recorded("status_all_users.json"))}
    # Controllers and managed jobs' clusters are not sessions.
    assert set(clusters) == {"bob-notebook", "erin-debug", "frank-sess", "gina-oom"}
    bob = clusters["bob-notebook"]
    assert (bob.state, bob.user, bob.gpus, bob.autostop_min, bob.to_down) == (
        RUNNING,
        "bob",
        "A6000:1",
        120,
        True,
    )
    assert bob.cluster_name_on_cloud == "bob-notebook-9f1c" and bob.interactive
    erin = clusters["erin-debug"]  # pod Pending with provision_timeout -1: the k8s queue
    assert erin.state == QUEUED and "Insufficient nvidia.com/gpu" in (erin.reason or "")
    assert clusters["frank-sess"].state == STARTING
    assert clusters["frank-sess"].autostop_min is None
    gina = clusters["gina-oom"]
    assert gina.state == FAILED and "OOMKilled" in (gina.reason or "")


def test_managed_jobs_map_to_deskgpu_states_with_queue_positions() -> None:
    jobs = {j.id: j for j in skyapi.parse_jobs(recorded("jobs_queue_all_users.json"))}
    assert (jobs[7].state, jobs[7].user, jobs[7].gpus) == (RUNNING, "alice", "A6000:1")
    assert jobs[7].labels["deskgpu.io/job"] == "bert-finetune"
    assert (jobs[8].state, jobs[8].reason) == (QUEUED, "In backoff, waiting for resources")
    assert jobs[8].gpus == "A6000:4"  # from `resources` while no cluster exists yet
    assert jobs[9].state == QUEUED and "jobs controller" in (jobs[9].reason or "")
    assert (jobs[10].state, jobs[10].reason) == (QUEUED, "Waiting for queue admission")
    assert jobs[11].state == STARTING
    assert [jobs[i].queue_position for i in (8, 9, 10)] == [1, 2, 3]
    assert jobs[11].queue_position is None
    assert jobs[3].state == DONE and jobs[5].state == CANCELLED
    assert (jobs[4].state, jobs[4].reason) == (FAILED, "setup exited with 1")
    assert jobs[6].state == STARTING and "recovering" in (jobs[6].reason or "")


def test_recorded_records_are_skypilots_own_response_shape() -> None:
    from sky.schemas.api import responses

    for rec in recorded("status_all_users.json"):
        model = responses.StatusResponse(**rec)
        assert skyapi.record_dict(model) == rec
    for rec in recorded("jobs_queue_all_users.json"):
        job = responses.ManagedJobRecord(**rec)
        assert skyapi.parse_jobs([skyapi.record_dict(job)])[0].id == rec["job_id"]


@pytest.mark.parametrize(
    ("status", "schedule", "details", "state"),
    [
        ("PENDING", "WAITING", None, QUEUED),
        ("SUBMITTED", None, None, QUEUED),
        ("STARTING", "ALIVE_BACKOFF", None, QUEUED),
        ("STARTING", "LAUNCHING", "In backoff, waiting for resources", QUEUED),
        ("STARTING", "LAUNCHING", None, STARTING),
        ("RUNNING", "ALIVE", None, RUNNING),
        ("WINDING_DOWN", "ALIVE", None, RUNNING),
        ("RECOVERING", "ALIVE", None, STARTING),
        ("SUCCEEDED", "DONE", None, DONE),
        ("FAILED_NO_RESOURCE", "DONE", None, FAILED),
        ("FAILED_CONTROLLER", "DONE", None, FAILED),
        ("CANCELLING", "ALIVE", None, CANCELLED),
        ("CANCELLED", "DONE", None, CANCELLED),
    ],
)
def test_job_state_table(
    status: str, schedule: str | None, details: str | None, state: str
) -> None:
    assert skyapi.job_state(status, schedule, details)[0] == state


def test_every_skypilot_job_status_has_a_deskgpu_state() -> None:
    from sky.jobs.state import ManagedJobStatus

    for status in ManagedJobStatus:
        _state, reason = skyapi.job_state(status.value)
        assert not (reason or "").startswith("unknown"), status


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"A6000": 2}, "A6000:2"),
        ("{'A6000': 2}", "A6000:2"),
        ("1x[A6000:2]", "A6000:2"),
        ({"L4": 0.5}, "L4:0.5"),
        ("1x Kubernetes(2CPU--8GB--H100:8)", "H100:8"),
        (None, None),
        ("1x[CPU:4]", None),
    ],
)
def test_gpus_text(value: Any, text: str | None) -> None:
    assert skyapi.gpus_text(value) == text
