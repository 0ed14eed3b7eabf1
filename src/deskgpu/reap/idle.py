"""How far back a session's samples prove it idle, and the other questions the rule asks them.

`idle_run` is the definition: a walk back from the newest observation, one at a time, that
ends at the first one proving nothing or something. `fast_idle_run` gives the same answer
without the walk over the stretch: on the shape every history and recorded document has (the
same GPUs in every observation, one activity row each) it scans each column once with
builtins, finds the newest observation that any signal faults, and lets the walk judge that
one; any other shape takes the walk. The zombie rule asks its questions through
`SessionSamples`: `InMemorySamples` answers from an evidence's own samples,
`reap.history_samples` from the SQLite history without reading every sample.
"""

from __future__ import annotations

import datetime as dt
from bisect import bisect_left
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from operator import itemgetter, sub
from typing import Protocol, TypeVar, cast

from deskgpu.config.reap import ReapSettings
from deskgpu.reap.evidence import ActivitySample, GpuSample, Session

NEVER = float("-inf")
T = TypeVar("T")
_N = TypeVar("_N", int, float)
# A sample's fields by position (samples are tuples): its columns are read at C speed.
_TS = itemgetter(0)  # GpuSample.ts, ActivitySample.ts
_GPU = _SSH = itemgetter(1)  # GpuSample.gpu, ActivitySample.ssh_sessions
_UTIL = _CPU = itemgetter(2)  # GpuSample.util_pct, ActivitySample.cpu_pct


@dataclass(frozen=True)
class IdleRun:
    """The trailing stretch of observations that all look idle."""

    since: float | None  # the oldest idle observation of the stretch; None: none at all
    stopped_by: str | None  # what ended the stretch going back in time; None: history start
    peak_util_pct: float = 0.0


def when(ts: float) -> str:
    """`Nov 21 14:02 UTC`: reasons are read by people, and logs are compared across hosts."""
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%b %d %H:%M UTC")


class SessionSamples(Protocol):
    """What the zombie rule asks of one session's samples (those of the evidence)."""

    def idle_run(self, settings: ReapSettings, now: float, *, interactive: bool) -> IdleRun:
        """The trailing idle stretch (`idle_run`)."""
        ...

    def last_seen(self, now: float) -> float | None:
        """The newest observation of it at or before `now`."""
        ...

    def last_ssh(self, now: float) -> float | None:
        """The newest observation at or before `now` that saw an SSH/IDE connection."""
        ...

    def unused_allocated(self, settings: ReapSettings, now: float) -> tuple[int, ...]:
        """The right-sizing note's GPUs (`right_size`)."""
        ...

    def first_seen_on(self, gpus: Collection[int]) -> float | None:
        """The oldest sample of any of these GPUs."""
        ...


class InMemorySamples:
    """`SessionSamples` from the evidence's own samples: by column (`fast`, the default) or
    by the straightforward walks that define the answers (the tests' oracle)."""

    def __init__(self, session: Session, *, fast: bool = True) -> None:
        self.session = session
        self.fast = fast

    def idle_run(self, settings: ReapSettings, now: float, *, interactive: bool) -> IdleRun:
        run = fast_idle_run if self.fast else idle_run
        return run(self.session, settings, now, interactive=interactive)

    def last_seen(self, now: float) -> float | None:
        seen = [g.ts for g in self.session.gpu_samples if g.ts <= now]
        seen += [a.ts for a in self.session.activity_samples if a.ts <= now]
        return max(seen, default=None)

    def last_ssh(self, now: float) -> float | None:
        acts = self.session.activity_samples
        if self.fast and not any(map(_SSH, acts)):
            return None  # never an SSH/IDE connection: one pass, no walk
        return max((a.ts for a in acts if a.ssh_sessions and a.ts <= now), default=None)

    def unused_allocated(self, settings: ReapSettings, now: float) -> tuple[int, ...]:
        return right_size(self.session, settings, now)

    def first_seen_on(self, gpus: Collection[int]) -> float | None:
        return min((g.ts for g in self.session.gpu_samples if g.gpu in gpus), default=None)


def floor_of(session: Session) -> float:
    """Samples before the session was created are another session's of the same name."""
    return session.created_at if session.created_at is not None else NEVER


def held_by(session: Session) -> set[int]:
    """The GPUs every observation of an idle stretch must have read."""
    return set(session.gpus) | set(session.allocated_gpus or ())


def idle_run(session: Session, settings: ReapSettings, now: float, *, interactive: bool) -> IdleRun:
    """Walk the observations back from `now` while each one proves the session idle.

    A batch job's stretch ignores SSH (a job may be watched over SSH and still be stalled).
    """
    return idle_run_of(
        session.gpu_samples,
        session.activity_samples,
        floor_of(session),
        held_by(session),
        settings,
        now,
        interactive=interactive,
        fast=False,
    )


def fast_idle_run(
    session: Session, settings: ReapSettings, now: float, *, interactive: bool
) -> IdleRun:
    """`idle_run`'s answer, by column (hot path of `bench/reap.py`)."""
    return idle_run_of(
        session.gpu_samples,
        session.activity_samples,
        floor_of(session),
        held_by(session),
        settings,
        now,
        interactive=interactive,
    )


