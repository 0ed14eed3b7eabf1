"""The guard's parts on their own: body scrubbing, who is on the other end of a real loopback
connection (/proc, as the server reads it), and the ASGI middleware driven as uvicorn would.

The end-to-end proof, on a real API server from the rendered files, is
tests/test_hardening_server.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskgpu import hardening
from deskgpu.hardening import (
    ALLOWED_REQUEST_ENV,
    GuardMiddleware,
    is_controller_process,
    is_internal_peer,
    pid_holding_socket,
    runs_controller_module,
    scrub_request_body,
    socket_owner,
)


def test_scrub_keeps_identity_and_drops_what_steers_the_server() -> None:
    body: dict[str, Any] = {
        "env_vars": {
            "SKYPILOT_USER_ID": "abc",
            "SKYPILOT_USER": "alice",
            "SKYPILOT_DEBUG": "1",
            "SKYPILOT_CONFIG": "/home/alice/evil.yaml",
            "SKYPILOT_GLOBAL_CONFIG": "/dev/null",
            "SKYPILOT_SERVER_PLUGINS_CONFIG": "/dev/null",
            "DESKGPU_CONFIG": "/home/alice/rules.yaml",
            "PATH": "/home/alice/bin",
            "HOME": "/home/alice",
            "LD_PRELOAD": "/home/alice/x.so",
            "AWS_SECRET_ACCESS_KEY": "s",
        },
        "override_skypilot_config": {"admin_policy": "http://x/", "kubernetes": {"a": 1}},
        "is_launched_by_jobs_controller": True,
        "is_launched_by_sky_serve_controller": False,
        "task": "name: x",
    }
    removed = scrub_request_body(body)
    assert body["env_vars"] == {
        "SKYPILOT_USER_ID": "abc",
        "SKYPILOT_USER": "alice",
        "SKYPILOT_DEBUG": "1",
    }
    assert body["override_skypilot_config"] == {"kubernetes": {"a": 1}}
    assert "is_launched_by_jobs_controller" not in body
    assert "is_launched_by_sky_serve_controller" not in body
    assert body["task"] == "name: x"
    assert removed.flags == ("is_launched_by_jobs_controller",)
    assert removed.config == ("admin_policy",)
    assert "PATH" in removed.env and "SKYPILOT_CONFIG" in str(removed)


def test_scrub_of_a_body_without_anything_to_remove_reports_nothing() -> None:
    body = {"env_vars": {k: "1" for k in ALLOWED_REQUEST_ENV}, "cluster_name": "alice-x"}
    assert not scrub_request_body(body)
    assert body["env_vars"] == {k: "1" for k in ALLOWED_REQUEST_ENV}


def test_scrub_replaces_env_that_is_not_a_mapping() -> None:
    body: dict[str, Any] = {"env_vars": [["PATH", "/x"]]}
    assert scrub_request_body(body).env == ("<not a mapping>",)
    assert body["env_vars"] == {}


def test_the_allowed_request_env_is_what_skypilots_client_sends() -> None:
    """Every name allowed is one SkyPilot's client forwards (its constants), not a guess."""
    sky = pytest.importorskip("sky")
    del sky
    from sky.skylet import constants
    from sky.usage import constants as usage_constants
    from sky.utils import env_options

    known = {
        constants.USER_ID_ENV_VAR,
        constants.USER_ENV_VAR,
        constants.CLIENT_USER_HASH_ENV_VAR,
        usage_constants.USAGE_RUN_ID_ENV_VAR,
        *(o.env_key for o in env_options.Options),
    }
    assert known >= ALLOWED_REQUEST_ENV


# ---------------------------------------------------------------------------------------------
# Who is connecting: real sockets, real processes


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server
    finally:
        server.close()


def test_socket_owner_finds_our_own_connection(listener: socket.socket) -> None:
    client = socket.create_connection(listener.getsockname())
    accepted, peer = listener.accept()
    try:
        found = socket_owner(peer, listener.getsockname())
        assert found is not None and found.uid == os.geteuid()
        assert pid_holding_socket(found.inode, os.geteuid()) == os.getpid()
        # The server's end of the same connection is a different socket.
        assert socket_owner(listener.getsockname(), peer) != found
        # This process is pytest, not a SkyPilot controller.
        assert not is_internal_peer(peer, listener.getsockname())
    finally:
        client.close()
        accepted.close()


