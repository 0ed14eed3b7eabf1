"""Prometheus' HTTP API (`/api/v1/query`, `/api/v1/query_range`, `/api/v1/targets`).

One plain-HTTP client (`deskgpu.skypilot.http.request`, bounded as a whole by a deadline);
every failure is one `OutsideError` line that names the URL and what to check, never a
traceback. Values arrive as strings ("NaN" and "+Inf" included) and leave as floats.
"""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass
from typing import Any

from deskgpu.deadline import Deadline
from deskgpu.errors import OutsideError
from deskgpu.skypilot.http import request

TIMEOUT_S = 10.0
MAX_BODY = 256 * 1024 * 1024  # a month of 64 GPUs at 5 min: tens of MiB


@dataclass(frozen=True)
class Series:
    """One series of an instant (one point) or range (many points) answer."""

    labels: dict[str, str]
    points: tuple[tuple[float, float], ...]  # (unix seconds, value), oldest first

    @property
    def value(self) -> float:
        return self.points[-1][1]

    @property
    def at(self) -> float:
        return self.points[-1][0]


@dataclass(frozen=True)
class Target:
    """One scrape target as `/api/v1/targets` lists it."""

    job: str
    labels: dict[str, str]
    health: str  # "up" | "down" | "unknown"
    last_scrape: float | None  # unix seconds; None: never scraped
    last_error: str


class Prometheus:
    """The API at `url` (`http://127.0.0.1:9090`), each call within `deadline` when given."""

    def __init__(self, url: str, deadline: Deadline | None = None) -> None:
        self.url = url.rstrip("/")
        self.deadline = deadline

    def query(self, promql: str, at: float | None = None) -> list[Series]:
        params = {"query": promql}
        if at is not None:
            params["time"] = _ts(at)
        return _series(self._get("/api/v1/query", params), promql)

    def query_range(self, promql: str, start: float, end: float, step_s: float) -> list[Series]:
        params = {"query": promql, "start": _ts(start), "end": _ts(end), "step": f"{step_s:g}"}
        return _series(self._get("/api/v1/query_range", params), promql)

    def targets(self) -> list[Target]:
        data = self._get("/api/v1/targets", {"state": "active"})
        out = []
        for t in data.get("activeTargets") or []:
            if not isinstance(t, dict):
                continue
            labels = {str(k): str(v) for k, v in (t.get("labels") or {}).items()}
            out.append(
                Target(
                    job=str(t.get("scrapePool") or labels.get("job") or ""),
                    labels=labels,
                    health=str(t.get("health") or "unknown"),
                    last_scrape=_rfc3339(t.get("lastScrape")),
                    last_error=str(t.get("lastError") or ""),
                )
            )
        return out

    def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        reply = request("GET", url, timeout_s=TIMEOUT_S, deadline=self.deadline, max_bytes=MAX_BODY)
        where = f"Prometheus at {self.url}"
        if reply.error is not None:
            fix = (
                "is it running? (`systemctl status prometheus` on the server node; "
                "telemetry.prometheus in the host config)"
            )
            raise OutsideError(f"{where}: {reply.error}: {fix}")
        try:
            doc = reply.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or "status" not in doc:
            if reply.status is not None and reply.status >= 500:
                raise OutsideError(
                    f"{where} answered HTTP {reply.status} {reply.reason} (starting up, or "
                    "overloaded?): `systemctl status prometheus` on the server node"
                )
            raise OutsideError(
                f"{where} answered HTTP {reply.status} that is not Prometheus' API "
                "(telemetry.prometheus must be the Prometheus base URL, e.g. http://127.0.0.1:9090)"
            )
        if doc.get("status") != "success":
            raise OutsideError(f"{where}: {doc.get('errorType', 'error')}: {doc.get('error', '')}")
        data = doc.get("data")
        return data if isinstance(data, dict) else {}


def _ts(value: float) -> str:
    return f"{value:.3f}"


def _float(raw: Any) -> float:
    try:
        return float(raw)  # "NaN", "+Inf", "-Inf" included
    except (TypeError, ValueError):
        return math.nan


def _series(data: dict[str, Any], promql: str) -> list[Series]:
    try:
        return _parse(data, promql)
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
        raise OutsideError(
            f"Prometheus answered {promql!r} with a result deskgpu cannot read ({exc})"
        ) from None


def _parse(data: dict[str, Any], promql: str) -> list[Series]:
    kind = data.get("resultType")
    out: list[Series] = []
    for item in data.get("result") or []:
        if not isinstance(item, dict):
            continue
        labels = {str(k): str(v) for k, v in (item.get("metric") or {}).items()}
        if kind == "vector" and isinstance(item.get("value"), list):
            ts, raw = item["value"]
            out.append(Series(labels, ((float(ts), _float(raw)),)))
        elif kind == "matrix":
            points = tuple(
                (float(p[0]), _float(p[1]))
                for p in item.get("values") or []
                if isinstance(p, list) and len(p) == 2
            )
            if points:
                out.append(Series(labels, points))
        else:
            raise OutsideError(f"Prometheus answered {promql!r} with a {kind}, not a vector")
    return out


def _rfc3339(raw: Any) -> float | None:
    """`2026-12-08T00:16:41.123456789Z` -> unix seconds; Prometheus' "never" is year 1."""
    import datetime as dt

    if not isinstance(raw, str) or raw.startswith("0001-"):
        return None
    text = raw.replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    if rest:  # Python parses at most microseconds: cut the nanoseconds
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
