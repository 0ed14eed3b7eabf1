"""The rule's questions about a session's samples, answered where the history keeps them.

`observe` decides every session every 5 minutes, from a history that keeps up to
`retention` of samples (a month of 50 sessions is ~0.9 M rows: reading each into Python
took 2 s). Here only what the answers need is read: the samples from the newest back, in
growing steps, until the idle stretch ends inside what was read (the walk checks one
observation at a time, newest first, so where it ends in the newest samples it ends in the
whole history); the rest comes from SQLite's aggregates along the (cluster, ts) index, each
reading no further than its answer (the newest SSH connection, a GPU's first sample).
The samples asked about are those `gather.build_evidence` puts in the evidence: from the
retention's start and from the session's creation on.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

from deskgpu.config.reap import ReapSettings
from deskgpu.reap.evidence import ActivitySample, GpuSample, Session
from deskgpu.reap.idle import NEVER, IdleRun, floor_of, held_by, idle_run_of
from deskgpu.state.history import History


class HistorySamples:
    """`SessionSamples` of one session of evidence built without its samples."""

    def __init__(self, history: History, session: Session, since: float) -> None:
        self.history = history
        self.session = session
        self.since = since
        created = session.created_at
        # History.samples reads whole seconds from `since`; build_evidence then drops what is
        # older than the session (another of the same name) or, unknown, than `since`
        self.lo = max(float(int(since)), since if created is None else created)
        self._gpu: list[GpuSample] = []
        self._act: list[ActivitySample] = []
        self._read_from: float | None = None  # what is read: samples from here on
        self._runs: dict[tuple[ReapSettings, float, bool], IdleRun] = {}

    def with_samples(self, session: Session) -> Session:
        """`session` (this one, as later steps changed it) with every sample the evidence
        would hold, as `gather.build_evidence` reads them (for an audit line's summary)."""
        self._read(self.lo)
        listed = set(session.gpus) | set(session.allocated_gpus or ())
        return replace(
            session,
            gpus_earlier=tuple(sorted({g.gpu for g in self._gpu} - listed)),
            gpu_samples=tuple(self._gpu),
            activity_samples=tuple(self._act),
        )

    def idle_run(self, settings: ReapSettings, now: float, *, interactive: bool) -> IdleRun:
        key = (settings, now, interactive)
        if key not in self._runs:
            self._runs[key] = self._idle_run(settings, now, interactive)
        return self._runs[key]

    def _idle_run(self, settings: ReapSettings, now: float, interactive: bool) -> IdleRun:
        # one aggregate a query: SQLite answers a lone MAX or MIN from the index's end
        (newest,) = self._one("SELECT MAX(ts) FROM gpu_samples")
        (oldest,) = self._one("SELECT MIN(ts) FROM gpu_samples")
        (first_look,) = self._one("SELECT MIN(ts) FROM activity_samples")
        span = 4.0 * settings.max_sample_gap_s  # a few observations: most stretches end there
        while True:
            bottom = self.lo if newest is None or newest - span <= oldest else newest - span
            self._read(bottom)
            run = idle_run_of(
                self._gpu,
                self._act,
                floor_of(self.session),
                held_by(self.session),
                settings,
                now,
                interactive=interactive,
                first_look=NEVER if first_look is None else float(first_look),
            )
            # A walk that ends inside what is read ends there in the whole history too; one
            # that reaches the oldest sample read goes on unless that is the oldest there is.
            if bottom <= self.lo or run.stopped_by is not None:
                return run
            span *= 4

    def last_seen(self, now: float) -> float | None:
        (gpu,) = self._one("SELECT MAX(ts) FROM gpu_samples", " AND ts <= ?", now)
        (act,) = self._one("SELECT MAX(ts) FROM activity_samples", " AND ts <= ?", now)
        seen = [float(t) for t in (gpu, act) if t is not None]
        return max(seen, default=None)

    def last_ssh(self, now: float) -> float | None:
        # what is read already answers if it saw a connection: it holds every newer sample
        read = [a.ts for a in self._act if a.ssh_sessions and a.ts <= now]
        if read:
            return max(read)
        if self._read_from is not None and self._read_from <= self.lo:
            return None  # all of it is read
        older = "" if self._read_from is None else " AND ts < ?"
        (found,) = self._one(
            "SELECT ts FROM activity_samples",
            f" AND ts <= ?{older} AND ssh != 0 ORDER BY ts DESC LIMIT 1",
            now,
            *([] if self._read_from is None else [self._read_from]),
        )
        return None if found is None else float(found)

    def unused_allocated(self, settings: ReapSettings, now: float) -> tuple[int, ...]:
        """`idle.right_size`, from two indexed reads: each allocated GPU's first sample, and
        which of them anything used in the last `idle_window`."""
        allocated = self.session.allocated_gpus
        if not allocated or len(allocated) < 2:
            return ()
        start = now - settings.idle_window_s
        first: dict[int, float] = {}
        for gpu in allocated:
            (ts,) = self._one(
                "SELECT ts FROM gpu_samples",
                " AND ts <= ? AND gpu = ? ORDER BY ts LIMIT 1",
                now,
                gpu,
            )
            if ts is not None:
                first[gpu] = float(ts)
        marks = ", ".join("?" * len(allocated))
        used = {
            row[0]
            for row in self._all(
                "SELECT DISTINCT gpu FROM gpu_samples",
                f" AND ts >= ? AND ts <= ? AND gpu IN ({marks}) AND (util IS NULL OR util >= ? "
                "OR vram IS NULL OR vram > 0)",
                start,
                now,
                *allocated,
                settings.util_threshold_pct,
            )
        }  # an unknown reading counts as used: the note must be true
        covered = [g for g in allocated if g in first and first[g] <= start]
        unused = tuple(g for g in covered if g not in used)
        return unused if unused and used else ()

    def first_seen_on(self, gpus: Collection[int]) -> float | None:
        marks = ", ".join("?" * len(gpus))
        (found,) = self._one(
            "SELECT ts FROM gpu_samples",
            f" AND gpu IN ({marks}) ORDER BY ts LIMIT 1",
            *gpus,
        )
        return None if found is None else float(found)

    def _read(self, bottom: float) -> None:
        """Read the samples from `bottom` on (those not read yet), oldest first."""
        if self._read_from is not None and bottom >= self._read_from:
            return
        cluster = self.session.cluster
        found = self.history.samples([cluster], bottom, until=self._read_from)
        gpu, act = found.get(cluster, ([], []))
        start = float(int(bottom))  # History.samples reads whole seconds
        if start < self.lo:  # the oldest it may read: what the evidence would drop, dropped
            gpu = [g for g in gpu if g.ts >= self.lo]
            act = [a for a in act if a.ts >= self.lo]
            start = self.lo
        self._gpu = gpu + self._gpu
        self._act = act + self._act
        self._read_from = start

    def _one(self, select: str, where: str = "", *args: Any) -> tuple[Any, ...]:
        row = self._all(select, where, *args)
        return tuple(row[0]) if row else (None,)

    def _all(self, select: str, where: str, *args: Any) -> list[Any]:
        sql = f"{select} WHERE cluster = ? AND ts >= ?{where}"
        return self.history.db.execute(sql, (self.session.cluster, self.lo, *args)).fetchall()