def test_a_connection_from_another_uid_is_never_internal(listener: socket.socket) -> None:
    client = socket.create_connection(listener.getsockname())
    accepted, peer = listener.accept()
    try:
        assert not is_internal_peer(peer, listener.getsockname(), server_uid=os.geteuid() + 1)
        assert not is_internal_peer(None, listener.getsockname())
        assert not is_internal_peer(("not-an-ip", 1), listener.getsockname())
    finally:
        client.close()
        accepted.close()


@pytest.fixture
def fake_controller_package(tmp_path: Path) -> Path:
    """A package shadowing `sky.jobs.controller`, so a real process has the controller's exact
    command line (`python -u -msky.jobs.controller UUID`, sky/jobs/scheduler.py) and connects
    to the port it is given."""
    pkg = tmp_path / "sky" / "jobs"
    pkg.mkdir(parents=True)
    (tmp_path / "sky" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "controller.py").write_text(
        textwrap.dedent(
            """\
            import socket, sys, time
            s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
            s.sendall(b"x")
            time.sleep(60)
            """
        )
    )
    return tmp_path


def _connect_from(args: list[str], cwd: Path, listener: socket.socket):
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listener.settimeout(60)
    accepted, peer = listener.accept()
    accepted.recv(1)
    return proc, accepted, peer


def test_a_skypilot_controller_process_is_internal(
    listener: socket.socket, fake_controller_package: Path
) -> None:
    port = str(listener.getsockname()[1])
    proc, accepted, peer = _connect_from(
        [sys.executable, "-u", "-msky.jobs.controller", port], fake_controller_package, listener
    )
    try:
        assert is_internal_peer(peer, listener.getsockname())
        assert is_controller_process(proc.pid, os.geteuid())
        # The same process seen as another account's is not ours to trust.
        assert not is_internal_peer(peer, listener.getsockname(), server_uid=os.geteuid() + 1)
    finally:
        proc.kill()
        proc.wait()
        accepted.close()


def test_a_look_alike_command_line_is_not_a_controller(
    listener: socket.socket, fake_controller_package: Path
) -> None:
    """`python controller.py sky.jobs.controller` merely mentions the module."""
    port = str(listener.getsockname()[1])
    script = fake_controller_package / "sky" / "jobs" / "controller.py"
    proc, accepted, peer = _connect_from(
        [sys.executable, str(script), port, "-m", "sky.jobs.controller"],
        fake_controller_package,
        listener,
    )
    try:
        assert not is_controller_process(proc.pid, os.geteuid())
        assert not is_internal_peer(peer, listener.getsockname())
    finally:
        proc.kill()
        proc.wait()
        accepted.close()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["python", "-u", "-msky.jobs.controller", "uuid"], True),
        (["python", "-m", "sky.jobs.controller", "uuid"], True),
        (["python", "-um", "sky.jobs.controller"], True),
        (["python", "-m", "sky.serve.service", "--service-name", "s"], True),
        (["python", "-m", "sky.server.server", "--deploy"], False),
        (["python", "-X", "dev", "-m", "sky.jobs.controller"], True),
        (["python", "-Xmsky.jobs.controller"], False),
        (["python", "script.py", "-m", "sky.jobs.controller"], False),
        (["python", "-c", "x", "-m", "sky.jobs.controller"], False),
        (["python", "-msky.jobs.controllerx"], False),
        (["sky", "launch", "-c", "x"], False),
        (["python", "-c", "import sky.jobs.controller"], False),
        ([], False),
    ],
)
def test_controller_command_lines(args: list[str], expected: bool) -> None:
    assert runs_controller_module(args) is expected


# ---------------------------------------------------------------------------------------------
# The middleware, driven as an ASGI server drives it


