"""The queue through the guard's endpoint (`GET /plugins/api/deskgpu/queue`, issue #30): the same
queue as SkyPilot's own two requests, for the same state and the same caller, and nothing a
caller may not see.

One real API server for the module, started from the files `deskgpu setup render` writes
(tests/test_hardening_server.py), plus a private workspace only alice may read and SkyPilot's
`rbac.default_role: user` (without it every account is a SkyPilot admin and reads every
workspace). Its sessions and managed jobs were written by SkyPilot's own state functions
before it started (tests/jobstate.py `--queue alice bob`): alice's and bob's sessions, a
session Transformer Lab launched for alice, pending, finished and failed jobs of both, an
autodown, and alice's session and job in the private workspace. Every read is sent by a child
process running as that Unix account (tests/asuser.py), so the guard binds it as on the box.

An older guard (no endpoint) and a newer one (another version) are a small proxy in front of
the same server that answers the endpoint as they would and passes everything else on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgpu.skypilot import guardqueue
from tests.accounts import ADMIN_GROUP, FRONTEND, ensure_accounts
from tests.apiserver import free_port, running_api_server
from tests.asuser import as_account
from tests.conftest import ROOT
from tests.jobstate import PRIVATE_WORKSPACE, TL_CLUSTER, TL_JOB
from tests.test_hardening_server import Box, _rendered

DESKGPU = str(Path(sys.executable).with_name("deskgpu"))
EXTRA = f"admin_group: {ADMIN_GROUP}\ntrusted_frontends: [{FRONTEND}]\n"
SECRETS = ("ssh_private_key", "PRIVATE KEY", "credentials", "handle", "last_creation", "last_use")


# ---------------------------------------------------------------------------------------------
# The wire shape and the bounded read, without a server


def test_the_answer_carries_only_the_queue_fields_and_says_where_it_stops(monkeypatch) -> None:
    monkeypatch.setattr(guardqueue, "MAX_RECORDS", 2)
    cluster = {f: f"x-{f}" for f in guardqueue.CLUSTER_FIELDS}
    read = guardqueue.Read(
        clusters=[{**cluster, "handle": "pickled", "credentials": {"ssh_private_key": "k"}}] * 3,
        clusters_total=3,
        jobs=[
            {"job_id": 1, "task_id": 0, "status": "RUNNING", "user_yaml": "run: secret"},
            {"job_id": 1, "task_id": 1, "status": "PENDING"},  # a job's second task
            {"job_id": 2, "task_id": 0, "status": "SUCCEEDED"},
        ],
        jobs_total=2,
    )
    doc = guardqueue.answer(read, "alice")
    assert doc["kind"] == guardqueue.KIND and doc["version"] == guardqueue.VERSION
    assert doc["caller"] == "alice"
    assert [sorted(c) for c in doc["clusters"]] == [sorted(guardqueue.CLUSTER_FIELDS)] * 2
    assert [(j["job_id"], j["task_id"]) for j in doc["jobs"]] == [(1, 0), (1, 1), (2, 0)]
    assert doc["truncated"] == {"clusters": 3}  # both jobs fit; a third cluster did not
    assert not any(word in json.dumps(doc) for word in ("pickled", "ssh_private_key", "secret"))
    assert (
        guardqueue.records(doc) == "the guard's answer stops at 2 records of each kind (3 clusters)"
    )


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"detail": "Not Found"}, "not the guard's queue"),
        ({"kind": guardqueue.KIND, "version": 2, "clusters": [], "jobs": []}, "version 2"),
        (
            {"kind": guardqueue.KIND, "version": guardqueue.VERSION, "clusters": {}, "jobs": []},
            "malformed",
        ),
    ],
    ids=["not-the-guard", "another-version", "malformed"],
)
def test_an_answer_the_client_cannot_use_says_why(doc: dict[str, Any], why: str) -> None:
    reason = guardqueue.records(doc)
    assert isinstance(reason, str) and why in reason


def test_a_slow_read_is_answered_503_and_never_holds_the_event_loop() -> None:
    """The read blocks its thread well past the timeout; meanwhile the loop keeps serving."""
    release = threading.Event()

    def stuck() -> guardqueue.Read:
        release.wait(30)
        return guardqueue.Read()

    async def main() -> tuple[tuple[int, dict[str, Any]], int]:
        ticks = 0

        async def other_requests() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beside = asyncio.create_task(other_requests())
        answered = await guardqueue.serve(stuck, "bob", timeout_s=0.3)
        beside.cancel()
        return answered, ticks

    try:
        (status, doc), ticks = asyncio.run(main())
    finally:
        release.set()
    assert status == 503 and "within 0.3 s" in doc["detail"], doc
    assert ticks > 1  # the loop ran other work while the read was stuck


def test_a_failed_read_is_one_line_not_a_traceback() -> None:
    def broken() -> guardqueue.Read:
        raise RuntimeError("database is locked\nTraceback (most recent call last): ...")

    def elsewhere() -> guardqueue.Read:
        raise guardqueue.Unavailable(501, "not in consolidation mode")

    status, doc = asyncio.run(guardqueue.serve(broken, "bob"))
    assert status == 500 and "Traceback" not in json.dumps(doc) and "see the log" in doc["detail"]
    assert asyncio.run(guardqueue.serve(elsewhere, "bob")) == (
        501,
        {"detail": "not in consolidation mode"},
    )


def test_a_connection_the_guard_did_not_bind_is_refused() -> None:
    """A SkyPilot controller's connection passes the guard unbound: it gets no queue."""
    from fastapi import Request

    from deskgpu import policy

    scope = {"type": "http", "method": "GET", "path": guardqueue.ROUTE, "headers": []}
    response = asyncio.run(policy.queue_endpoint(Request(scope)))
    assert response.status_code == 403
    assert b"bound" in response.body


