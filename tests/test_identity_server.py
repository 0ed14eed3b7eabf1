"""Who is asking is who the box says it is, on a real API server started from the files
`deskgpu setup render` writes, with requests sent from real, distinct Unix accounts.

The accounts (tests/accounts.py): researchers alice and bob, carol in the host config's
`admin_group`, and `transformerlab`, listed in `trusted_frontends`. Each request is sent by a
child process that dropped to that account (tests/asuser.py), so the guard reads that uid off
the connection, exactly as on the box. alice's and bob's sessions and managed jobs are written
by SkyPilot's own state functions before the server starts (tests/jobstate.py): no pod can run
here.

Requests are built by SkyPilot's own payload classes (tests/raw_request.py), the body the
stock SDK and CLI send, with `SKYPILOT_USER` / `SKYPILOT_USER_ID` set as a researcher with a
shell would set them (`SKYPILOT_USER=alice sky ...` puts the same into `env_vars`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskgpu.callers import user_id_for
from tests.accounts import ADMIN, ADMIN_GROUP, FRONTEND, ensure_accounts
from tests.asuser import as_account
from tests.raw_request import body_for, post
from tests.test_hardening_server import CLEAN, Box, _box

pytestmark = pytest.mark.apiserver

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
# The box has the GPU Transformer Lab's recorded launch asks for (H100:1).
EXTRA = (
    f"admin_group: {ADMIN_GROUP}\ntrusted_frontends: [{FRONTEND}]\ngpus: {{A6000: 4, H100: 2}}\n"
)
# Jobs as tests/jobstate.py numbers them for ("alice", "bob").
ALICE_JOB, BOB_JOB = 1, 2


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    ensure_accounts()
    with _box(
        tmp_path_factory.mktemp("identity"), guard=True, extra=EXTRA, owners=("alice", "bob")
    ) as box:
        yield box


def _send(
    account: str,
    url: str,
    path: str,
    doc: dict[str, Any],
    *,
    query: str = "",
    wait_s: float = 0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """POST `doc` to `path` from a process running as `account`; the HTTP status, the guard's
    refusal (`detail`) and, with `wait_s`, the request's final status and error."""

    # What the account's own client sends, unless the test names someone.
    doc.setdefault("env_vars", {}).setdefault("SKYPILOT_USER", account)

    def run() -> dict[str, Any]:
        status, answered, raw = post(f"{url}{path}{query}", doc, headers)
        out: dict[str, Any] = {"http": status}
        if status != 200:
            try:
                detail = json.loads(raw).get("detail")
            except ValueError:
                detail = raw.decode("utf-8", "replace")
            out["detail"] = detail if isinstance(detail, str) else json.dumps(detail)
            return out
        lowered = {k.lower(): v for k, v in answered.items()}
        out["request_id"] = lowered.get("x-skypilot-request-id")
        if wait_s and out["request_id"]:
            from tests.raw_request import wait

            result = wait(url, out["request_id"], wait_s)
            error = result.get("error") or {}
            error = json.loads(error) if isinstance(error, str) else error
            out["status"] = result.get("status")
            out["user_name"] = result.get("user_name")
            out["user_id"] = result.get("user_id")
            out["error_type"] = error.get("type") if isinstance(error, dict) else None
            out["error"] = str(error.get("message") if isinstance(error, dict) else error)
        return out

    return as_account(account, run)


def _launch_doc(path: str, cluster: str | None, **env: str) -> dict[str, Any]:
    doc = body_for(path, CLEAN, cluster)
    doc["env_vars"].pop("SKYPILOT_USER", None)  # the suite's own name; `_send` sets the sender's
    doc["env_vars"].update(env)
    return doc