class _Recorder:
    def __init__(self) -> None:
        self.body: bytes | None = None
        self.headers: dict[bytes, bytes] = {}
        self.internal: bool | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.internal = hardening.INTERNAL_REQUEST.get()
        self.headers = dict(scope["headers"])
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.body = b"".join(chunks)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _seen(inner: Any) -> Any:
    """What reached SkyPilot, less the peer uid the guard adds for the policy."""
    doc = json.loads(inner.body)
    if isinstance(doc, dict) and isinstance(doc.get("env_vars"), dict):
        doc["env_vars"].pop(hardening.PEER_UID_ENV, None)
    return doc


def _as_root(scope: Any) -> int:
    """The connection's owner for tests of the scrubbing itself: root, taken at its word."""
    return 0


def _drive(
    app: GuardMiddleware, body: bytes, *, content_type: bytes = b"application/json"
) -> list[Any]:
    messages = [
        {"type": "http.request", "body": body[: len(body) // 2], "more_body": True},
        {"type": "http.request", "body": body[len(body) // 2 :], "more_body": False},
    ]
    sent: list[Any] = []

    async def receive() -> Any:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/launch",
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 46580),
    }
    asyncio.run(app(scope, receive, send))
    return sent


def test_middleware_scrubs_a_chunked_client_body() -> None:
    inner = _Recorder()
    app = GuardMiddleware(inner, is_internal=lambda scope: False, peer_uid=_as_root)
    doc = {"env_vars": {"SKYPILOT_USER": "a", "PATH": "/evil"}, "is_launched_by_jobs_controller": 1}
    sent = _drive(app, json.dumps(doc).encode())
    assert sent[0]["status"] == 200
    assert inner.body is not None
    assert _seen(inner) == {"env_vars": {"SKYPILOT_USER": "a"}}
    assert inner.headers[b"content-length"] == str(len(inner.body)).encode()
    assert inner.internal is False


def test_middleware_parses_duplicate_keys_as_skypilot_would_and_forwards_one() -> None:
    """`{"env_vars": {}, "env_vars": {"PATH": ...}}`: the last wins in both parsers; what goes
    on is re-serialized, so there is no second reading."""
    inner = _Recorder()
    app = GuardMiddleware(inner, is_internal=lambda scope: False, peer_uid=_as_root)
    _drive(app, b'{"env_vars": {}, "env_vars": {"PATH": "/evil", "SKYPILOT_USER": "a"}}')
    assert _seen(inner) == {"env_vars": {"SKYPILOT_USER": "a"}}


def test_middleware_whatever_the_content_type_says() -> None:
    """FastAPI parses a body without a JSON content type too (no header at all): scrubbed."""
    inner = _Recorder()
    app = GuardMiddleware(inner, is_internal=lambda scope: False, peer_uid=_as_root)
    _drive(app, b'{"env_vars": {"HOME": "/x"}}', content_type=b"text/plain")
    assert _seen(inner) == {"env_vars": {}}


def test_middleware_leaves_form_uploads_and_non_json_alone() -> None:
    inner = _Recorder()
    app = GuardMiddleware(inner, is_internal=lambda scope: False, peer_uid=_as_root)
    _drive(app, b"--b\r\nbinary", content_type=b"multipart/form-data; boundary=b")
    assert inner.body == b"--b\r\nbinary"
    _drive(app, b"not json at all")
    assert inner.body == b"not json at all"


def test_middleware_trusts_the_controller_and_says_so() -> None:
    inner = _Recorder()
    app = GuardMiddleware(inner, is_internal=lambda scope: True)
    doc = {"env_vars": {"SKYPILOT_CONFIG": "/srv/job.yaml"}, "is_launched_by_jobs_controller": True}
    _drive(app, json.dumps(doc).encode())
    assert inner.body is not None and json.loads(inner.body) == doc
    assert inner.internal is True
    assert hardening.INTERNAL_REQUEST.get() is False  # not leaked past the request


def test_middleware_fails_closed_when_it_cannot_tell() -> None:
    def broken(scope: Any) -> bool:
        raise OSError("/proc is not mounted")

    inner = _Recorder()
    app = GuardMiddleware(inner, is_internal=broken, peer_uid=_as_root)
    _drive(app, b'{"is_launched_by_jobs_controller": true}')
    assert _seen(inner) == {} and inner.internal is False


def test_the_guard_tells_the_policy_who_connected_and_no_client_can() -> None:
    inner = _Recorder()
    app = GuardMiddleware(inner, is_internal=lambda scope: False, peer_uid=_as_root)
    doc = {"env_vars": {"SKYPILOT_USER": "a", hardening.PEER_UID_ENV: "1234"}}
    _drive(app, json.dumps(doc).encode())
    assert inner.body is not None
    assert json.loads(inner.body)["env_vars"] == {
        "SKYPILOT_USER": "a",
        hardening.PEER_UID_ENV: "0",
    }


def test_a_user_id_that_is_a_path_is_refused() -> None:
    inner = _Recorder()
    app = GuardMiddleware(inner, is_internal=lambda scope: False, peer_uid=_as_root)
    sent = _drive(app, json.dumps({"env_vars": {"SKYPILOT_USER_ID": "../../x"}}).encode())
    assert sent[0]["status"] == 400 and inner.body is None
    sent = _drive(app, json.dumps({"env_vars": {"SKYPILOT_USER_ID": "1a2b3c4d"}}).encode())
    assert sent[0]["status"] == 200


@pytest.mark.parametrize(
    ("mode", "parent_mode", "other_can_read"),
    [(0o644, 0o755, True), (0o600, 0o755, False), (0o644, 0o700, False), (0o604, 0o711, True)],
)
def test_readable_by_follows_unix_modes(mode: int, parent_mode: int, other_can_read: bool) -> None:
    import shutil
    import tempfile

    from deskgpu.hardening import readable_by

    # Not under pytest's temp root, which is 0700 (nobody else could traverse it at all).
    tmp_path = Path(tempfile.mkdtemp(prefix="deskgpu-modes-", dir="/tmp"))
    parent = tmp_path / "d"
    parent.mkdir()
    target = parent / "f"
    target.write_text("x")
    target.chmod(mode)
    parent.chmod(parent_mode)
    tmp_path.chmod(0o755)
    try:
        me = os.geteuid()
        assert readable_by(0, str(target))
        # Someone else (a uid that owns nothing here and is in none of its groups).
        other = 54321 if me != 54321 else 54322
        assert readable_by(other, str(target)) is other_can_read
        assert readable_by(me, str(target)) is (me == 0 or bool(mode & 0o400))
        assert not readable_by(other, str(tmp_path / "missing"))
    finally:
        parent.chmod(0o755)
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize(
    ("method", "path", "admin"),
    [
        ("POST", "/workspaces/config", True),
        ("POST", "//workspaces/./config/", True),
        ("POST", "/internal/dashboard/workspaces/config", True),
        ("POST", "/ssh_node_pools", True),
        ("POST", "/ssh_node_pools/pool/deploy", True),
        ("DELETE", "/users/delete", True),
        ("POST", "/users/service-account-tokens/rotate", True),
        ("POST", "/local_up", True),
        ("GET", "/workspaces/config", True),  # the whole server config: root reads it
        ("GET", "/workspaces", False),
        ("POST", "/users/me/workspace", False),
        ("POST", "/launch", False),
        ("POST", "/workspacesx", False),
    ],
)
def test_admin_endpoints(method: str, path: str, admin: bool) -> None:
    assert hardening.is_admin_path(method, path) is admin


def _drive_path(app: GuardMiddleware, path: str) -> list[Any]:
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent


def test_only_root_or_the_server_account_reaches_admin_endpoints() -> None:
    inner = _Recorder()
    researcher = 54321 if os.geteuid() != 54321 else 54322  # anyone but root and us
    for uid, status in ((researcher, 403), (None, 403), (0, 200), (os.geteuid(), 200)):
        app = GuardMiddleware(inner, is_internal=lambda scope: False, peer_uid=lambda s, u=uid: u)
        assert _drive_path(app, "/workspaces/config")[0]["status"] == status, uid