# ---------------------------------------------------------------------------------------------
# On a real server


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    ensure_accounts()
    tmp = tmp_path_factory.mktemp("guard-queue")
    port = free_port()
    home, env, host_config = _rendered(tmp, port, guard=True, extra=EXTRA)
    sky_config = home / ".sky" / "config.yaml"
    doc = yaml.safe_load(sky_config.read_text())
    doc["workspaces"] = {PRIVATE_WORKSPACE: {"private": True, "allowed_users": ["alice"]}}
    doc["rbac"] = {"default_role": "user"}
    sky_config.write_text(yaml.safe_dump(doc))
    subprocess.run(
        [sys.executable, "-m", "tests.jobstate", "--queue", "alice", "bob"],
        env={
            "HOME": str(home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
            "PYTHONPATH": str(ROOT),
        },
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=180,
    )
    with running_api_server(
        home, deploy=True, port=port, extra_env={**env, "SKYPILOT_API_SERVER_ENDPOINT": None}
    ) as url:
        yield Box(url, home, host_config, user="alice")


def _read_queue(url: str, via: str | None) -> dict[str, Any]:
    """`fetch_queue` in this process (a child running as some account): the SkyView as data."""
    from deskgpu.config import HostConfig
    from deskgpu.skypilot import sdk

    os.environ["SKYPILOT_API_SERVER_ENDPOINT"] = url
    os.environ["SKYPILOT_USER_ID"] = "c0ffee00"  # the client's own id, whatever the guard binds
    os.environ.pop(sdk.QUEUE_VIA_ENV, None)
    if via is not None:
        os.environ[sdk.QUEUE_VIA_ENV] = via
    view = sdk.fetch_queue(HostConfig(api_server=url), timeout_s=240)
    return dataclasses.asdict(view)


def _queue_as(account: str, url: str, via: str | None = None) -> dict[str, Any]:
    from deskgpu import identity, snapshot  # noqa: F401 - loaded before the child drops root
    from deskgpu.skypilot import sdk  # noqa: F401

    if account == "root":
        return _read_queue(url, via)
    return as_account(account, lambda: _read_queue(url, via))


def _get_as(account: str, url: str) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(url + guardqueue.ROUTE, timeout=120) as r:
                return {"http": r.status, "body": r.read().decode()}
        except urllib.error.HTTPError as exc:
            return {"http": exc.code, "body": exc.read().decode()}

    return run() if account == "root" else as_account(account, run)


def _by_name(view: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {c["name"]: c for c in view["clusters"]}, {j["name"]: j for j in view["jobs"]}


@pytest.mark.parametrize("account", ["alice", "bob"])
def test_the_guard_answers_the_queue_skypilots_two_requests_answer(lab: Box, account: str) -> None:
    through_guard = _queue_as(account, lab.url)
    from_skypilot = _queue_as(account, lab.url, via="skypilot")
    assert through_guard["via"] == "guard" and through_guard["fallback"] is None, through_guard
    assert from_skypilot["via"] == "skypilot", from_skypilot
    for view in (through_guard, from_skypilot):
        assert view["available"] and not view["notes"] and view["error"] is None, view
    assert through_guard["clusters"] == from_skypilot["clusters"]
    assert through_guard["jobs"] == from_skypilot["jobs"]
    # ... and it is the whole queue: everyone's sessions and jobs, in every state written.
    clusters, jobs = _by_name(through_guard)
    assert {"alice-dev", "bob-dev", TL_CLUSTER} <= set(clusters)
    dev = clusters["alice-dev"]
    assert (dev["user"], dev["state"], dev["autostop_min"], dev["to_down"]) == (
        "alice",
        "Running",
        60,
        True,
    )
    tl = clusters[TL_CLUSTER]  # Transformer Lab's, for alice, still waiting
    assert (tl["user"], tl["state"], tl["labels"]["deskgpu.io/frontend-job"]) == (
        "alice",
        "Starting",
        TL_JOB,
    )
    assert (jobs["bob-train"]["user"], jobs["bob-train"]["state"]) == ("bob", "Queued")
    assert jobs["alice-train"]["reason"]  # why it waits, in SkyPilot's words
    done = jobs["alice-done"]
    assert done["state"] == "Done" and done["started_at"] and done["ended_at"], done
    failed = jobs["bob-oom"]
    assert (failed["state"], failed["reason"]) == ("Failed", "setup exited with 1")
    # The private workspace is alice's to read, on either path.
    theirs = {"alice-secret"} <= set(clusters) and {"alice-secret-train"} <= set(jobs)
    assert theirs == (account == "alice"), (sorted(clusters), sorted(jobs))


def test_the_answer_holds_no_handle_key_yaml_or_command(lab: Box) -> None:
    """Not for another's cluster, and not for the caller's own: the queue needs none."""
    for account in ("alice", "bob"):
        got = _get_as(account, lab.url)
        assert got["http"] == 200, got
        doc = json.loads(got["body"])
        assert doc["caller"] == account
        for cluster in doc["clusters"]:
            assert set(cluster) <= set(guardqueue.CLUSTER_FIELDS), cluster
        for job in doc["jobs"]:
            assert set(job) <= set(guardqueue.JOB_FIELDS), job
        assert not [word for word in SECRETS if word in got["body"]], got["body"][:2000]
        assert str(lab.home) not in got["body"]  # no path on the server (cluster YAMLs, keys)


def test_a_frontend_and_root_see_what_their_accounts_may(lab: Box) -> None:
    """A trusted front end's own read is no researcher's: the public workspaces only. Root
    (and the server's account), the box's administrators, read every workspace: reap and
    observe run as root and must see every session."""
    frontend = json.loads(_get_as(FRONTEND, lab.url)["body"])
    assert frontend["caller"] == FRONTEND
    names = {c["name"] for c in frontend["clusters"]}
    assert {"alice-dev", "bob-dev"} <= names and "alice-secret" not in names
    root = json.loads(_get_as("root", lab.url)["body"])
    assert "alice-secret" in {c["name"] for c in root["clusters"]}
    assert "alice-secret-train" in {j["job_name"] for j in root["jobs"]}


def test_logs_and_cancel_find_names_through_the_guard(lab: Box) -> None:
    """The name lookup reads the same queue: alice's private job is hers to name, and does
    not exist for bob (who is told only of his own)."""
    from tests.test_identity_server import _deskgpu_as

    hers = _deskgpu_as("alice", lab, "logs", "secret-train", "--no-follow")
    assert hers["code"] == 0, hers
    assert "alice-secret-train (queued)" in hers["stderr"]
    his = _deskgpu_as("bob", lab, "cancel", "alice-secret-train")
    assert his["code"] == 2, his
    assert "is yours" in his["stderr"] and "secret" not in his["stderr"].split("yours:")[-1]
    assert "Traceback" not in his["stderr"]


def test_without_its_host_config_the_endpoint_refuses_like_every_request(lab: Box) -> None:
    moved = lab.host_config.with_suffix(".away")
    lab.host_config.rename(moved)
    try:
        got = _get_as("alice", lab.url)
        assert got["http"] == 403 and "is missing" in got["body"], got
        view = _queue_as("alice", lab.url)  # the fallback is refused the same way: one line
        assert not view["available"] and "is missing" in view["error"], view
    finally:
        moved.rename(lab.host_config)


# ---------------------------------------------------------------------------------------------
# A newer deskgpu and an older guard


class _Proxy(http.server.ThreadingHTTPServer):
    upstream: str
    endpoint_answer: tuple[int, dict[str, Any]]


class _Forward(http.server.BaseHTTPRequestHandler):
    server: _Proxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _relay(self) -> None:
        if self.path.split("?", 1)[0] == guardqueue.ROUTE:
            status, doc = self.server.endpoint_answer
            self._send(status, [("content-type", "application/json")], json.dumps(doc).encode())
            return
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        host, port = self.server.upstream.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=240)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            conn.request(self.command, self.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            kept = [
                (k, v)
                for k, v in answer.getheaders()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            ]
            self._send(answer.status, kept, data)
        finally:
            conn.close()

    def _send(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _relay


@contextlib.contextmanager
def _guard_answering(upstream: str, status: int, doc: dict[str, Any]) -> Iterator[str]:
    proxy = _Proxy(("127.0.0.1", 0), _Forward)
    proxy.upstream, proxy.endpoint_answer = upstream, (status, doc)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}"
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join()


OLDER = (404, {"detail": "Not Found"})  # FastAPI's answer for a route the guard lacks
NEWER = (
    200,
    {"kind": guardqueue.KIND, "version": guardqueue.VERSION + 1, "clusters": [], "jobs": []},
)


def _deskgpu(hermetic, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=url, COLUMNS="120")
    return subprocess.run([DESKGPU, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("guard", "says"), [(OLDER, "HTTP 404"), (NEWER, "version 2")])
def test_an_older_or_newer_guard_gets_skypilots_two_requests_said_once_under_verbose(
    lab: Box, hermetic, guard: tuple[int, dict[str, Any]], says: str
) -> None:
    direct = _deskgpu(hermetic, lab.url, "queue", "--json", "--timeout", "240")
    assert direct.returncode == 0, direct.stderr
    with _guard_answering(lab.url, *guard) as url:
        quiet = _deskgpu(hermetic, url, "queue", "--json", "--timeout", "240")
        told = _deskgpu(hermetic, url, "queue", "--json", "--verbose", "--timeout", "240")
    for done in (quiet, told):
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    expected = json.loads(direct.stdout)["sky"]
    for done in (quiet, told):
        sky = json.loads(done.stdout)["sky"]
        assert sky["via"] == "skypilot" and says in sky["fallback"], sky
        assert (sky["clusters"], sky["jobs"]) == (expected["clusters"], expected["jobs"])
    assert expected["via"] == "guard"
    assert "/jobs/queue/v2" not in quiet.stderr
    (line,) = [ln for ln in told.stderr.splitlines() if "SkyPilot: read" in ln]
    assert "SkyPilot's own /status and /jobs/queue/v2" in line and says in line, told.stderr


def test_watch_says_how_it_read_once(lab: Box, hermetic) -> None:
    with _guard_answering(lab.url, *OLDER) as url:
        env = hermetic.subprocess_env(SKYPILOT_API_SERVER_ENDPOINT=url)
        done = subprocess.run(
            [
                "sh",
                "-c",
                f"'{DESKGPU}' queue --watch --json --verbose --interval 1 --timeout 240 | head -3",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(docs) == 3 and all(d["sky"]["via"] == "skypilot" for d in docs), done.stderr
    assert done.stderr.count("SkyPilot: read with SkyPilot's own") == 1, done.stderr