def _body(model: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(model.model_dump_json())
    doc["env_vars"].pop("SKYPILOT_USER", None)
    return doc


def _refused(answer: dict[str, Any], *words: str) -> str:
    assert answer["http"] == 403, answer
    detail = str(answer["detail"])
    assert "\n" not in detail and "deskgpu guard" in detail, detail
    for word in words:
        assert word in detail, (word, detail)
    return detail


# ---------------------------------------------------------------------------------------------
# 1. bob cannot be alice: not by env_vars, not by her id


@pytest.mark.parametrize("path", ["/launch", "/jobs/launch", "/validate", "/exec"])
def test_bob_naming_alice_is_refused_naming_both(lab: Box, path: str) -> None:
    cluster = None if path == "/jobs/launch" else "alice-dev"
    doc = _launch_doc(path, cluster, SKYPILOT_USER="alice", SKYPILOT_USER_ID=user_id_for("alice"))
    if path == "/exec":
        from sky.server.requests import payloads

        doc = _body(payloads.ExecBody(task=doc["task"], cluster_name="alice-dev"))
        doc["env_vars"].update(SKYPILOT_USER="alice", SKYPILOT_USER_ID=user_id_for("alice"))
    detail = _refused(_send("bob", lab.url, path, doc), "from alice", "Unix account bob")
    assert "trusted_frontends" in detail


def test_bob_with_alices_user_id_runs_as_bob(lab: Box) -> None:
    """Her id buys nothing: the request is bob's, so her cluster name is not his to use."""
    doc = _launch_doc("/validate", "alice-x", SKYPILOT_USER="bob", SKYPILOT_USER_ID="a0000001")
    answer = _send("bob", lab.url, "/validate", doc)
    assert answer["http"] != 200
    assert "does not start with bob-" in str(answer.get("detail")), answer


def test_the_stock_cli_name_from_the_environment_is_refused(lab: Box) -> None:
    """`SKYPILOT_USER=alice sky jobs launch ...` run by bob: the SDK puts the variable into
    the request (sky/server/requests/payloads.py `request_body_env_vars`)."""

    def run() -> dict[str, Any]:
        os.environ["SKYPILOT_USER"] = "alice"
        os.environ["SKYPILOT_USER_ID"] = "b0b0b0b0"  # bob's client's own id (no file write)
        os.environ["SKYPILOT_API_SERVER_ENDPOINT"] = lab.url
        from sky.server.requests import payloads

        from tests.raw_request import body_for as build

        doc = build("/jobs/launch", CLEAN, None)
        env = payloads.request_body_env_vars()
        return {"user": env.get("SKYPILOT_USER"), "doc": {**doc, "env_vars": env}}

    made = as_account("bob", run)
    assert made["user"] == "alice"  # the stock client sends what the environment says
    _refused(_send("bob", lab.url, "/jobs/launch", made["doc"]), "from alice", "account bob")


# ---------------------------------------------------------------------------------------------
# 2. Owners act on their own things


def _cluster_op(path: str, cluster: str) -> dict[str, Any]:
    from sky.server.requests import payloads

    model: Any
    if path == "/autostop":
        model = payloads.AutostopBody(cluster_name=cluster, idle_minutes=1)
    elif path == "/cancel":
        model = payloads.CancelBody(cluster_name=cluster, job_ids=None, all=True)
    elif path == "/logs":
        model = payloads.ClusterJobBody(cluster_name=cluster, job_id=None, follow=False)
    else:
        model = payloads.StopOrDownBody(cluster_name=cluster)
    return _body(model)


@pytest.mark.parametrize("path", ["/down", "/stop", "/autostop", "/cancel", "/logs"])
@pytest.mark.parametrize("claim", [{}, {"SKYPILOT_USER_ID": user_id_for("alice")}])
def test_bob_cannot_act_on_alices_session(lab: Box, path: str, claim: dict[str, str]) -> None:
    doc = _cluster_op(path, "alice-dev")
    doc["env_vars"].update(claim)
    _refused(_send("bob", lab.url, path, doc), "cluster alice-dev belongs to alice", "bob may not")


@pytest.mark.parametrize(
    "how",
    [
        {"job_ids": [ALICE_JOB]},
        {"job_ids": [ALICE_JOB], "env": {"SKYPILOT_USER_ID": user_id_for("alice")}},
        {"name": "alice-train"},
        {"all_users": True},
    ],
    ids=["by-id", "by-id-with-her-user-id", "by-name", "all-users"],
)
def test_bob_cannot_cancel_alices_managed_job(lab: Box, how: dict[str, Any]) -> None:
    from sky.server.requests import payloads

    fields = {k: v for k, v in how.items() if k != "env"}
    doc = _body(payloads.JobsCancelBody(**fields))
    doc["env_vars"].update(how.get("env", {}))
    detail = _refused(_send("bob", lab.url, "/jobs/cancel", doc), "bob may not")
    assert ("belongs to alice" in detail) or ("every user's" in detail)


def test_bob_cannot_read_alices_job_logs(lab: Box) -> None:
    from sky.server.requests import payloads

    doc = _body(payloads.JobsLogsBody(job_id=ALICE_JOB, follow=False))
    _refused(_send("bob", lab.url, "/jobs/logs", doc), "managed job 1 belongs to alice")


def test_an_admin_group_member_may_act_on_others_things(lab: Box) -> None:
    """Past the guard: SkyPilot takes the requests (what they then do is SkyPilot's)."""
    from sky.server.requests import payloads

    answer = _send(ADMIN, lab.url, "/autostop", _cluster_op("/autostop", "alice-dev"))
    assert answer["http"] == 200 and answer["request_id"], answer
    doc = _body(payloads.JobsCancelBody(job_ids=[BOB_JOB]))
    answer = _send(ADMIN, lab.url, "/jobs/cancel", doc)
    assert answer["http"] == 200 and answer["request_id"], answer


def test_the_owner_cancels_her_own_job(lab: Box) -> None:
    """alice, whatever id her client sends, cancels her job; bob's is untouched."""
    from sky.jobs import state  # noqa: F401 - the server's records, read through HTTP below
    from sky.server.requests import payloads

    doc = _body(payloads.JobsCancelBody(job_ids=[ALICE_JOB]))
    doc["env_vars"]["SKYPILOT_USER_ID"] = "ffffffff"  # a reinstalled SkyPilot's new id
    answer = _send("alice", lab.url, "/jobs/cancel", doc, wait_s=180)
    assert answer["http"] == 200, answer
    assert answer.get("error_type") != "UserRequestRejectedByPolicy", answer
    assert "deskgpu guard" not in str(answer.get("error")), answer


# ---------------------------------------------------------------------------------------------
# 3. A trusted front end acts for the researcher it names, and only for a real one


def test_a_trusted_frontend_naming_alice_gets_alices_shaping(lab: Box) -> None:
    doc = _launch_doc("/validate", "alice-tl", SKYPILOT_USER="alice", SKYPILOT_USER_ID="tl000001")
    answer = _send(FRONTEND, lab.url, "/validate", doc)
    assert answer["http"] == 200, answer  # passed the house rules as alice
    # Its own cluster names (`<task>-<8 hex of its job id>`) are accepted as they are.
    doc = _launch_doc("/validate", "finetune-demo-5d0e9df8", SKYPILOT_USER="alice")
    answer = _send(FRONTEND, lab.url, "/validate", doc)
    assert answer["http"] == 200, answer
    # The same from an ordinary account keeps the rule.
    doc = _launch_doc("/validate", "finetune-demo-5d0e9df8")
    answer = _send("alice", lab.url, "/validate", doc)
    assert "does not start with alice-" in str(answer.get("detail")), answer


@pytest.mark.parametrize(
    ("named", "why"),
    [("root", "is root"), ("nobody", "system account"), ("no-such-person", "not an account")],
)
def test_a_trusted_frontend_cannot_name_root_a_system_or_unknown_account(
    lab: Box, named: str, why: str
) -> None:
    doc = _launch_doc("/validate", f"{named}-tl", SKYPILOT_USER=named)
    _refused(_send(FRONTEND, lab.url, "/validate", doc), f"front end {FRONTEND}", why)


def test_a_frontend_gets_the_researchers_rights_not_an_admins(lab: Box) -> None:
    from sky.server.requests import payloads

    doc = _body(payloads.JobsCancelBody(job_ids=[BOB_JOB]))
    doc["env_vars"]["SKYPILOT_USER"] = "alice"
    _refused(_send(FRONTEND, lab.url, "/jobs/cancel", doc), "belongs to bob", "alice (via")


def test_an_ordinary_account_cannot_act_as_a_frontend(lab: Box) -> None:
    doc = _launch_doc("/validate", "alice-tl", SKYPILOT_USER="alice")
    _refused(_send("bob", lab.url, "/validate", doc), "from alice")


# ---------------------------------------------------------------------------------------------
# 4. The guard says so, and a missing host config refuses everything


def test_the_guard_status_says_who_is_trusted(lab: Box) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{lab.url}/plugins/api/deskgpu/guard", timeout=30) as response:
        status = json.loads(response.read())
    assert status["identity"] == "bound to the connecting Unix account"
    assert status["trusted_frontends"] == [FRONTEND]
    assert status["host_config_error"] is None
    # The doctor fixtures carry this answer (tests/fixtures/doctor/*.json `sky.guard`).
    fixture = json.loads((FIXTURES / "healthy-4x-a6000.json").read_text())
    recorded = json.loads(fixture["sky"]["guard"]["body"])
    assert sorted(recorded) == sorted(status)
    assert recorded["request_env_allowed"] == status["request_env_allowed"]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="SkyPilot's jobs launch needs rsync")