def idle_run_of(
    gpu_samples: Sequence[GpuSample],
    activity_samples: Sequence[ActivitySample],
    floor: float,
    held: set[int],
    settings: ReapSettings,
    now: float,
    *,
    interactive: bool,
    first_look: float | None = None,
    fast: bool = True,
) -> IdleRun:
    """The idle stretch of these samples (those from `floor` on).

    `first_look` is the session's first activity reading when the samples are only the
    newest of its history (`reap.history_samples`); by default, their own first.
    """
    if fast:
        run = _by_column(
            gpu_samples, activity_samples, floor, held, settings, now, interactive, first_look
        )
        if run is not None:
            return run
    rows = [g for g in gpu_samples if g.ts >= floor]
    if any(rows[i].ts > rows[i + 1].ts for i in range(len(rows) - 1)):
        rows.sort(key=lambda g: g.ts)
    activity = {a.ts: a for a in activity_samples if a.ts >= floor}
    # The newest observation with no GPU reading ends the stretch: it proves nothing.
    newest_bare = max(set(activity).difference(g.ts for g in rows), default=NEVER)
    newest = max(rows[-1].ts if rows else NEVER, newest_bare)
    if newest == NEVER:
        return IdleRun(None, "no observations in the history")
    if now - newest > settings.max_sample_gap_s:
        return IdleRun(None, f"no observation since {when(newest)}")
    # CPU % is a rate: the session's first observation has no earlier reading to compare
    # with, so its unknown CPU is forgiven. Any later unknown CPU ends the stretch.
    if first_look is None:
        first_look = min(activity, default=NEVER)
    return walk_back(
        rows,
        len(rows) - 1,
        activity.get,
        held,
        settings,
        interactive=interactive,
        newest_bare=newest_bare,
        first_look=first_look,
    )


def walk_back(
    rows: Sequence[GpuSample],
    i: int,
    activity_at: Callable[[float], ActivitySample | None],
    held: set[int],
    settings: ReapSettings,
    *,
    interactive: bool,
    newest_bare: float,
    first_look: float,
    since: float | None = None,
    peak: float = 0.0,
    previous: float | None = None,
) -> IdleRun:
    """The walk from `rows[i]` back (rows oldest first), carrying on from the stretch the
    newer observations made (`since`, `peak`, `previous`): each observation checked in turn."""
    gap = settings.max_sample_gap_s
    threshold = settings.util_threshold_pct
    busy = settings.cpu_busy_pct
    while i >= 0:
        ts = rows[i].ts
        if newest_bare > ts:
            return IdleRun(since, f"no GPU reading at {when(newest_bare)}", peak)
        if previous is not None and previous - ts > gap:
            return IdleRun(since, f"no observations from {when(ts)} to {when(previous)}", peak)
        seen_gpus: set[int] = set()
        while i >= 0 and rows[i].ts == ts:
            row = rows[i]
            util = row.util_pct
            if util is None:
                return IdleRun(since, f"GPU {row.gpu} reading failed at {when(ts)}", peak)
            if util >= threshold:
                return IdleRun(since, f"{util:.0f}% GPU on GPU {row.gpu} at {when(ts)}", peak)
            if util > peak:
                peak = util
            seen_gpus.add(row.gpu)
            i -= 1
        missing = held - seen_gpus
        if missing:
            which = ",".join(map(str, sorted(missing)))
            return IdleRun(since, f"no reading of GPU {which} at {when(ts)}", peak)
        seen = activity_at(ts)
        if interactive:
            if seen is None or seen.ssh_sessions is None:
                return IdleRun(since, f"SSH state unknown at {when(ts)}", peak)
            if seen.ssh_sessions > 0:
                return IdleRun(since, f"SSH/IDE attached at {when(ts)}", peak)
        cpu = seen.cpu_pct if seen is not None else None
        if busy is not None:
            if cpu is None and ts != first_look:
                return IdleRun(since, f"CPU use unknown at {when(ts)}", peak)
            if cpu is not None and cpu >= busy:
                return IdleRun(since, f"CPU busy ({cpu:.0f}% of a core) at {when(ts)}", peak)
        since = ts
        previous = ts
    return IdleRun(since, None, peak)


