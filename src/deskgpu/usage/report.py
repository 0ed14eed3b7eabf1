"""`deskgpu report`: who used the box and who held it idle, from the observation history.

Each observation stands for the time until the next one; when the next comes later than
`reap.max_sample_gap` (observe did not run: the box was down, the timer stopped), the
observation stands for one usual interval and the rest is a gap: gaps are listed and
counted nowhere, never as idle. A GPU row of a session is a GPU it held (its processes'
VRAM, or an allocation through the device plugin); the GPU is busy in that interval when
its utilization is at or over `reap.util_threshold_pct`, held idle below it, unknown when
the reading failed. So per GPU and hour: allocated = busy + idle + unknown.

Owners and jobs come from what observe recorded (`usage.store`), waits from the SkyPilot
job records observe kept; reap notices and teardowns from the audit log.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sqlite3
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

from deskgpu.errors import OutsideError
from deskgpu.reap.evidence import EvidenceError, iso, parse_ts
from deskgpu.state import usage as store

HOUR = 3600.0
AUDIT_TAIL_BYTES = 64 * 1024 * 1024  # a year of weekly runs is far less


@dataclass
class Usage:
    """GPU-seconds of one user, session or GPU-hour cell."""

    allocated_s: float = 0.0
    busy_s: float = 0.0
    idle_s: float = 0.0
    unknown_s: float = 0.0  # utilization unreadable

    def add(self, d: float, util: float | None, threshold: float) -> None:
        self.allocated_s += d
        if util is None:
            self.unknown_s += d
        elif util >= threshold:
            self.busy_s += d
        else:
            self.idle_s += d

    def add_usage(self, other: Usage) -> None:
        """Count `other`'s seconds here too (a user's sessions, an hour's or a node's GPUs)."""
        self.allocated_s += other.allocated_s
        self.busy_s += other.busy_s
        self.idle_s += other.idle_s
        self.unknown_s += other.unknown_s

    def to_dict(self) -> dict[str, float]:
        return {
            "gpu_hours_allocated": _h(self.allocated_s),
            "gpu_hours_busy": _h(self.busy_s),
            "gpu_hours_idle": _h(self.idle_s),
            "gpu_hours_unknown": _h(self.unknown_s),
        }


@dataclass
class SessionUsage:
    cluster: str
    owner: str
    job: str
    kind: str
    first: float
    last: float
    gpus: set[int] = field(default_factory=set)
    usage: Usage = field(default_factory=Usage)
    peak_vram_mib: float = 0.0
    waited_s: float | None = None
    notices: int = 0
    teardowns: int = 0

    def to_dict(self, names: dict[int, tuple[str, int]] | None = None) -> dict[str, Any]:
        """`names`: a cluster's GPUs (`Report.gpu_names`), shown as `node:index`."""
        gpus: list[Any] = sorted(self.gpus)
        if names:
            gpus = [f"{names[g][0]}:{names[g][1]}" if g in names else str(g) for g in gpus]
        return {
            "cluster": self.cluster,
            "owner": self.owner,
            "job": self.job,
            "kind": self.kind,
            "first_seen": iso(self.first),
            "last_seen": iso(self.last),
            "gpus": gpus,
            **self.usage.to_dict(),
            "peak_vram_mib": round(self.peak_vram_mib),
            "waited_queued_h": None if self.waited_s is None else _h(self.waited_s),
            "reap_notices": self.notices,
            "teardowns": self.teardowns,
        }


@dataclass
class UserUsage:
    user: str
    usage: Usage = field(default_factory=Usage)
    sessions: int = 0
    peak_vram_mib: float = 0.0
    waited_s: float = 0.0
    waits_known: int = 0
    still_waiting: int = 0
    notices: int = 0
    teardowns: int = 0

    def to_dict(self, waits_known: bool) -> dict[str, Any]:
        return {
            "user": self.user,
            "sessions": self.sessions,
            **self.usage.to_dict(),
            "peak_vram_mib": round(self.peak_vram_mib),
            "waited_queued_h": _h(self.waited_s) if waits_known else None,
            "jobs_waited": self.waits_known if waits_known else None,
            "still_waiting": self.still_waiting if waits_known else None,
            "reap_notices": self.notices,
            "teardowns": self.teardowns,
        }


@dataclass
class NodeUsage:
    """One node's GPU-hours over the window (Prometheus telemetry)."""

    node: str
    gpus: int
    usage: Usage = field(default_factory=Usage)
    sessions: int = 0
    users: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "gpus": self.gpus,
            "sessions": self.sessions,
            "users": sorted(self.users),
            **self.usage.to_dict(),
        }