def test_a_researchers_compliant_managed_job_gets_past_the_controller(lab: Box) -> None:
    """Submitted by alice's own account: the controller's relaunch keeps her as the owner."""
    doc = _launch_doc("/jobs/launch", None)
    answer = _send("alice", lab.url, "/jobs/launch", doc, wait_s=240)
    assert answer["http"] == 200, answer
    assert answer["status"] == "SUCCEEDED", answer
    deadline = time.monotonic() + 240
    text = ""
    while time.monotonic() < deadline:
        logs = (lab.home / "sky_logs" / "jobs_controller").glob("[0-9]*.log")
        newest = max(logs, key=lambda p: int(p.stem), default=None)  # the job just launched
        text = newest.read_text(errors="replace") if newest else ""
        if "NoCloudAccessError" in text or "UserRequestRejectedByPolicy" in text:
            break
        time.sleep(2)
    assert "UserRequestRejectedByPolicy" not in text, text[-3000:]
    assert "NoCloudAccessError" in text, text[-3000:]


def test_without_its_host_config_the_server_refuses_every_request(lab: Box) -> None:
    """Moved away while the server runs: the guard reads the file per request."""
    moved = lab.host_config.with_suffix(".away")
    lab.host_config.rename(moved)
    try:
        for account in ("alice", "root"):
            doc = _launch_doc("/validate", f"{account}-x")
            answer = _send(account, lab.url, "/validate", doc)
            detail = _refused(answer, str(lab.host_config), "is missing", "empty file")
            assert detail.count(str(lab.host_config)) == 1
        import urllib.request

        with urllib.request.urlopen(f"{lab.url}/plugins/api/deskgpu/guard", timeout=30) as r:
            status = json.loads(r.read())
        assert "is missing" in str(status["host_config_error"])
        # What a researcher sees from deskgpu itself: the server's one line, exit 1.
        said = _deskgpu_as("alice", lab, "logs", "alice-train", "--no-follow")
        assert said["code"] == 1, said
        assert "refused" in said["stderr"] and "is missing" in said["stderr"], said
    finally:
        moved.rename(lab.host_config)
    answer = _send("alice", lab.url, "/validate", _launch_doc("/validate", "alice-back"))
    assert answer["http"] == 200, answer


