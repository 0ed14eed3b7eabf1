"""The guard's identity binding and owner rule without a server (the server tests are in
tests/test_identity_server.py): the account on the connection decides, and owners act on
their own things."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from typing import Any

import pytest

from deskgpu import callers, hardening, owners
from deskgpu.callers import FRONTEND, ROOT, SERVER, USER, Acting, Caller, Refused, bind
from deskgpu.hardening import GuardMiddleware, GuardSettings


def _user(name: str = "bob", groups: frozenset[str] = frozenset()) -> Caller:
    return Caller(uid=54321, account=name, role=USER, groups=groups)


def test_the_user_id_is_skypilots_auth_proxy_derivation() -> None:
    """sky/server/server.py `_extract_user_from_header`: md5 of the name, 8 hex digits."""
    import hashlib

    assert callers.user_id_for("alice") == hashlib.md5(b"alice").hexdigest()[:8]
    assert callers.user_id_for("alice") != callers.user_id_for("bob")
    assert hardening.USER_ID.fullmatch(callers.user_id_for("john.doe"))


def test_an_ordinary_account_runs_as_itself_whatever_id_it_sends() -> None:
    env: dict[str, object] = {"SKYPILOT_USER_ID": "a0000001", "SKYPILOT_CLIENT_USER_HASH": "x"}
    acting = bind(env, _user(), server_uid=999, admin_group=None)
    assert acting == Acting(_user(), "bob", admin=False)
    assert env == {"SKYPILOT_USER": "bob", "SKYPILOT_USER_ID": callers.user_id_for("bob")}


def test_naming_someone_else_is_refused_naming_both() -> None:
    with pytest.raises(Refused) as caught:
        bind({"SKYPILOT_USER": "alice"}, _user(), server_uid=999, admin_group=None)
    text = str(caught.value)
    assert "says it is from alice" in text and "Unix account bob" in text


def test_admin_group_membership_makes_an_admin_not_a_claim() -> None:
    member = _user(groups=frozenset({"gpuadmin"}))
    assert bind({}, member, server_uid=999, admin_group="gpuadmin").admin
    assert not bind({}, _user(), server_uid=999, admin_group="gpuadmin").admin
    assert not bind({}, member, server_uid=999, admin_group=None).admin


def test_root_and_the_server_are_taken_at_their_word() -> None:
    for role in (ROOT, SERVER):
        env: dict[str, object] = {"SKYPILOT_USER": "alice", "SKYPILOT_USER_ID": "a0000001"}
        acting = bind(env, Caller(0, "root", role), server_uid=999, admin_group=None)
        assert acting.user == "alice" and acting.admin
        assert env["SKYPILOT_USER_ID"] == "a0000001"


def test_a_frontend_must_name_a_real_ordinary_account() -> None:
    tl = Caller(uid=54322, account="transformerlab", role=FRONTEND)
    with pytest.raises(Refused, match="must name the researcher"):
        bind({}, tl, server_uid=999, admin_group=None)
    with pytest.raises(Refused, match="is root"):
        bind({"SKYPILOT_USER": "root"}, tl, server_uid=999, admin_group=None)
    with pytest.raises(Refused, match="not an account"):
        bind({"SKYPILOT_USER": "no-such-person-x"}, tl, server_uid=999, admin_group=None)
    system = next(p for p in pwd.getpwall() if 0 < p.pw_uid < callers.uid_min())
    with pytest.raises(Refused, match="system account"):
        bind({"SKYPILOT_USER": system.pw_name}, tl, server_uid=999, admin_group=None)


def test_a_frontend_never_gets_admin_rights() -> None:
    tl = Caller(54322, "transformerlab", FRONTEND, frozenset({"gpuadmin"}))
    server = pwd.getpwuid(os.geteuid()).pw_name
    with pytest.raises(Refused, match=r"API server's own account|is root"):
        bind({"SKYPILOT_USER": server}, tl, server_uid=os.geteuid(), admin_group="gpuadmin")


def test_uid_min_comes_from_login_defs(tmp_path: Any) -> None:
    defs = tmp_path / "login.defs"
    defs.write_text("# comment\nUID_MIN\t\t 2000\nUID_MAX 60000\n")
    assert callers.uid_min(defs) == 2000
    assert callers.uid_min(tmp_path / "missing") == 1000


# ---- the owner rule over recorded owners ---------------------------------------------------

RECORDS = owners.Lookups(
    cluster=lambda name: {"alice-dev": owners.Found("alice"), "orphan": owners.Found(None)}.get(
        name
    ),
    job=lambda job_id: {1: owners.Found("alice"), 2: owners.Found("bob")}.get(job_id),
    jobs_named=lambda name: {"alice-train": [1], "twin": [1, 2]}.get(name, []),
    volume=lambda name: {"alice-vol": owners.Found("alice")}.get(name),
)
BOB = Acting(_user(), "bob", admin=False)
ALICE = Acting(_user("alice"), "alice", admin=False)


@pytest.mark.parametrize("path", sorted(owners.CLUSTER_ACTIONS))
def test_every_cluster_action_is_the_owners(path: str) -> None:
    doc = {"cluster_name": "alice-dev"}
    why = owners.refusal(path, doc, BOB, RECORDS, admin_group="gpuadmin")
    assert why is not None and "belongs to alice" in why and "gpuadmin" in why
    assert owners.refusal(path, doc, ALICE, RECORDS) is None
    assert owners.refusal(path, {"cluster_name": "not-there"}, BOB, RECORDS) is None
    assert owners.refusal(path, {"cluster_name": "orphan"}, ALICE, RECORDS) is not None


def test_shared_logs_open_only_the_logs() -> None:
    for path, (_, reads_logs) in {**owners.CLUSTER_ACTIONS}.items():
        why = owners.refusal(path, {"cluster_name": "alice-dev"}, BOB, RECORDS, shared_logs=True)
        assert (why is None) is reads_logs, path


@pytest.mark.parametrize(
    ("doc", "refused"),
    [
        ({"job_ids": [1]}, True),
        ({"job_ids": ["1"]}, True),
        ({"job_ids": [2]}, False),
        ({"name": "alice-train"}, True),
        ({"name": "twin"}, True),
        ({"all": True}, False),
        ({"all_users": True}, True),
        ({"pool": "p"}, True),
        ({"job_ids": [99]}, False),
    ],
)
def test_managed_job_cancel_is_the_owners(doc: dict[str, Any], refused: bool) -> None:
    assert (owners.refusal("/jobs/cancel", doc, BOB, RECORDS) is not None) is refused


def test_job_logs_need_a_job_and_the_controllers_log_an_admin() -> None:
    assert "must name" in str(owners.refusal("/jobs/logs", {}, BOB, RECORDS))
    assert "controller" in str(owners.refusal("/jobs/logs", {"controller": True}, BOB, RECORDS))
    assert owners.refusal("/jobs/logs", {"job_id": 2}, BOB, RECORDS) is None
    admin = Acting(_user(), "bob", admin=True)
    assert owners.refusal("/jobs/logs", {"job_id": 1}, admin, RECORDS) is None


def test_volumes_are_the_owners_and_buckets_an_admins() -> None:
    doc = {"names": ["bob-vol", "alice-vol"]}
    assert "volume alice-vol belongs to alice" in str(
        owners.refusal("/volumes/delete", doc, BOB, RECORDS)
    )
    assert owners.refusal("/volumes/delete", doc, ALICE, RECORDS) is None
    assert "storage bucket" in str(owners.refusal("/storage/delete", {"name": "b"}, BOB, RECORDS))


def test_a_path_spelled_oddly_is_still_the_same_endpoint() -> None:
    assert owners.refusal("//down/", {"cluster_name": "alice-dev"}, BOB, RECORDS)


# ---- the middleware binds before SkyPilot parses -------------------------------------------


class _Inner:
    def __init__(self) -> None:
        self.body: bytes | None = None
        self.query: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.query = scope.get("query_string")
        message = await receive()
        self.body = message.get("body", b"")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _drive(app: GuardMiddleware, path: str, doc: Any, query: bytes = b"") -> list[Any]:
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": json.dumps(doc).encode(), "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": query}
    asyncio.run(app(scope, receive, send))
    return sent


def _app(inner: _Inner, uid: int | None = 54321, **kw: Any) -> GuardMiddleware:
    return GuardMiddleware(
        inner, is_internal=lambda s: False, peer_uid=lambda s: uid, server_uid=999, **kw
    )


def test_the_middleware_rewrites_identity_and_uploads() -> None:
    inner = _Inner()
    sent = _drive(_app(inner), "/launch", {"env_vars": {"SKYPILOT_USER_ID": "a0000001"}})
    assert sent[0]["status"] == 200
    env = json.loads(inner.body or b"{}")["env_vars"]
    assert env["SKYPILOT_USER"] == "uid54321"  # no passwd entry: named by its uid
    assert env["SKYPILOT_USER_ID"] == callers.user_id_for("uid54321")
    _drive(_app(inner), "/upload", {}, query=b"user_hash=a0000001&upload_id=u&chunk_index=0")
    assert (
        inner.query
        == f"user_hash={callers.user_id_for('uid54321')}&upload_id=u&chunk_index=0".encode()
    )


def test_a_non_admin_api_cancel_is_scoped_to_the_caller() -> None:
    inner = _Inner()
    _drive(_app(inner), "/api/cancel", {"request_ids": None, "user_id": None, "env_vars": {}})
    assert json.loads(inner.body or b"{}")["user_id"] == callers.user_id_for("uid54321")


def test_an_unknown_connection_and_a_missing_config_are_refused() -> None:
    inner = _Inner()
    sent = _drive(_app(inner, uid=None), "/launch", {})
    assert sent[0]["status"] == 403 and inner.body is None
    broken = GuardSettings(error="the box's deskgpu host config /etc/x is missing")
    sent = _drive(_app(inner, uid=0, settings=lambda: broken), "/launch", {})
    assert sent[0]["status"] == 403 and b"/etc/x is missing" in sent[1]["body"]


def test_a_broken_settings_loader_fails_closed() -> None:
    def broken() -> GuardSettings:
        raise OSError("disk gone")

    inner = _Inner()
    sent = _drive(_app(inner, uid=0, settings=broken), "/launch", {})
    assert sent[0]["status"] == 403 and inner.body is None


def test_the_body_rule_sees_whom_the_request_runs_as() -> None:
    seen: list[Acting] = []

    def rule(path: str, doc: Any, acting: Acting) -> str | None:
        seen.append(acting)
        return "no" if path == "/down" else None

    inner = _Inner()
    sent = _drive(_app(inner, body_rule=rule), "/down", {"cluster_name": "x"})
    assert sent[0]["status"] == 403 and seen[0].user == "uid54321" and not seen[0].admin


def test_the_guard_logs_attempts_not_what_skypilots_own_client_sends() -> None:
    """deskgpu's (and SkyPilot's) client forwards its SKYPILOT_* settings on every request:
    133 warnings for 133 requests once hid real attempts."""
    from deskgpu.hardening import Scrubbed, noteworthy

    routine = Scrubbed(env=("SKYPILOT_API_SERVER_ENDPOINT", "SKYPILOT_DISABLE_LOCAL_API_SERVER"))
    assert not noteworthy(routine, _user())
    attempt = Scrubbed(env=("SKYPILOT_API_SERVER_ENDPOINT", "SKYPILOT_CONFIG"))
    assert noteworthy(attempt, _user()).env == ("SKYPILOT_CONFIG",)
    flags = Scrubbed(flags=("is_launched_by_jobs_controller",))
    assert noteworthy(flags, _user())  # a forged controller flag is always worth a line
    tl = Caller(54322, "transformerlab", FRONTEND)
    assert not noteworthy(Scrubbed(env=("_TFL_JOB_ID", "HF_TOKEN")), tl)  # task envs, secrets


def test_an_upload_key_spelled_in_percent_escapes_is_bound_too() -> None:
    """`user%5Fhash=<alice's id>` reached /upload unbound once: the server decodes keys."""
    inner = _Inner()
    for query in (b"user%5Fhash=a1ce0001&upload_id=u", b"%75ser_hash=a1ce0001&upload_id=u"):
        _drive(_app(inner), "/upload", {}, query=query)
        bound = callers.user_id_for("uid54321")
        assert inner.query == f"user_hash={bound}&upload_id=u".encode(), query


def test_a_dashboard_prefixed_api_cancel_is_scoped_too() -> None:
    inner = _Inner()
    _drive(_app(inner), "/internal/dashboard/api/cancel", {"request_ids": ["r"], "env_vars": {}})
    assert json.loads(inner.body or b"{}")["user_id"] == callers.user_id_for("uid54321")


@pytest.mark.parametrize("job_ids", [[1.0], ["1"], [" 1"], [True], ["1_0"], "1"])
def test_ids_skypilot_would_coerce_are_refused(job_ids: object) -> None:
    why = owners.refusal("/jobs/cancel", {"job_ids": job_ids}, BOB, RECORDS)
    assert why is not None and "whole numbers" in why


def test_routes_are_named_as_skypilot_routes_them() -> None:
    from deskgpu.hardening import route_of

    for spelled in ("/internal/dashboard/jobs/cancel", "//jobs/./cancel/", "/jobs/cancel"):
        assert route_of(spelled) == "/jobs/cancel"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/debug/dump_create"),
        ("GET", "/debug/dump_download/x.zip"),
        ("GET", "/users/export"),
    ],
)
def test_a_debug_dump_and_the_user_export_are_an_admins(method: str, path: str) -> None:
    assert hardening.is_admin_path(method, path)
    assert hardening.is_admin_path(method, "/internal/dashboard" + path)


def test_a_job_cannot_join_someone_elses_job_group() -> None:
    doc = {"task": "...", "parent_job_id": 1}
    assert "add a job to" in str(owners.refusal("/jobs/launch", doc, BOB, RECORDS))
    assert owners.refusal("/jobs/launch", doc, ALICE, RECORDS) is None
    assert owners.refusal("/jobs/launch", {"task": "..."}, BOB, RECORDS) is None


@pytest.mark.parametrize("path", ["/serve/down", "/serve/update", "/jobs/pool_down"])
def test_services_and_pools_are_an_admins_on_the_box(path: str) -> None:
    assert hardening.is_admin_path("POST", path)


def _listing(body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    from deskgpu.hardening import _only_own_requests

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def run() -> None:
        wrapped = _only_own_requests(send, "b0b00001")
        await wrapped({"type": "http.response.start", "status": 200, "headers": headers})
        await wrapped({"type": "http.response.body", "body": body[:5], "more_body": True})
        await wrapped({"type": "http.response.body", "body": body[5:], "more_body": False})

    asyncio.run(run())
    return sent[0]["status"], sent[1]["body"]


def test_the_request_listing_keeps_only_the_callers_own() -> None:
    import gzip

    rows = [{"request_id": "a", "user_id": "a1ce0001"}, {"request_id": "b", "user_id": "b0b00001"}]
    plain = json.dumps(rows).encode()
    assert _listing(plain, [(b"content-type", b"application/json")]) == (
        200,
        json.dumps([rows[1]]).encode(),
    )
    zipped = _listing(gzip.compress(plain), [(b"content-encoding", b"gzip")])
    assert zipped == (200, json.dumps([rows[1]]).encode())
    status, body = _listing(b"not json at all", [])
    assert status == 502 and b"a1ce0001" not in body  # unreadable: not passed on
