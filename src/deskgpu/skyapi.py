"""The only module that imports `sky`, and only inside functions (it costs seconds).

Every SkyPilot failure leaves here as an `OutsideError` (exit 1) with one clear line;
SkyPilot's own chatter on stdout is sent to stderr so stdout stays the product.
"""

from __future__ import annotations

import contextlib
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
    env.setdefault("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
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
    if name in ("ApiServerConnectionError", "ConnectionError", "ConnectTimeout"):
        return OutsideError(
            f"SkyPilot API server at {endpoint} is unreachable: ask the box's admin to start it "
            "(`systemctl start skypilot-api`), or set api_server in the host config"
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
    return OutsideError(f"SkyPilot rejected the request ({name}): {message}")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    with contextlib.redirect_stdout(sys.stderr):
        yield


def validate_task(task: dict[str, Any]) -> Any:
    """Build a `sky.Task` with SkyPilot's own offline validator; raises on a bad task."""
    sky = import_sky()
    return sky.Task.from_yaml_config(task)


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
) -> Submitted:
    """Hand a task to the shared API server; wait up to `wait_s` for an early verdict.

    The request keeps running on the server after we return (and after the user's SSH
    session ends): managed jobs retry until GPUs free up, and a session's pod waits
    Pending with `provision_timeout: -1`.
    """
    endpoint = prepare_environment(config)
    sky = import_sky()
    try:
        with _stdout_to_stderr():
            task = sky.Task.from_yaml_config(task_config)
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