# ---------------------------------------------------------------------------------------------
# 5. deskgpu's own commands still work, for a researcher and for root


def _deskgpu_as(account: str, lab: Box, *args: str) -> dict[str, Any]:
    """`deskgpu ARGS` in-process, in a child running as `account` with a HOME of its own."""
    import pwd
    import tempfile

    from typer.testing import CliRunner

    from deskgpu.cli import app

    home = Path(tempfile.mkdtemp(prefix=f"deskgpu-{account}-", dir="/tmp"))
    config = home / "host-config.yaml"
    config.write_text(f"api_server: {lab.url}\nstate_dir: {home}/state\n")
    entry = pwd.getpwnam(account)
    for path in (home, config):
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def run() -> dict[str, Any]:
        env = {
            "HOME": str(home),
            "DESKGPU_CONFIG": str(config),
            "SKYPILOT_API_SERVER_ENDPOINT": lab.url,
            "SKYPILOT_USER_ID": "c0ffee00",  # the client's own id, whatever the server binds
            "COLUMNS": "120",
        }
        result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
        return {"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}

    try:
        return as_account(account, run) if account != "root" else run()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_deskgpu_queue_and_logs_work_for_a_researcher_and_root(lab: Box) -> None:
    for account in ("bob", "root"):
        queue = _deskgpu_as(account, lab, "queue", "--json")
        assert queue["code"] == 0, queue
        jobs = json.dumps(json.loads(queue["stdout"]))
        assert "bob-train" in jobs and "alice-dev" in jobs, jobs[:2000]
    mine = _deskgpu_as("bob", lab, "logs", "bob-train", "--no-follow")
    assert mine["code"] == 0, mine
    assert "managed job 2 bob-train" in mine["stderr"]
    theirs = _deskgpu_as("bob", lab, "cancel", "alice-dev")
    assert theirs["code"] == 2 and "alice" in theirs["stderr"], theirs
    assert "Traceback" not in theirs["stderr"]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="SkyPilot's jobs launch needs rsync")
