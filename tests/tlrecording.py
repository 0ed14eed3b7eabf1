"""Transformer Lab's recorded traffic (tests/fixtures/transformerlab/), as SkyPilot 0.14.1
bodies: each recorded request body rebuilt with 0.14.1's own payload class, keeping every
field that class has (`env_vars` and `task` included) and nothing it does not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORDING = Path(__file__).parent / "fixtures" / "transformerlab" / "wire-tl0.27-sky0.12.1.jsonl"


def exchanges() -> list[dict[str, Any]]:
    return [json.loads(line) for line in RECORDING.read_text().splitlines() if line.strip()]


def recorded(path: str) -> list[dict[str, Any]]:
    """The recorded request bodies sent to `path`, in order."""
    return [dict(e["json"]) for e in exchanges() if e["path"] == path and e.get("json")]


def as_0_14(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` through SkyPilot 0.14.1's payload class for `path`."""
    from sky.server.requests import payloads

    model: Any = {"/launch": payloads.LaunchBody, "/queue": payloads.QueueBody}[path]
    known = {k: v for k, v in body.items() if k in model.model_fields}
    doc: dict[str, Any] = json.loads(model(**known).model_dump_json())
    doc["env_vars"] = dict(body.get("env_vars") or {})  # as sent, secrets and all
    return doc


def recorded_headers(path: str) -> dict[str, str]:
    """The SkyPilot version headers Transformer Lab's client sent to `path`."""
    for e in exchanges():
        if e["path"] == path:
            return {k: v for k, v in e["headers"].items() if k.lower().startswith("x-skypilot")}
    return {}
