"""Transformer Lab's launches through SkyPilot's own policy machinery, and relaunches that keep
their names. The server-level replay (the guard telling the policy which front end sent a
request) is in tests/test_identity_server.py."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskgpu import hardening
from deskgpu.labels import LABEL_FRONTEND_JOB, LABEL_USER, LABEL_VIA
from deskgpu.policy import mark_frontend, shape_task_config
from tests.test_policy import POLICY, _options, _rejected, through_policy
from tests.tlrecording import recorded

sky = pytest.importorskip("sky")
from sky.server.requests.request_names import AdminPolicyRequestName as Req  # noqa: E402
from sky.utils import dag_utils  # noqa: E402

# A box with Transformer Lab's recorded GPU (H100:1), and the account it runs as trusted.
TL_BOX = "box_name: lab-h100\ngpus: {H100: 8}\ntrusted_frontends: [transformerlab]\n"


@pytest.fixture
def tl_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """SkyPilot's config names the policy, as on the API server; this process runs the guard
    (as every process of the box's server does); the request user is alice."""
    from sky import skypilot_config
    from sky.utils import config_utils

    from deskgpu import policy

    path = tmp_path / "config.yaml"
    path.write_text(TL_BOX)
    monkeypatch.setenv("DESKGPU_CONFIG", str(path))
    monkeypatch.setenv("SKYPILOT_USER", "alice")
    monkeypatch.setattr(policy.GUARD, "active", True)
    with skypilot_config.replace_skypilot_config_in_process(
        config_utils.Config({"admin_policy": POLICY})
    ):
        yield path


def _recorded_task() -> tuple[Any, str]:
    body = recorded("/launch")[0]
    (task,) = dag_utils.load_chain_dag_from_yaml_str(body["task"]).tasks
    return task, str(body["cluster_name"])


def test_a_transformer_lab_launch_passes_as_the_researcher_it_names(
    tl_box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, cluster = _recorded_task()
    assert cluster == "finetune-demo-5d0e9df8"  # `<task name>-<8 hex of its job id>`
    monkeypatch.setenv(hardening.FRONTEND_ENV, "transformerlab")  # what the guard sets
    cfg = through_policy(task, Req.CLUSTER_LAUNCH, _options(cluster, down=True))
    labels = cfg["resources"]["labels"]
    assert labels[LABEL_USER] == "alice"
    assert labels[LABEL_VIA] == "transformerlab"
    assert labels[LABEL_FRONTEND_JOB] == "5d0e9df8-6a9d-43b3-9507-454e8cf9285e"
    mounts = cfg["resources"]["_cluster_config_overrides"]["kubernetes"]["pod_config"]["spec"]
    ckpt = next(m for m in mounts["containers"][0]["volumeMounts"] if "checkpoint" in m["name"])
    assert ckpt["subPath"] == "alice"


def test_the_same_launch_without_the_front_end_keeps_the_cluster_name_rule(tl_box: Path) -> None:
    task, cluster = _recorded_task()
    message = _rejected(task, Req.CLUSTER_LAUNCH, _options(cluster, down=True))
    assert "cluster_name" in message and "does not start with alice-" in message


def test_a_front_end_label_written_by_a_client_is_dropped() -> None:
    task = {
        "name": "x",
        "resources": {"labels": {LABEL_VIA: "transformerlab", LABEL_FRONTEND_JOB: "forged"}},
        "run": "x",
    }
    mark_frontend(task, None)
    assert task["resources"]["labels"] == {}


def test_front_end_job_ids_that_are_not_label_values_are_left_out() -> None:
    task: dict[str, Any] = {"resources": {}, "envs": {"_TFL_JOB_ID": "a b/../c"}}
    mark_frontend(task, "transformerlab")
    assert task["resources"]["labels"] == {LABEL_VIA: "transformerlab"}


def test_a_job_group_member_keeps_its_name_when_the_controller_relaunches_it(
    tl_box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SkyPilot's job groups (examples/job-group-sdk/job_group.yaml) reach peers by job name:
    the first pass keeps `server`; the controller's relaunch of it must too."""
    from deskgpu.config import load_config

    member = {"name": "server", "resources": {"cpus": 1}, "run": "python -m http.server 8080"}
    config = load_config()
    first, found = shape_task_config(
        member, config, request_name="jobs.launch", user="alice", in_job_group=True
    )
    assert not found and first["name"] == "server"
    monkeypatch.setenv("SKYPILOT_USER", "skypilot")  # the controller's own account
    again = through_policy(
        sky.Task.from_yaml_config(copy.deepcopy(first)),
        Req.JOBS_LAUNCH_CLUSTER,
        _options("server-7"),
    )
    assert again["name"] == "server"
    assert again["resources"]["labels"][LABEL_USER] == "alice"


# ---------------------------------------------------------------------------------------------
# The queue and reap: the researcher, "via Transformer Lab" and its job id, likely orphans

SNAPSHOT = Path(__file__).parent / "fixtures" / "snapshots" / "transformerlab_queued.json"


def test_queue_json_shows_the_researcher_and_the_transformer_lab_job(cli: Any) -> None:
    import json

    result = cli("queue", "--snapshot", str(SNAPSHOT), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    sessions = {s["cluster"]: s for s in doc["summary"]["frontend_sessions"]}
    old = sessions["finetune-demo-5d0e9df8"]
    assert old == {
        "cluster": "finetune-demo-5d0e9df8",
        "user": "alice",
        "via": "transformerlab",
        "frontend_job": "5d0e9df8-6a9d-43b3-9507-454e8cf9285e",
        "state": "Queued",
        "likely_orphan": True,  # 2 h waiting; Transformer Lab gave up after 225 s
    }
    assert sessions["finetune-demo-7bc9ca4e"]["likely_orphan"] is False  # 1 min: still watched
    assert doc["summary"]["likely_orphans"] == ["finetune-demo-5d0e9df8"]


def test_queue_screen_says_via_transformer_lab_and_likely_orphan(cli: Any) -> None:
    result = cli("queue", "--snapshot", str(SNAPSHOT))
    assert result.exit_code == 0, result.stderr
    screen = " ".join(result.stdout.split())
    assert (
        "via Transformer Lab job 5d0e9df8-6a9d-43b3-9507-454e8cf9285e" in screen.replace("- ", "-")
        or "via Transformer Lab job" in screen
    )
    assert "likely orphan" in screen and "1 likely orphan" in screen


def test_a_raised_frontend_limit_is_no_orphan(tmp_path: Path) -> None:
    import json

    from deskgpu import queue as survey
    from deskgpu.snapshot import Snapshot

    doc = json.loads(SNAPSHOT.read_text())
    doc["frontend_gives_up_after_s"] = 17 * 86400.0  # EMPTY_PROVIDER_JOBS_TERMINAL_THRESHOLD raised
    snap = Snapshot.from_dict(doc)
    assert survey.summarize(snap).likely_orphans == []


def test_reap_dry_run_lists_the_likely_orphan_and_touches_it_not(tmp_path: Path) -> None:
    import json

    from deskgpu.config import HostConfig
    from deskgpu.config.reap import load_settings
    from deskgpu.identity import Actor
    from deskgpu.reap import run
    from deskgpu.snapshot import Snapshot

    doc = json.loads(SNAPSHOT.read_text())
    doc["nvml"] = {"available": True, "gpus": []}
    snap = Snapshot.from_dict(doc)
    downs: list[str] = []
    now = [snap.taken_at]
    live = run.Live(
        snapshot=lambda _c: snap,
        pods=lambda: None,
        cluster_jobs=lambda _n, _c: (0, 0),
        down=lambda name, _c: downs.append(name),
        proc_root=tmp_path / "proc",
        cgroup_root=tmp_path / "cgroup",
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    config = HostConfig(state_dir=str(tmp_path / "state"), reap={"live_window": "10s"})
    result = run.reap(
        config, load_settings(config), yes=False, actor=Actor("root", 0, frozenset()), live=live
    )
    orphan = [n for n in result.notes if n.startswith("likely orphan")]
    assert (
        len(orphan) == 1 and "finetune-demo-5d0e9df8 (alice, via Transformer Lab job" in orphan[0]
    )
    assert "deskgpu cancel finetune-demo-5d0e9df8" in orphan[0]
    assert downs == [] and not any(d.subject.startswith("finetune") for d in result.zombies)