@dataclass
class Report:
    since: float
    until: float
    threshold_pct: float
    gpus: int
    observed_s: float  # time the history covers inside the window
    gaps: list[tuple[float, float]]
    hour0: float  # start of the first hour column
    hours: int
    cells: dict[tuple[int, int], Usage]  # (gpu, hour index) -> usage, deduplicated per GPU
    covered: list[float]  # observed seconds per hour column
    box: Usage
    users: list[UserUsage]
    sessions: list[SessionUsage]
    user_filter: str | None = None
    waits_known: bool = False
    notes: list[str] = field(default_factory=list)
    reap_runs: int = 0
    # The history's first observation; time before it is not observed yet, not a gap.
    first_observation: float | None = None
    # Over Prometheus (`make_cluster`): each GPU row of the cells is a node's GPU,
    # numbered node by node, and the totals per node.
    gpu_names: dict[int, tuple[str, int]] = field(default_factory=dict)
    nodes: list[NodeUsage] = field(default_factory=list)

    def gpu_label(self, gpu: int) -> str:
        if gpu in self.gpu_names:
            node, index = self.gpu_names[gpu]
            return f"{node} GPU {index}"
        return f"GPU {gpu}"

    def before_first_observation(self, h: int) -> bool:
        """Whether hour column `h` ends before deskgpu first looked (or it never has)."""
        first = self.first_observation
        return first is None or self.hour0 + (h + 1) * HOUR <= first

    def hour_totals(self) -> list[Usage]:
        out = [Usage() for _ in range(self.hours)]
        for (_, h), u in self.cells.items():
            out[h].add_usage(u)
        return out

    def ranked_hours(self, key: str, n: int = 3) -> list[dict[str, Any]]:
        totals = self.hour_totals()
        order = sorted(
            (h for h in range(self.hours) if self.covered[h] > 0),
            key=lambda h: (-getattr(totals[h], key), h),
        )
        return [
            {"hour": iso(self.hour0 + h * HOUR), **totals[h].to_dict()}
            for h in order[:n]
            if getattr(totals[h], key) > 0
        ]

    def max_imbalance_s(self) -> float:
        """The largest |allocated - busy - idle - unknown| of any GPU-hour cell."""
        return max(
            (abs(u.allocated_s - u.busy_s - u.idle_s - u.unknown_s) for u in self.cells.values()),
            default=0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        window_s = self.until - self.since
        return {
            "since": iso(self.since),
            "until": iso(self.until),
            "util_threshold_pct": self.threshold_pct,
            "user": self.user_filter,
            "notes": self.notes,
            "box": {
                "gpus": self.gpus,
                "window_h": _h(window_s),
                "observed_h": _h(self.observed_s),
                "gpu_hours_observed": _h(self.observed_s * self.gpus),
                **self.box.to_dict(),
                "gpu_hours_free": _h(max(0.0, self.observed_s * self.gpus - self.box.allocated_s)),
                "gaps": [{"from": iso(a), "to": iso(b), "hours": _h(b - a)} for a, b in self.gaps],
                "busiest_hours": self.ranked_hours("busy_s"),
                "idlest_hours": self.ranked_hours("idle_s"),
                "reap_runs": self.reap_runs,
                "max_cell_imbalance_s": round(self.max_imbalance_s(), 6),
            },
            **({"nodes": [n.to_dict() for n in self.nodes]} if self.nodes else {}),
            "users": [u.to_dict(self.waits_known) for u in self.users],
            "sessions": [s.to_dict(self.gpu_names) for s in self.sessions],
        }

    def user_line(self, user: UserUsage) -> str:
        """One user's week in one sentence (what `notify_command` sends them)."""
        u = user.usage
        share = f" ({100 * u.idle_s / u.allocated_s:.0f}% of it idle)" if u.allocated_s else ""
        wait = (
            f"; waited {_h(user.waited_s)} h Queued"
            if self.waits_known and user.waits_known
            else ""
        )
        reaped = (
            f"; {user.notices} reap notice(s), {user.teardowns} teardown(s)"
            if user.notices or user.teardowns
            else ""
        )
        return (
            f"{user.user}: {_h(u.allocated_s)} GPU-h held in {user.sessions} session(s) "
            f"{iso(self.since)}..{iso(self.until)}, {_h(u.busy_s)} busy, "
            f"{_h(u.idle_s)} idle{share}; peak VRAM {round(user.peak_vram_mib)} MiB"
            f"{wait}{reaped}"
        )


def _h(seconds: float) -> float:
    return round(seconds / HOUR, 2)


@contextmanager
def open_readonly(path: Path) -> Iterator[sqlite3.Connection]:
    """The history, read-only and without creating anything; failures are `OutsideError`s."""
    try:
        path.stat()
    except FileNotFoundError:
        raise OutsideError(
            f"no observation history at {path}: is `deskgpu observe` running?"
        ) from None
    except OSError as exc:
        raise OutsideError(f"cannot read the observation history {path}: {exc}") from None
    if not os.access(path, os.R_OK):
        raise OutsideError(f"the observation history {path} is not readable by this user")
    from deskgpu.state.history import read_only

    with read_only(path, timeout_s=30.0) as db:  # a hot journal is rolled back privately
        try:
            yield db
        except sqlite3.Error as exc:
            raise OutsideError(f"observation history {path}: {exc}") from None


def build(
    db: sqlite3.Connection,
    *,
    since: float,
    until: float,
    threshold_pct: float,
    max_gap_s: float,
    user: str | None = None,
    audit_file: Path | None = None,
) -> Report:
    """The report of `[since, until)` from an open history.

    A window reaching back past the history starts at its first observation (what came
    before is not a gap, it is before deskgpu looked): the report, and its page, grow with
    the data, not with the window asked for."""
    notes: list[str] = []
    first = db.execute("SELECT MIN(ts) FROM observations").fetchone()[0]
    start = float(first) if first is not None else until - HOUR
    if since < start:
        if first is not None:
            notes.append(f"the history starts at {iso(start)}: the report covers from there")
        since = min(start, until)  # a window that ends before the history is empty
    if first is None or float(first) >= until:
        notes.append(
            "no observation yet in this window: nothing is counted before `deskgpu observe` "
            "records its first (is its timer running?)"
        )
    obs = [
        int(r[0])
        for r in db.execute(
            "SELECT ts FROM observations WHERE ts >= ? AND ts < ? ORDER BY ts",
            (int(since), int(until)),
        )
    ]
    steps = [b - a for a, b in itertools.pairwise(obs) if b - a <= max_gap_s]
    nominal = float(min(statistics.median(steps), max_gap_s)) if steps else min(300.0, max_gap_s)
    cover: dict[int, float] = {}
    gaps: list[tuple[float, float]] = []
    if not obs:
        if first is not None and float(first) < since:  # observed before, then not: a gap
            gaps.append((since, until))
    elif obs[0] - since > max_gap_s:
        gaps.append((since, float(obs[0])))
    for i, ts in enumerate(obs):
        nxt = obs[i + 1] if i + 1 < len(obs) else until
        span = nxt - ts
        if span <= max_gap_s:
            cover[ts] = float(span)
        else:
            cover[ts] = min(nominal, float(until - ts))
            gaps.append((ts + cover[ts], float(nxt)))
    hour0 = since - since % HOUR
    hours = max(1, int((until - hour0 + HOUR - 1) // HOUR))
    covered = [0.0] * hours
    for ts, d in cover.items():
        covered[int((ts - hour0) // HOUR)] += d

    infos = store.sessions(db)
    if infos is None:
        notes.append(
            "this history predates owner records (usage_sessions): sessions show owner `?`"
        )
        infos = []
    by_cluster: dict[str, list[store.SessionInfo]] = defaultdict(list)
    for info in infos:
        by_cluster[info.cluster].append(info)

    rows = db.execute(
        "SELECT cluster, ts, gpu, util, vram FROM gpu_samples WHERE ts >= ? AND ts < ?",
        (int(since), int(until)),
    ).fetchall()
    tally = Tally(cover, hour0, by_cluster, threshold_pct)
    tally.add(rows)
    cells, box, sessions, max_gpu = tally.cells, tally.box, tally.sessions, tally.max_gpu
    user_vram = tally.peaks()

    gpus = store.box_gpus(db, since, until) or max_gpu + 1
    users: dict[str, UserUsage] = {}
    for s in sessions.values():
        uu = users.setdefault(s.owner, UserUsage(s.owner))
        uu.sessions += 1
        uu.usage.add_usage(s.usage)
    for owner, mib in user_vram.items():
        users[owner].peak_vram_mib = mib

    waits_known = _add_waits(db, since, until, sessions, users, notes)
    runs = _add_audit(audit_file, since, until, sessions, users, notes)
    if gaps:
        total = sum(b - a for a, b in gaps)
        notes.append(
            f"{len(gaps)} gap(s) in the history ({_h(total)} h): not counted, neither busy nor idle"
        )
    chosen_users = sorted(users.values(), key=lambda x: (-x.usage.allocated_s, x.user))
    chosen_sessions = sorted(sessions.values(), key=lambda x: (x.owner, x.first, x.cluster))
    if user is not None:
        chosen_users = [x for x in chosen_users if x.user == user]
        chosen_sessions = [x for x in chosen_sessions if x.owner == user]
        if not chosen_users:
            notes.append(f"no session of {user} in this window")
    return Report(
        since=since,
        until=until,
        threshold_pct=threshold_pct,
        gpus=gpus,
        observed_s=sum(cover.values()),
        gaps=gaps,
        hour0=hour0,
        hours=hours,
        cells=dict(cells),
        covered=covered,
        box=box,
        users=chosen_users,
        sessions=chosen_sessions,
        user_filter=user,
        waits_known=waits_known,
        notes=notes,
        reap_runs=runs,
        first_observation=None if first is None else float(first),
    )


Row = tuple[str, int, int, float | None, float | None]  # cluster, ts, gpu, util, VRAM


class Tally:
    """The GPU samples of a window counted per session, per GPU-hour cell and for the box.

    `add_rows` is the definition: each sample in the order SQLite scanned the table. `add`
    counts the same by column, at C speed (a month of 50 sessions is ~0.5 M samples), to
    the last bit: every span but the window's last is whole seconds or a half (observation
    times are whole seconds, the key of their table), so sums of them are exact in any
    order; the last observation's span (up to `until`, any fraction) is added sample by
    sample after them, as `add_rows` adds it when those samples come last, as observe
    writes them (otherwise `add_rows` counts all).
    """

    def __init__(
        self,
        cover: dict[int, float],
        hour0: float,
        by_cluster: dict[str, list[store.SessionInfo]],
        threshold_pct: float,
    ) -> None:
        self.cover = cover
        self.hour0 = hour0
        self.by_cluster = by_cluster
        self.threshold_pct = threshold_pct
        self.cells: dict[tuple[int, int], Usage] = defaultdict(Usage)
        self.seen_cell: set[tuple[int, int]] = set()  # (gpu, ts) counted for the box already
        self.box = Usage()
        self.sessions: dict[tuple[str, int], SessionUsage] = {}
        self.vram_at: dict[tuple[tuple[str, int], int], float] = defaultdict(float)
        # what add counted by column: VRAM per session and time, each session's peak
        self.head_vram: dict[tuple[tuple[str, int], int], float] = {}
        self.head_peak: dict[tuple[str, int], float] = {}
        self.max_gpu = -1

    def add(self, rows: list[Row]) -> None:
        """`add_rows`, by column where that counts alike."""
        last = max(self.cover, default=None)
        if last is None or not rows:
            return self.add_rows(rows)
        stamps = list(map(itemgetter(1), rows))
        tail = stamps.index(last) if last in stamps else len(rows)
        if stamps.count(last) != len(rows) - tail:  # the last observation's rows not last
            return self.add_rows(rows)
        if self._add_columns(rows[:tail], stamps[:tail]):
            self.add_rows(rows[tail:])
        else:
            self.add_rows(rows)

    def add_rows(self, rows: Iterable[Row]) -> None:
        """Count each sample in turn."""
        cover, threshold_pct = self.cover, self.threshold_pct
        for cluster, ts, gpu, util, vram in rows:
            span_s = cover.get(ts)
            if span_s is None:  # a sample without its observation row: not from observe
                continue
            self.max_gpu = max(self.max_gpu, gpu)
            u = None if util is None else float(util)
            key, s = self._session(cluster, ts)
            s.first, s.last = min(s.first, ts), max(s.last, ts)
            s.gpus.add(gpu)
            s.usage.add(span_s, u, threshold_pct)
            self.vram_at[(key, ts)] += float(vram or 0)
            if (gpu, ts) not in self.seen_cell:  # two sessions on one GPU: the GPU counts once
                self.seen_cell.add((gpu, ts))
                self.box.add(span_s, u, threshold_pct)
                self.cells[(gpu, int((ts - self.hour0) // HOUR))].add(span_s, u, threshold_pct)

    def _session(self, cluster: str, ts: int) -> tuple[tuple[str, int], SessionUsage]:
        inc = _incarnation(self.by_cluster.get(cluster), ts)
        key = (cluster, inc.created_at if inc else 0)
        s = self.sessions.get(key)
        if s is None:
            s = self.sessions[key] = SessionUsage(
                cluster,
                inc.owner if inc else "?",
                inc.job if inc else cluster,
                inc.kind if inc else "?",
                ts,
                ts,
            )
        return key, s

    def _add_columns(self, rows: list[Row], stamps: list[int]) -> bool:
        """Count `rows` (before any other) as `add_rows` would; False: a sample without its
        observation row, left uncounted for `add_rows`."""
        if not rows:
            return True
        found = list(map(self.cover.get, stamps))
        if None in found:
            return False
        spans = cast("list[float]", found)
        clusters, gpus, utils, vrams = (list(map(itemgetter(i), rows)) for i in (0, 2, 3, 4))
        # each sample's session: one per cluster name, but where a name was used again
        plain = self._plain_keys(clusters)
        keys = list(map(plain.get, clusters))
        if len(plain) < len(set(clusters)):
            for i in [i for i, key in enumerate(keys) if key is None]:
                keys[i] = (clusters[i], self._incarnation_at(clusters[i], stamps[i]))
        firsts = dict(zip(reversed(keys), reversed(range(len(rows))), strict=True))
        for key in sorted(firsts, key=firsts.__getitem__):  # created in add_rows' order
            i = firsts[key]
            self._session(clusters[i], stamps[i])
        sessions = cast("dict[tuple[str, int] | None, SessionUsage]", self.sessions)
        # busy (True), idle (False) or unknown (None), as Usage.add tells them apart
        threshold = self.threshold_pct
        kinds = [None if u is None else float(u) >= threshold for u in utils]
        self.max_gpu = max(self.max_gpu, max(gpus))
        for (key, kind, span), n in Counter(zip(keys, kinds, spans, strict=True)).items():
            _count(sessions[key].usage, kind, span, n)
        held = set(zip(keys, gpus, strict=True))
        for key, gpu in held:
            sessions[key].gpus.add(gpu)
        if stamps == sorted(stamps):  # as observe writes them: first and last are the ends
            lasts = dict(zip(keys, stamps, strict=True))
            for key, i in firsts.items():
                sessions[key].first, sessions[key].last = stamps[i], lasts[key]
        else:
            for key, ts in zip(keys, stamps, strict=True):
                s = sessions[key]
                s.first, s.last = min(s.first, ts), max(s.last, ts)
        # VRAM per session and time: one sample each, unless a session has several GPUs
        times = list(zip(keys, stamps, strict=True))
        known = list(map(float, vrams if None not in vrams else map(_or_zero, vrams)))
        vram_at = dict(zip(times, known, strict=True))
        alone = len(vram_at) == len(rows)
        if not alone:
            vram_at = defaultdict(float)
            for at, mib in zip(times, vrams, strict=True):
                vram_at[at] += float(mib or 0)
        peak = cast("dict[tuple[str, int] | None, float]", self.head_peak)
        each = zip(keys, known, strict=True) if alone else ((k, v) for (k, _), v in vram_at.items())
        for key, mib in each:
            if mib > peak.get(key, 0.0):
                peak[key] = mib
        self.head_vram = cast("dict[tuple[tuple[str, int], int], float]", vram_at)
        # The box and its cells: each GPU's first sample at each time. With one GPU to a
        # session and a session to a GPU, and one sample per session and time, that is all.
        if not (alone and len(held) == len({k for k, _ in held}) == len({g for _, g in held})):
            first_of = dict(
                zip(
                    zip(reversed(gpus), reversed(stamps), strict=True),
                    range(len(rows) - 1, -1, -1),
                    strict=True,
                )
            )
            if len(first_of) < len(rows):  # two sessions on one GPU: the first sample counts
                picked = sorted(first_of.values())
                gpus = [gpus[i] for i in picked]
                stamps = [stamps[i] for i in picked]
                kinds = [kinds[i] for i in picked]
                spans = [spans[i] for i in picked]
        # (add_rows' seen_cell is left as it is: the last observation's samples, all that
        # comes after, are at another time)
        hour0 = self.hour0
        hour_of = {ts: int((ts - hour0) // HOUR) for ts in self.cover}
        hours = list(map(hour_of.__getitem__, stamps))
        per_cell = Counter(zip(gpus, hours, kinds, spans, strict=True))
        for gpu, hour, _, _ in per_cell:  # created in the order add_rows creates them
            self.cells.setdefault((gpu, hour), Usage())
        box: Counter[tuple[bool | None, float]] = Counter()
        for (gpu, hour, kind, span), n in per_cell.items():
            _count(self.cells[(gpu, hour)], kind, span, n)
            box[(kind, span)] += n
        for (kind, span), n in box.items():
            _count(self.box, kind, span, n)
        return True

    def _incarnation_at(self, cluster: str, ts: int) -> int:
        inc = _incarnation(self.by_cluster.get(cluster), ts)
        return inc.created_at if inc else 0

    def _plain_keys(self, clusters: list[str]) -> dict[str, tuple[str, int]]:
        """The session of each cluster whose name was used once (or never recorded)."""
        out = {}
        for cluster in set(clusters):
            infos = self.by_cluster.get(cluster)
            if not infos or len(infos) == 1:
                out[cluster] = (cluster, infos[0].created_at if infos else 0)
        return out

    def peaks(self) -> dict[str, float]:
        """Each session's peak VRAM (set on it) and each owner's (returned): the most its
        processes held at once, summed over the owner's sessions at each time."""
        best = dict(self.head_peak)
        for (key, _ts), mib in self.vram_at.items():
            if mib > best.get(key, 0.0):
                best[key] = mib
        for key, mib in best.items():
            self.sessions[key].peak_vram_mib = mib
        owners: dict[str, list[SessionUsage]] = defaultdict(list)
        for s in self.sessions.values():
            owners[s.owner].append(s)
        # an owner of one session: its peak; of several, their sum at each time
        peaks = {o: mine[0].peak_vram_mib for o, mine in owners.items() if len(mine) == 1}
        if len(peaks) < len(owners):
            user_vram: dict[tuple[str, int], float] = defaultdict(float)
            for (key, ts), mib in chain(self.head_vram.items(), self.vram_at.items()):
                owner = self.sessions[key].owner
                if owner not in peaks:
                    user_vram[(owner, ts)] += mib
            for (owner, _ts), mib in user_vram.items():
                peaks[owner] = max(peaks.get(owner, 0.0), mib)
        return peaks


def _or_zero(mib: float | None) -> float:
    return mib or 0


def _count(usage: Usage, kind: bool | None, span: float, n: int) -> None:
    """`n` samples of one kind and span, added to `usage` (exact: whole or half seconds)."""
    d = span * n
    usage.allocated_s += d
    if kind is None:
        usage.unknown_s += d
    elif kind:
        usage.busy_s += d
    else:
        usage.idle_s += d


def _incarnation(infos: list[store.SessionInfo] | None, ts: int) -> store.SessionInfo | None:
    if not infos:
        return None
    for info in infos:
        if info.first_seen <= ts <= info.last_seen:
            return info
    return min(infos, key=lambda i: min(abs(ts - i.first_seen), abs(ts - i.last_seen)))


def _add_waits(
    db: sqlite3.Connection,
    since: float,
    until: float,
    sessions: dict[tuple[str, int], SessionUsage],
    users: dict[str, UserUsage],
    notes: list[str],
) -> bool:
    records = store.waits(db)
    if records is None:
        notes.append(
            "time waited Queued is unknown: the history holds no SkyPilot job records "
            "(observe records them when the API server answers it)"
        )
        return False
    by_name: dict[str, list[SessionUsage]] = defaultdict(list)
    for s in sessions.values():
        by_name[s.cluster].append(s)
    for r in records:
        end = r.started_at or r.running_seen or r.last_seen
        if end < since or (r.submitted_at or r.last_seen) >= until:
            continue
        waited, ongoing = r.waited_s(min(until, float(r.last_seen)))
        if waited is None:
            continue
        uu = users.setdefault(r.owner, UserUsage(r.owner))
        uu.waited_s += waited
        uu.waits_known += 1
        uu.still_waiting += int(ongoing)
        for s in by_name.get(r.name, []):
            s.waited_s = (s.waited_s or 0.0) + waited
    return True


def _add_audit(
    path: Path | None,
    since: float,
    until: float,
    sessions: dict[tuple[str, int], SessionUsage],
    users: dict[str, UserUsage],
    notes: list[str],
) -> int:
    """Count notices and teardowns per owner and session; returns the `reap --yes` runs."""
    if path is None:
        return 0
    try:
        from deskgpu.state.audit import tail_lines

        lines = tail_lines(path, AUDIT_TAIL_BYTES)
    except FileNotFoundError:
        notes.append(f"no audit log at {path}: no reap notices or teardowns recorded")
        return 0
    except OSError as exc:
        notes.append(f"reap notices and teardowns unknown: cannot read {path}: {exc.strerror}")
        return 0
    final: dict[tuple[str, str], tuple[str, str, bool]] = {}  # (run, subject) -> did, owner, ok
    runs = 0
    for raw in lines:
        try:
            rec = json.loads(raw)
            when = parse_ts(rec.get("ts"), "audit log") if isinstance(rec, dict) else None
        except (ValueError, RecursionError, EvidenceError):
            continue
        if when is None or not since <= when < until:
            continue
        if rec.get("event") == "run":
            runs += 1
        elif rec.get("event") == "action":
            key = (str(rec.get("run_id")), str(rec.get("subject")))
            final[key] = (str(rec.get("did")), str(rec.get("owner")), rec.get("ok") is True)
    by_name: dict[str, list[SessionUsage]] = defaultdict(list)
    for s in sessions.values():
        by_name[s.cluster].append(s)
    for (_run, subject), (did, owner, ok) in final.items():
        if not ok or did not in ("warned", "torn-down"):
            continue
        uu = users.setdefault(owner, UserUsage(owner))
        targets = by_name.get(subject, [])
        if did == "warned":
            uu.notices += 1
            for s in targets[-1:]:
                s.notices += 1
        else:
            uu.teardowns += 1
            for s in targets[-1:]:
                s.teardowns += 1
    return runs


def make(settings: Any, *, since_s: float, now: float, user: str | None = None) -> Report:
    """The report of the last `since_s` seconds from the history `settings` names."""
    with open_readonly(settings.history_file) as db:
        return build(
            db,
            since=now - since_s,
            until=now,
            threshold_pct=settings.util_threshold_pct,
            max_gap_s=settings.max_sample_gap_s,
            user=user,
            audit_file=settings.audit_file,
        )


def text_lines(report: Report) -> list[str]:
    """The report as plain text: the box, then users, then sessions."""
    d = report.to_dict()
    b = d["box"]
    out = [
        f"deskgpu report {d['since']} .. {d['until']}"
        + (f" (user {report.user_filter})" if report.user_filter else ""),
        f"box: {b['gpus']} GPU(s), observed {b['observed_h']} of {b['window_h']} h; "
        f"{b['gpu_hours_allocated']} GPU-h allocated = {b['gpu_hours_busy']} busy "
        f"(>= {report.threshold_pct:g}% util) + {b['gpu_hours_idle']} held idle"
        + (f" + {b['gpu_hours_unknown']} unknown" if b["gpu_hours_unknown"] else "")
        + f"; {b['gpu_hours_free']} free; {b['reap_runs']} reap run(s)",
    ]
    for g in b["gaps"]:
        out.append(f"gap: {g['from']} .. {g['to']} ({g['hours']} h, not counted)")
    for label, key in (("busiest hours", "busiest_hours"), ("idlest hours", "idlest_hours")):
        if b[key]:
            field_ = "gpu_hours_busy" if key == "busiest_hours" else "gpu_hours_idle"
            out.append(f"{label}: " + ", ".join(f"{h['hour']} ({h[field_]} GPU-h)" for h in b[key]))
    rows = [("USER", "SESS", "ALLOC_H", "BUSY_H", "IDLE_H", "IDLE%", "PEAK_VRAM", "QUEUED_H",
             "NOTICES", "TEARDOWNS")]  # fmt: skip
    for u in d["users"]:
        alloc = u["gpu_hours_allocated"]
        rows.append(
            (
                u["user"],
                str(u["sessions"]),
                f"{alloc:.2f}",
                f"{u['gpu_hours_busy']:.2f}",
                f"{u['gpu_hours_idle']:.2f}",
                f"{100 * u['gpu_hours_idle'] / alloc:.0f}%" if alloc else "-",
                f"{u['peak_vram_mib']} MiB",
                "?" if u["waited_queued_h"] is None else f"{u['waited_queued_h']:.2f}",
                str(u["reap_notices"]),
                str(u["teardowns"]),
            )
        )
    out += ["", *_table(rows)]
    if d.get("nodes"):
        nrows = [("NODE", "GPUS", "SESS", "USERS", "ALLOC_H", "BUSY_H", "IDLE_H", "IDLE%")]
        for n in d["nodes"]:
            alloc = n["gpu_hours_allocated"]
            nrows.append(
                (
                    n["node"],
                    str(n["gpus"]),
                    str(n["sessions"]),
                    ",".join(n["users"]) or "-",
                    f"{alloc:.2f}",
                    f"{n['gpu_hours_busy']:.2f}",
                    f"{n['gpu_hours_idle']:.2f}",
                    f"{100 * n['gpu_hours_idle'] / alloc:.0f}%" if alloc else "-",
                )
            )
        out += ["", *_table(nrows)]
    # GPUS counts like the queue's column; ON_GPU names them (nvidia-smi's indices).
    srows = [("SESSION", "OWNER", "JOB", "KIND", "GPUS", "ON_GPU", "ALLOC_H", "BUSY_H",
              "IDLE_H", "PEAK_VRAM", "QUEUED_H")]  # fmt: skip
    for s in d["sessions"]:
        srows.append(
            (
                s["cluster"],
                s["owner"],
                s["job"],
                s["kind"],
                str(len(s["gpus"])),
                ",".join(map(str, s["gpus"])) or "-",
                f"{s['gpu_hours_allocated']:.2f}",
                f"{s['gpu_hours_busy']:.2f}",
                f"{s['gpu_hours_idle']:.2f}",
                f"{s['peak_vram_mib']} MiB",
                "?" if s["waited_queued_h"] is None else f"{s['waited_queued_h']:.2f}",
            )
        )
    out += ["", *_table(srows)]
    return out


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def make_cluster(
    config: Any, settings: Any, *, since_s: float, now: float, user: str | None = None
) -> Report:
    """The report of every node, from Prometheus (`telemetry:`): each node's GPUs read at
    the same instants every `CLUSTER_STEP_S`, counted as the box's own history is, then
    totalled per node. Owners and jobs are the pods' labels (dcgm-exporter's allow-list)."""
    from deskgpu.state.history import open_history
    from deskgpu.telemetry import history as replayed
    from deskgpu.telemetry.promapi import Prometheus

    tele = config.telemetry
    prom = Prometheus(tele.prometheus)
    since, until = now - since_s, now
    seen = replayed.sessions_seen(prom, since, until)
    order = [n.name for n in config.nodes] + sorted({s.node for s in seen})
    nodes = list(dict.fromkeys(order))
    sizes = {n.name: n.gpu_count for n in config.nodes}
    for s in seen:
        sizes[s.node] = max(sizes.get(s.node, 0), max(s.gpus) + 1)
    offset: dict[str, int] = {}
    total = 0
    for name in nodes:
        offset[name] = total
        total += sizes.get(name, 0)
    names = {offset[n] + i: (n, i) for n in nodes for i in range(sizes.get(n, 0))}
    wanted = [
        replayed.Wanted(s.on_cloud, s.on_cloud, s.node, s.gpus, offset=offset[s.node]) for s in seen
    ]
    step = max(CLUSTER_STEP_S, float(math.ceil(since_s / replayed.MAX_POINTS)))
    with open_history(":memory:") as history:
        replayed.replay(prom, wanted, since, until, tele, history, grid_s=step)
        store.ensure(history.db)
        with history.db:
            for s in seen:
                history.db.execute(
                    "INSERT OR REPLACE INTO usage_sessions VALUES (?, 0, ?, ?, ?, ?, ?)",
                    (s.on_cloud, s.owner, s.job, s.kind, int(since), int(until)),
                )
            history.db.executemany(
                "INSERT OR REPLACE INTO usage_box VALUES (?, ?)",
                [(int(ts), total) for (ts,) in history.db.execute("SELECT ts FROM observations")],
            )
        report = build(
            history.db,
            since=since,
            until=until,
            threshold_pct=settings.util_threshold_pct,
            max_gap_s=max(settings.max_sample_gap_s, 2 * step),
            user=user,
            audit_file=settings.audit_file,
        )
    per_node = {n: NodeUsage(n, sizes.get(n, 0)) for n in nodes}
    for (gpu, _), cell in report.cells.items():  # each GPU-hour on the node it is on
        per_node[names[gpu][0]].usage.add_usage(cell)
    for su in report.sessions:
        for node in sorted({names[g][0] for g in su.gpus if g in names}):
            per_node[node].sessions += 1
            per_node[node].users.add(su.owner)
    report.gpu_names = names
    report.nodes = list(per_node.values())
    report.notes.insert(0, f"every node's GPUs, from Prometheus at {tele.prometheus}")
    return report


CLUSTER_STEP_S = 300.0  # the observe timer's period: the box's history is as fine