def test_deskgpu_submit_works_for_a_researcher(lab: Box) -> None:
    """The stock SDK inside `deskgpu submit`, from root's account and then bob's: each
    queued as its own. (Root's run first also loads every module the command needs: bob's
    child cannot import more from a Python under root's 0700 home.)"""
    spec = Path("/tmp") / f"deskgpu-spec-{os.getpid()}.yaml"
    spec.write_text("name: cpu-job\ngpus: 0\nrun: echo hi\n")
    spec.chmod(0o644)
    try:
        # --wait 300: on a loaded machine the prechecks' verdict can take a minute.
        as_root = _deskgpu_as("root", lab, "submit", str(spec), "--json", "--wait", "300")
        as_bob = _deskgpu_as("bob", lab, "submit", str(spec), "--json", "--wait", "300")
    finally:
        spec.unlink()
    # No Kubernetes here: each job is taken under its submitter's name, then fails SkyPilot's
    # prechecks (no infrastructure), which submit watches for and reports, exit 1.
    for who, submitted in (("root", as_root), ("bob", as_bob)):
        assert submitted["code"] == 1, submitted
        assert submitted["stdout"] == "", submitted
        assert f" {who}-cpu-job failed before it started (FAILED_PRECHECKS)" in str(
            submitted["stderr"]
        ), submitted
        assert "no infrastructure enabled" in str(submitted["stderr"]), submitted


# ---------------------------------------------------------------------------------------------
# 6. Transformer Lab's recorded traffic, replayed (tests/fixtures/transformerlab)


def test_a_replayed_transformer_lab_launch_runs_as_the_researcher_it_names(lab: Box) -> None:
    """Sent from the `transformerlab` account: past the house rules as alice (no Kubernetes
    here, so provisioning is as far as it gets), with her id, whatever the provider's id."""
    from tests.tlrecording import as_0_14, recorded, recorded_headers

    body = as_0_14("/launch", recorded("/launch")[0])
    assert body["env_vars"]["SKYPILOT_USER"] == "alice"
    assert body["env_vars"]["SKYPILOT_USER_ID"] == "alice123"  # one per provider, not hers
    headers = recorded_headers("/launch")
    answer = _send(FRONTEND, lab.url, "/launch", body, wait_s=240, headers=headers)
    assert answer["http"] == 200, answer
    assert answer["error_type"] != "UserRequestRejectedByPolicy", answer
    # Past the policy, SkyPilot goes on: with the box's rendered catalog (which has no H100)
    # it asks the missing cluster for the GPU (ClusterStatusFetchingError) or finds no cloud
    # access; without a catalog and network, the catalog fetch fails. All after the rules.
    assert answer["error_type"] in (
        "NoCloudAccessError",
        "ConnectionError",
        "ClusterStatusFetchingError",
    ), answer
    if answer["error_type"] == "ConnectionError":
        assert "catalog" in answer["error"].lower(), answer
    assert answer["user_id"] == user_id_for("alice"), answer  # hers, not the provider's
    log = (lab.home / "api-server.log").read_text(errors="replace")
    assert "TFL_STORAGE_URI" not in log and "27016375-324b" not in log  # task envs never logged
    # The guard noted the SkyPilot client Transformer Lab speaks (doctor checks the range).
    import urllib.request

    with urllib.request.urlopen(f"{lab.url}/plugins/api/deskgpu/guard", timeout=30) as r:
        status = json.loads(r.read())
    seen = status["frontend_clients"][FRONTEND]
    assert (seen["api_version"], seen["version"]) == ("48", "0.12.1")
    from sky.server import constants

    assert status["server_api"] == {
        "api_version": constants.API_VERSION,
        "min_compatible_api_version": constants.MIN_COMPATIBLE_API_VERSION,
    }