def _by_column(
    gpu_samples: Sequence[GpuSample],
    activity_samples: Sequence[ActivitySample],
    floor: float,
    held: set[int],
    settings: ReapSettings,
    now: float,
    interactive: bool,
    first_look: float | None,
) -> IdleRun | None:
    """`idle_run_of` for samples of the regular shape; None for any other.

    Regular: every observation has rows for the same GPUs in the same order, its time
    rising strictly from one to the next, and exactly one activity row. Then an observation
    the walk would pass is one no signal faults, and the newest faulted one (by a gap, an
    unknown or busy GPU, a GPU not read, SSH or CPU) is where the walk stops: the walk
    judges just that one, from the stretch the newer ones make.
    """
    ts = list(map(_TS, gpu_samples))
    n = len(ts)
    if n < 2 or not activity_samples:
        return None
    per = 1  # rows per observation
    while per < n and ts[per] == ts[0]:
        per += 1
    if n % per:
        return None
    stamps = ts[::per] if per > 1 else ts
    if per > 1 and any(ts[j::per] != stamps for j in range(1, per)):
        return None
    # the steps between observations, smallest first (sorting floats beats min and max)
    spread = sorted(map(sub, stamps[1:], stamps[:-1]))
    if spread and not spread[0] > 0:
        return None
    gpus = list(map(_GPU, gpu_samples))
    pattern = gpus[:per]
    if (gpus.count(gpus[0]) != n) if per == 1 else (gpus != pattern * (n // per)):
        return None
    if list(map(_TS, activity_samples)) != stamps:
        return None
    cut = bisect_left(stamps, floor) if stamps[0] < floor else 0
    m = len(stamps) - cut
    if m == 0:
        return None
    if cut:
        gpu_samples, activity_samples = gpu_samples[cut * per :], activity_samples[cut:]
        stamps = stamps[cut:]
    newest = stamps[-1]
    gap = settings.max_sample_gap_s
    if now - newest > gap:
        return IdleRun(None, f"no observation since {when(newest)}")
    if first_look is None:
        first_look = stamps[0]
    # `stop`: the newest observation (an index into `stamps`) some signal faults; -1: none
    stop = m - 1 if not held.issubset(pattern) else -1
    if stop < 0 and spread and spread[-1] > gap:
        stop = _newest(list(map(sub, stamps[1:], stamps[:-1])), lambda d: d > gap)
    threshold = settings.util_threshold_pct
    utils = list(map(_UTIL, gpu_samples))
    top = _top(utils)
    if top is None or top >= threshold:
        row = _newest(utils, lambda u: u is None or u >= threshold)
        stop = max(stop, row // per)
    if interactive:
        ssh = list(map(_SSH, activity_samples))
        if ssh.count(0) != m:  # (all 0: nobody attached, nothing unknown)
            attached = _top(ssh)
            if attached is None or attached > 0:
                stop = max(stop, _newest(ssh, lambda s: s is None or s > 0))
    busy = settings.cpu_busy_pct
    if busy is not None:
        cpu = list(map(_CPU, activity_samples))
        # only the first look's unknown CPU is forgiven (the walk's rule): under any limit
        if cpu[0] is None and stamps[0] == first_look:
            cpu[0] = NEVER
        load = _top(cpu)
        if load is None or load >= busy:
            stop = max(stop, _newest(cpu, lambda c: c is None or c >= busy))
    if stop < 0:
        return IdleRun(stamps[0], None, _peak(utils, top))
    since = stamps[stop + 1] if stop + 1 < m else None
    observed = stamps

    def activity_at(t: float) -> ActivitySample | None:
        k = bisect_left(observed, t)
        return activity_samples[k] if k < m and observed[k] == t else None

    return walk_back(
        gpu_samples,
        (stop + 1) * per - 1,
        activity_at,
        held,
        settings,
        interactive=interactive,
        newest_bare=NEVER,
        first_look=first_look,
        since=since,
        peak=_peak(utils[(stop + 1) * per :]),
        previous=since,
    )


def _top(values: list[_N | None]) -> _N | None:
    """The largest value; None if any is unknown (one pass of `max`)."""
    try:
        return max(cast("list[_N]", values))  # a None among numbers: TypeError
    except TypeError:
        return None


def _newest(values: Sequence[T], faulty: Callable[[T], bool]) -> int:
    """The index of the newest faulty value (values oldest first); -1: none."""
    for i in range(len(values) - 1, -1, -1):
        if faulty(values[i]):
            return i
    return -1


def _peak(utils: list[float | None], top: float | None = None) -> float:
    """The walk's peak over the readings it passed (all known, `top` their max if known):
    it starts from 0."""
    if not utils:
        return 0.0
    return max(0.0, max(cast("list[float]", utils)) if top is None else top)


def right_size(session: Session, settings: ReapSettings, now: float) -> tuple[int, ...]:
    """Allocated GPUs that nothing used (no VRAM, utilization under the threshold) for at
    least `idle_window`, while another GPU of the same session was in use: a note, never a
    teardown."""
    allocated = session.allocated_gpus
    if not allocated or len(allocated) < 2:
        return ()
    start = now - settings.idle_window_s
    first: dict[int, float] = {}
    used: set[int] = set()
    threshold = settings.util_threshold_pct
    for g in session.gpu_samples:
        if g.gpu not in allocated or g.ts > now:
            continue
        first[g.gpu] = min(first.get(g.gpu, g.ts), g.ts)
        if g.ts >= start and (
            g.util_pct is None or g.util_pct >= threshold or g.vram_mib is None or g.vram_mib > 0
        ):
            used.add(g.gpu)  # an unknown reading counts as used: the note must be true
    covered = [g for g in allocated if g in first and first[g] <= start]
    unused = tuple(g for g in covered if g not in used)
    return unused if unused and used else ()
