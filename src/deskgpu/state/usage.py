"""What the usage report needs beyond the reap history's samples, kept in the same SQLite file.

The reap history stores samples by cluster name only. Each observation also records here:
who a session belongs to (owner, job, kind: as reap attributes it, from its labels), how
many GPUs the box has, and SkyPilot's own job records (submitted/started times) plus when
observe first saw each cluster Queued and running: the waits of the report. Tables are
created on first write; a history written before they existed simply has no rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_sessions (
    cluster TEXT NOT NULL, created_at INTEGER NOT NULL, owner TEXT NOT NULL,
    job TEXT NOT NULL, kind TEXT NOT NULL, first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL, PRIMARY KEY (cluster, created_at)
);
CREATE TABLE IF NOT EXISTS usage_box (ts INTEGER PRIMARY KEY, gpus INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS usage_waits (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL,
    job TEXT NOT NULL, submitted_at REAL, started_at REAL, state TEXT NOT NULL,
    queued_seen INTEGER, running_seen INTEGER, last_seen INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class SessionInfo:
    """One incarnation of a session: a cluster name reused later is another row."""

    cluster: str
    created_at: int  # SkyPilot's launch time (0: unknown)
    owner: str
    job: str
    kind: str
    first_seen: int
    last_seen: int


@dataclass(frozen=True)
class WaitRecord:
    """A job or cluster as SkyPilot and observe saw it: how long it waited for GPUs."""

    key: str
    kind: str  # "managed-job" or "cluster"
    name: str
    owner: str
    job: str
    submitted_at: float | None
    started_at: float | None
    state: str  # the deskgpu state at the last observation that saw it
    queued_seen: int | None  # first observation that saw it Queued
    running_seen: int | None  # first observation that saw it past Queued
    last_seen: int

    def waited_s(self, until: float) -> tuple[float | None, bool]:
        """(seconds it waited Queued, still waiting?); None: not known."""
        if self.kind == "managed-job":
            if self.submitted_at is not None and self.started_at is not None:
                return max(0.0, self.started_at - self.submitted_at), False
            if self.state == "Queued" and self.submitted_at is not None:
                return max(0.0, until - self.submitted_at), True
            return None, False
        if self.submitted_at is None:
            return None, False
        if self.running_seen is not None:
            if self.queued_seen is None:  # never seen waiting: under one observation interval
                return 0.0, False
            return max(0.0, self.running_seen - self.submitted_at), False
        if self.state == "Queued":
            return max(0.0, until - self.submitted_at), True
        return None, False


def ensure(db: sqlite3.Connection) -> None:
    # IMMEDIATE: the write lock up front, so a concurrent writer waits instead of failing.
    db.executescript("BEGIN IMMEDIATE;\n" + SCHEMA + "COMMIT;\n")


def record(db: sqlite3.Connection, ts: float, sessions: Iterable[Any], snap: Any) -> None:
    """One observation's owners, GPU count and SkyPilot records (`gather.LiveSession`s and
    the `Snapshot` they came from)."""
    from deskgpu.labels import LABEL_JOB, LABEL_USER
    from deskgpu.snapshot import DONE, QUEUED

    t = int(ts)
    ensure(db)
    with db:
        for s in sessions:
            created = int(s.created_at or 0)
            job = s.labels.get(LABEL_JOB) or s.cluster
            db.execute(
                "INSERT INTO usage_sessions VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (cluster, created_at) DO UPDATE SET owner = excluded.owner, "
                "job = excluded.job, kind = excluded.kind, last_seen = excluded.last_seen",
                (s.cluster, created, s.owner, job, s.kind, t, t),
            )
        db.execute("INSERT OR REPLACE INTO usage_box VALUES (?, ?)", (t, len(snap.nvml.gpus)))
        if not snap.sky.available:
            return
        rows: list[tuple[Any, ...]] = []
        for j in snap.sky.jobs:
            rows.append(
                (
                    f"job:{j.id}",
                    "managed-job",
                    j.cluster_name_on_cloud or j.name or f"managed-job-{j.id}",
                    j.labels.get(LABEL_USER) or j.user or "?",
                    j.labels.get(LABEL_JOB) or j.name or f"managed-job-{j.id}",
                    j.submitted_at,
                    j.started_at,
                    j.state,
                )
            )
        for c in snap.sky.clusters:
            rows.append(
                (
                    f"cluster:{c.name}:{int(c.launched_at or 0)}",
                    "cluster",
                    c.name,
                    c.labels.get(LABEL_USER) or c.user or "?",
                    c.labels.get(LABEL_JOB) or c.name,
                    c.launched_at,
                    None,
                    c.state,
                )
            )
        for key, kind, name, owner, job, submitted, started, state in rows:
            queued = t if state == QUEUED else None
            running = t if state not in (QUEUED, DONE) and kind == "cluster" else None
            db.execute(
                "INSERT INTO usage_waits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, job = excluded.job, "
                "submitted_at = COALESCE(excluded.submitted_at, submitted_at), "
                "started_at = COALESCE(excluded.started_at, started_at), "
                "state = excluded.state, "
                "queued_seen = COALESCE(queued_seen, excluded.queued_seen), "
                "running_seen = COALESCE(running_seen, excluded.running_seen), "
                "last_seen = excluded.last_seen",
                (key, kind, name, owner, job, submitted, started, state, queued, running, t),
            )


def _has(db: sqlite3.Connection, table: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return row is not None


def sessions(db: sqlite3.Connection) -> list[SessionInfo] | None:
    """Every recorded incarnation; None: this history predates the table."""
    if not _has(db, "usage_sessions"):
        return None
    rows = db.execute("SELECT * FROM usage_sessions ORDER BY cluster, first_seen").fetchall()
    return [SessionInfo(*r) for r in rows]


def box_gpus(db: sqlite3.Connection, since: float, until: float) -> int | None:
    if not _has(db, "usage_box"):
        return None
    row = db.execute(
        "SELECT MAX(gpus) FROM usage_box WHERE ts >= ? AND ts <= ?", (int(since), int(until))
    ).fetchone()
    return None if row[0] is None else int(row[0])


def waits(db: sqlite3.Connection) -> list[WaitRecord] | None:
    """SkyPilot's job and cluster records as observe kept them; None: none ever recorded."""
    if not _has(db, "usage_waits"):
        return None
    rows = db.execute("SELECT * FROM usage_waits ORDER BY key").fetchall()
    return [WaitRecord(*r) for r in rows] if rows else None
