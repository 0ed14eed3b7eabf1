"""A raw HTTP client for a SkyPilot API server: what a researcher with `curl` could send.

Builds the request body the stock SDK would (SkyPilot's own payload classes), then changes
it as told, POSTs it with plain urllib and waits for the request's result. Run as its own
process (the server sees an ordinary client connection):

    python tests/raw_request.py URL /launch task.yaml [--cluster NAME]
        [--env KEY=VALUE ...] [--config JSON] [--field KEY=JSON ...]

Prints one JSON line: {"request_id", "status", "error_type", "error"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def body_for(path: str, task_yaml: str, cluster: str | None) -> dict[str, Any]:
    from sky.server.requests import payloads
    from sky.utils import dag_utils

    dag = dag_utils.load_chain_dag_from_yaml_str(task_yaml)
    dag_str = dag_utils.dump_chain_dag_to_yaml_str(dag)
    if path == "/jobs/launch":
        model: Any = payloads.JobsLaunchBody(task=dag_str, name=None)
    elif path == "/validate":
        model = payloads.ValidateBody(dag=dag_str, request_options=None)
    else:
        model = payloads.LaunchBody(task=dag_str, cluster_name=cluster)
    doc: dict[str, Any] = json.loads(model.model_dump_json())
    if path == "/validate" and cluster:
        doc["request_options"] = {
            "cluster_name": cluster,
            "idle_minutes_to_autostop": None,
            "down": False,
            "dryrun": False,
        }
    return doc


def post(
    url: str, doc: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(doc).encode()
    request = urllib.request.Request(
        url,
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait(endpoint: str, request_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        url = f"{endpoint}/api/get?request_id={request_id}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                payload: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            payload = json.loads(exc.read() or b"{}")
            payload = payload.get("detail", payload) if isinstance(payload, dict) else {}
        status = payload.get("status")
        if status in ("SUCCEEDED", "FAILED", "CANCELLED") or time.monotonic() > deadline:
            return payload
        time.sleep(1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("path")
    parser.add_argument("task")
    parser.add_argument("--cluster")
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--config", help="override_skypilot_config, as JSON")
    parser.add_argument("--field", action="append", default=[], help="KEY=JSON")
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args(argv)
    doc = body_for(args.path, Path(args.task).read_text(), args.cluster)
    for pair in args.env:
        key, _, value = pair.partition("=")
        doc.setdefault("env_vars", {})[key] = value
    if args.config:
        doc["override_skypilot_config"] = json.loads(args.config)
    for pair in args.field:
        key, _, value = pair.partition("=")
        doc[key] = json.loads(value)
    endpoint = args.endpoint.rstrip("/")
    status, headers, raw = post(endpoint + args.path, doc)
    out: dict[str, Any] = {"http_status": status}
    if args.path == "/validate":
        detail: Any = json.loads(raw or b"{}").get("detail") if status != 200 else None
        if isinstance(detail, str):
            try:
                detail = json.loads(detail)
            except ValueError:
                detail = {"message": detail}
        detail = detail if isinstance(detail, dict) else {}
        out["status"] = "SUCCEEDED" if status == 200 else "FAILED"
        out["error_type"] = detail.get("type")
        out["error"] = detail.get("message")
        print(json.dumps(out))
        return 0
    request_id = headers.get("X-Skypilot-Request-ID") or headers.get("x-skypilot-request-id")
    if not request_id:
        out["error"] = raw.decode("utf-8", "replace")[:2000]
        print(json.dumps(out))
        return 0
    result = wait(endpoint, request_id, args.timeout)
    error = result.get("error") or {}
    if isinstance(error, str):
        try:
            error = json.loads(error)
        except ValueError:
            error = {"message": error}
    out.update(
        request_id=request_id,
        status=result.get("status"),
        error_type=error.get("type") if isinstance(error, dict) else None,
        error=(error.get("message") if isinstance(error, dict) else str(error)),
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