def test_the_same_transformer_lab_body_from_an_ordinary_account_is_refused(lab: Box) -> None:
    from tests.tlrecording import as_0_14, recorded

    body = as_0_14("/launch", recorded("/launch")[0])
    _refused(_send("bob", lab.url, "/launch", body), "from alice", "Unix account bob")


# Transformer Lab's rule (api/transformerlab/services/remote_job_status_service.py, quoted
# in docs/transformerlab.md): every poll whose job list is empty (a cluster that is not up yet
# counts) adds one to a counter; `counter >= EMPTY_PROVIDER_JOBS_TERMINAL_THRESHOLD` ends the
# job, FAILED when it was never seen. Polls are REMOTE_JOB_STATUS_INTERVAL_SECONDS apart.
TL_DEFAULTS = {
    "EMPTY_PROVIDER_JOBS_TERMINAL_THRESHOLD": 15,
    "REMOTE_JOB_STATUS_INTERVAL_SECONDS": 15,
}


def _tl_status_after(polls_empty: int, settings: dict[str, int]) -> str:
    for empty in range(1, polls_empty + 1):  # the counter after each empty poll
        if empty >= settings["EMPTY_PROVIDER_JOBS_TERMINAL_THRESHOLD"]:
            return "FAILED"
    return "LAUNCHING"


def test_transformer_lab_polls_of_a_held_job_and_its_rule(lab: Box) -> None:
    """The replayed `POST /queue {cluster_name, all_users: false}` of a session that waits for
    GPUs (INIT): SkyPilot answers that the cluster is not up, which Transformer Lab counts as
    an empty poll. SkyPilot's answer is left as it is; the doc's settings keep the job
    LAUNCHING for as long as a wait on the box can take."""
    import re

    from tests.jobstate import TL_CLUSTER
    from tests.tlrecording import as_0_14, recorded

    poll = recorded("/queue")[0]
    assert poll["cluster_name"] == TL_CLUSTER and poll["all_users"] is False
    answer = _send(FRONTEND, lab.url, "/queue", as_0_14("/queue", poll), wait_s=120)
    assert answer["http"] == 200, answer  # past the guard: alice's own session
    assert answer["status"] == "FAILED", answer
    assert answer["error_type"] == "ClusterNotUpError", answer  # an empty poll to Transformer Lab
    assert "status: INIT" in answer["error"] and "only allowed for UP" in answer["error"]
    doc = (Path(__file__).parent.parent / "docs" / "transformerlab.md").read_text()
    settings = {
        key: int(re.search(rf"{key}=(\d+)", doc).group(1))  # type: ignore[union-attr]
        for key in TL_DEFAULTS
    }
    two_weeks = 14 * 86400 // settings["REMOTE_JOB_STATUS_INTERVAL_SECONDS"]
    assert _tl_status_after(2 * 3600 // 15, TL_DEFAULTS) == "FAILED"  # 225 s, then FAILED
    assert _tl_status_after(two_weeks, settings) == "LAUNCHING"


# ---------------------------------------------------------------------------------------------
# 7. What an attacker's review got past the guard once (each held now)


@pytest.mark.parametrize(
    ("path", "fields", "says"),
    [
        ("/internal/dashboard/jobs/cancel", {"job_ids": [ALICE_JOB]}, "belongs to alice"),
        ("/internal/dashboard/jobs/logs", {"job_id": ALICE_JOB, "follow": False}, "alice"),
        ("/jobs/cancel", {"job_ids": [1.0]}, "whole numbers"),
        ("/jobs/cancel", {"job_ids": ["+1"]}, "whole numbers"),
        ("/jobs/cancel", {"job_ids": [True]}, "whole numbers"),
        ("/internal/dashboard/storage/delete", {"name": "x"}, "storage bucket"),
    ],
    ids=["dashboard-prefix-cancel", "dashboard-prefix-logs", "float-id", "plus-id", "bool-id",
         "dashboard-prefix-storage"],
)  # fmt: skip
def test_spellings_skypilot_reads_the_same_are_judged_the_same(
    lab: Box, path: str, fields: dict[str, Any], says: str
) -> None:
    doc: dict[str, Any] = {"env_vars": {}, **fields}
    _refused(_send("bob", lab.url, path, doc), says)


def test_a_dashboard_prefixed_down_of_alices_session_is_refused(lab: Box) -> None:
    doc = _cluster_op("/down", "alice-dev")
    _refused(_send("bob", lab.url, "/internal/dashboard/down", doc), "belongs to alice")


# ---- the second review: keys in /status, websockets, others' requests ----------------------


def _get(account: str, url: str) -> dict[str, Any]:
    """A GET from `account`: its status and body."""

    def run() -> dict[str, Any]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return {"http": r.status, "body": r.read().decode("utf-8", "replace")}
        except urllib.error.HTTPError as exc:
            return {"http": exc.code, "body": exc.read().decode("utf-8", "replace")}

    return as_account(account, run)


def test_status_hands_out_no_one_elses_ssh_key(lab: Box) -> None:
    """SkyPilot's `/status` defaults to every user's clusters with their ssh private keys."""
    from sky.server.requests import payloads

    answer = _send("bob", lab.url, "/status", _body(payloads.StatusBody()), wait_s=120)
    assert answer["status"] == "SUCCEEDED", answer
    got = _get("bob", f"{lab.url}/api/get?request_id={answer['request_id']}")
    assert got["http"] == 200
    assert "alice-dev" not in got["body"] and "bob-dev" in got["body"]


def test_a_websocket_into_alices_session_is_refused(lab: Box) -> None:
    """`ssh alice-dev` goes through SkyPilot's websocket SSH proxy: the guard binds it too."""
    import socket

    host, port = lab.url.removeprefix("http://").split(":")

    def upgrade(cluster: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(
                    (
                        f"GET /kubernetes-pod-ssh-proxy?cluster_name={cluster}&no_redirect=1 "
                        f"HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n"
                    ).encode()
                )
                return {"line": sock.recv(4096).split(b"\r\n", 1)[0].decode()}

        return as_account("bob", run)

    assert " 403 " in upgrade("alice-dev")["line"] + " "
    assert " 101 " in upgrade("bob-dev")["line"] + " "  # his own: the proxy answers


def test_another_users_requests_cannot_be_read_or_listed(lab: Box) -> None:
    from sky.server.requests import payloads

    hers = _send("alice", lab.url, "/status", _body(payloads.StatusBody(all_users=False)))
    request_id = hers["request_id"]
    for rid in (request_id, request_id[:8]):
        for route in ("/api/get", "/api/stream"):
            got = _get("bob", f"{lab.url}{route}?request_id={rid}&follow=false")
            assert got["http"] == 403 and "not one of bob's" in got["body"], (route, got)
    assert _get("alice", f"{lab.url}/api/get?request_id={request_id}")["http"] == 200
    listing = _get("bob", f"{lab.url}/api/status?all_status=true")
    assert listing["http"] == 200 and request_id not in listing["body"]
    assert _get("carol", f"{lab.url}/api/status?all_status=true")["body"].count(request_id) == 1
    latest = _get("bob", f"{lab.url}/api/stream?follow=false")
    assert latest["http"] == 403 and "request_id" in latest["body"]
