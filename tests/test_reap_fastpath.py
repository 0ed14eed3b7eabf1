"""The zombie rule's fast paths decide exactly what its straightforward walk decides.

The oracle is the rule as first written: `InMemorySamples(fast=False)` walks every
observation of the evidence back from the newest (`idle.idle_run`) and scans every sample
for the rest. The evidence's samples read by column (`idle.fast_idle_run`, the default) and
a history asked in SQL without reading every sample (`reap.history_samples`, what `observe`
decides from) must give the same decisions, reasons word for word, on random histories:
gaps, unread GPUs, failed readings, SSH, busy and unknown CPU, observations without GPU
rows or without activity, rows written twice, samples of an earlier session of the same
name, notices, and thresholds drawn with them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deskgpu.config.reap import ReapSettings
from deskgpu.reap import gather
from deskgpu.reap.evidence import ActivitySample, Evidence, GpuSample, Session
from deskgpu.reap.history_samples import HistorySamples
from deskgpu.reap.idle import IdleRun, InMemorySamples, SessionSamples, idle_run
from deskgpu.reap.rule import decide, decide_session
from deskgpu.state.history import History, Notice, open_history
from tests.test_reap_rule import idle_looking_sessions, thresholds

NOW = 1_767_000_000
ENDS = ("busy", "failed", "attached", "ssh unknown", "cpu busy", "cpu unknown")
ODDITIES = (
    "absent", "unread", "no activity", "bare", "twice", "late gpu", "late activity",
    "other gpu", "earlier",
)  # fmt: skip
STEP = 300
EXAMPLES = 600  # each a history of up to 3 sessions x 120 observations (~10 ms)
CORPUS = Path(__file__).parent / "fixtures" / "reap"


@dataclass
class Box:
    """A drawn history: what observe wrote, the sessions seen now, and the settings."""

    settings: ReapSettings
    sessions: list[gather.LiveSession]
    gpu_rows: list[tuple[str, int, int, int | None, int | None]]
    act_rows: list[tuple[str, int, int | None, float | None]]
    observations: list[int]
    notices: list[Notice]


def few(n: int) -> st.SearchStrategy[set[int]]:
    """Some of `n` observations; none at all as often as not (long quiet stretches)."""
    return st.just(set()) | st.sets(st.integers(0, n - 1), max_size=3)


@st.composite
def boxes(draw: st.DrawFn) -> Box:
    gap = draw(st.sampled_from([600, 1200, 3600]))
    the = ReapSettings(
        util_threshold_pct=draw(st.sampled_from([5.0, 1.0, 30.0])),
        cpu_busy_pct=draw(st.sampled_from([50.0, None, 10.0])),
        max_sample_gap_s=gap,
        idle_window_s=draw(st.sampled_from([1800, 3600, 3 * 3600])),
        min_age_s=draw(st.sampled_from([0, 3600, 6 * 3600])),
        grace_s=draw(st.sampled_from([0, 1800, 86400])),
        stalled_batch_after_s=draw(st.sampled_from([1800, 6 * 3600])),
        retention_s=draw(st.sampled_from([6 * 3600, 86400, 3 * 86400])),
    )
    n = draw(st.integers(1, 120))
    jitter = draw(st.sampled_from([0, 0, 7, 40]))
    stamps = [NOW - i * STEP - (i * 13 % (jitter + 1)) for i in range(n)]
    skipped = draw(few(n))  # observe did not run: a gap for every session
    observations = [t for i, t in enumerate(stamps) if i not in skipped]
    sessions: list[gather.LiveSession] = []
    gpu_rows: list[tuple[str, int, int, int | None, int | None]] = []
    act_rows: list[tuple[str, int, int | None, float | None]] = []
    notices: list[Notice] = []
    for k in range(draw(st.integers(1, 3))):
        cluster = f"s{k}"
        kind = draw(st.sampled_from(["interactive", "interactive", "batch"]))
        # created before the history begins (as often as not), within it, or unknown
        age = draw(st.sampled_from([n * STEP + 600, n * STEP + 7200]) | st.integers(0, n * STEP))
        age = age if draw(st.integers(0, 4)) else None
        created = None if age is None else NOW - age + draw(st.sampled_from([0.0, 0.5, -0.25]))
        if draw(st.integers(0, 4)) == 0:
            created = float(draw(st.sampled_from(stamps)))  # created at an observation
        used = draw(
            st.sets(st.integers(0, 3), min_size=draw(st.sampled_from([0, 1, 1])), max_size=2)
        )
        allocated = draw(st.one_of(st.none(), st.sets(st.integers(0, 3), max_size=3)))
        # Shapes other than observe's usual one (most sessions draw none: the fast paths
        # take that shape, and every other one must still decide as the walk does)
        odd = draw(st.sets(st.sampled_from(ODDITIES), max_size=2))

        def some(oddity: str, odd: set[str] = odd) -> set[int]:
            if oddity not in odd:
                return set()
            return draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=3))

        earlier = {4} if "earlier" in odd else set()  # held before, not now
        read = sorted(used | (allocated or set()))
        if allocated is not None and draw(st.integers(0, 9)) == 0:
            allocated = allocated | {6}  # allocated, and never read (not in the history)
        absent, unread, no_activity, bare, twice = (
            some(o) for o in ("absent", "unread", "no activity", "bare", "twice")
        )
        # one row off its observation: a second later, or another GPU's (odd documents)
        late_gpu, late_activity, other_gpu = (
            some(o) for o in ("late gpu", "late activity", "other gpu")
        )
        no_vram = draw(few(min(n, 8)))  # recent: inside the right-sizing window
        # Readings that end an idle stretch: a kind or two a session, a few times each
        ends = draw(st.sets(st.sampled_from(ENDS), max_size=2))
        busy, failed, attached, ssh_unknown, cpu_busy, cpu_unknown = (
            draw(few(n)) if end in ends else set() for end in ENDS
        )
        since_earlier = draw(st.integers(0, n - 1)) if earlier else n
        low = draw(st.sampled_from([0, 1, 4]))
        for i, ts in enumerate(stamps):
            if i in skipped or i in absent:
                continue
            copies = 2 if i in twice else 1
            if i not in bare:
                gpus = read + (sorted(earlier) if i >= since_earlier else [])
                for j, gpu in enumerate(gpus):
                    if i in unread and j == len(gpus) - 1:
                        continue
                    util = None if i in failed else 90 if i in busy else low
                    vram = 0 if gpu not in used else 20000
                    vram = None if i in failed or i in no_vram else vram
                    last = j == len(gpus) - 1
                    at = ts + 1 if last and i in late_gpu else ts
                    gpu = 5 if last and i in other_gpu else gpu
                    gpu_rows += [(cluster, at, gpu, util, vram)] * copies
            if i not in no_activity:
                ssh = None if i in ssh_unknown else 1 if i in attached else 0
                cpu = None if i in cpu_unknown else 95.0 if i in cpu_busy else 2.0
                at = ts + 1 if i in late_activity else ts
                if copies == 2:  # written twice, differently: the last one written counts
                    act_rows.append((cluster, at, 1, 95.0))
                act_rows.append((cluster, at, ssh, cpu))
        running = draw(st.sampled_from([0, 0, 0, None, 1])) if kind == "interactive" else 1
        sessions.append(
            gather.LiveSession(
                cluster=cluster,
                owner=f"u{k}",
                kind=kind,
                created_at=created,
                status="UP",
                labels={},
                on_cloud=f"{cluster}-2ea4",
                jobs_running=running,
                jobs_pending=0 if running is not None else None,
                pod_present=draw(st.sampled_from([True, True, True, False])),
                gpus={g: (0.0, 20000.0 if g in used else 0.0) for g in used | (allocated or set())},
                used=used,
                allocated=allocated,
                ssh_sessions=draw(st.sampled_from([0, 0, 0, 1, None])),
            )
        )
        warned = draw(st.one_of(st.none(), st.integers(NOW - n * STEP, NOW)))
        if warned is not None:
            notices.append(Notice(cluster, f"u{k}", created, warned, warned + 86400, "m"))
    return Box(the, sessions, gpu_rows, act_rows, observations, notices)


def write(history: History, box: Box) -> None:
    with history.db:
        history.db.executemany(
            "INSERT OR IGNORE INTO observations VALUES (?)", [(t,) for t in box.observations]
        )
        history.db.executemany("INSERT INTO gpu_samples VALUES (?, ?, ?, ?, ?)", box.gpu_rows)
        history.db.executemany(
            "INSERT INTO activity_samples VALUES (?, ?, ?, ?, NULL)", box.act_rows
        )
    for notice in box.notices:
        history.record_notice(notice)


def oracle(evidence: Evidence) -> dict[str, SessionSamples]:
    return {s.cluster: InMemorySamples(s, fast=False) for s in evidence.sessions}


def asked_alike(one: SessionSamples, other: SessionSamples, th: ReapSettings, at: float) -> None:
    """Every question the rule asks, answered alike: first before the idle stretch is read
    (a history asks SQLite), then after (it answers from what it read where it can)."""
    for _ in range(2):
        assert one.last_ssh(at) == other.last_ssh(at)
        assert one.last_seen(at) == other.last_seen(at)
        assert one.unused_allocated(th, at) == other.unused_allocated(th, at)
        for gpus in ((0,), (1, 2), (3, 4, 5, 6)):
            assert one.first_seen_on(gpus) == other.first_seen_on(gpus)
        for interactive in (True, False):
            assert one.idle_run(th, at, interactive=interactive) == other.idle_run(
                th, at, interactive=interactive
            )


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boxes(), st.sampled_from([0, 0, 150, -900, 4000, 600, 1200, 3600]))
def test_history_decides_as_the_walk_over_every_sample(box: Box, later: int) -> None:
    """What observe decides from the history (SQL, no evidence samples) is what the
    straightforward rule decides from the evidence a `--yes` run writes."""
    th = box.settings
    now = float(NOW + later)
    with open_history(":memory:") as history:
        write(history, box)
        view = gather.LiveView(box.sessions, [], [])
        full = gather.build_evidence(view, history, th, now, host="h")
        lean = gather.build_evidence(view, history, th, now, host="h", samples=False)
        asked = gather.history_samples(history, lean, th)
        walked = oracle(full)
        assert decide(lean, th, samples=asked) == decide(full, th, samples=walked)
        fresh = gather.history_samples(history, lean, th)
        for session, bare in zip(full.sessions, lean.sessions, strict=True):
            asked_alike(fresh[bare.cluster], walked[session.cluster], th, now)
            # an audit line's summary reads the very samples the evidence would hold
            assert asked[bare.cluster].with_samples(bare) == session
        # the job queue is asked about the same sessions
        queried: list[list[str]] = [[], []]

        def query(into: list[str]) -> Any:
            return lambda name: (into.append(name), (0, 0))[1]

        gather.check_jobs(full, th, query(queried[0]), walked)
        gather.check_jobs(lean, th, query(queried[1]), asked)
        assert queried[0] == queried[1]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    boxes(),
    st.sampled_from([0, 0, 150, -900, 4000, 600, 1200, 3600]),
    st.randoms(use_true_random=False),
)
def test_columns_decide_as_the_walk(box: Box, later: int, rnd: random.Random) -> None:
    """The evidence's samples by column (every replay and `reap` run) decide as the walk;
    so do samples out of order (they take the walk), and samples older than the session
    (a recorded document may hold them: the rule's walk starts at its creation)."""
    th = box.settings
    now = float(NOW + later)
    with open_history(":memory:") as history:
        write(history, box)
        full = gather.build_evidence(
            gather.LiveView(box.sessions, [], []), history, th, now, host="h"
        )
    for session in full.sessions:
        shuffled = list(session.gpu_samples)
        rnd.shuffle(shuffled)
        stamps = [g.ts for g in session.gpu_samples] or [now]
        born = rnd.choice([rnd.choice(stamps), rnd.choice(stamps) + 0.5, now + 60])
        for one in (
            session,
            replace(session, gpu_samples=tuple(shuffled)),
            replace(session, created_at=born),
        ):
            asked_alike(InMemorySamples(one), InMemorySamples(one, fast=False), th, now)
            assert decide_session(one, th, now) == decide_session(
                one, th, now, InMemorySamples(one, fast=False)
            )


@settings(max_examples=200, deadline=None)
@given(idle_looking_sessions(), thresholds)
def test_columns_decide_as_the_walk_on_zombie_lookalikes(
    session: Session, th: ReapSettings
) -> None:
    """The rule tests' own generator: sessions that mostly look like zombies."""
    now = float(NOW)
    ordered = replace(
        session,
        gpu_samples=tuple(sorted(session.gpu_samples, key=lambda g: g.ts)),
        activity_samples=tuple(sorted(session.activity_samples, key=lambda a: a.ts)),
    )
    for one in (session, ordered):
        assert decide_session(one, th, now) == decide_session(
            one, th, now, InMemorySamples(one, fast=False)
        )
        for interactive in (True, False):
            assert idle_run(one, th, now, interactive=interactive) == InMemorySamples(one).idle_run(
                th, now, interactive=interactive
            )


@pytest.mark.parametrize("name", sorted(p.stem for p in CORPUS.glob("*.json")))
def test_corpus_decides_alike_by_every_path(name: str, tmp_path: Path) -> None:
    """Each scenario of the corpus: by column, by the walk, and from a history holding its
    samples (what build_evidence keeps of them: from each session's creation on)."""
    evidence = Evidence.from_dict(json.loads((CORPUS / f"{name}.json").read_text()))
    th = ReapSettings()
    assert decide(evidence, th) == decide(evidence, th, samples=oracle(evidence))
    kept = []
    for s in evidence.sessions:
        floor = s.created_at if s.created_at is not None else float("-inf")
        kept.append(
            replace(
                s,
                gpu_samples=tuple(g for g in s.gpu_samples if g.ts >= floor),
                activity_samples=tuple(a for a in s.activity_samples if a.ts >= floor),
            )
        )
    kept_evidence = replace(evidence, sessions=tuple(kept))
    stamps = [g.ts for s in kept for g in s.gpu_samples] + [
        a.ts for s in kept for a in s.activity_samples
    ]
    since = min(stamps, default=evidence.collected_at) - 1
    with open_history(tmp_path / "h.sqlite") as history:
        with history.db:
            for s in kept:
                history.db.executemany(
                    "INSERT INTO gpu_samples VALUES (?, ?, ?, ?, ?)",
                    [(s.cluster, *g) for g in s.gpu_samples],
                )
                history.db.executemany(
                    "INSERT INTO activity_samples VALUES (?, ?, ?, ?, NULL)",
                    [(s.cluster, *a) for a in s.activity_samples],
                )
        bare = [replace(s, gpu_samples=(), activity_samples=()) for s in kept]
        asked = {s.cluster: HistorySamples(history, s, since) for s in bare}
        lean = replace(evidence, sessions=tuple(bare))
        assert decide(lean, th, samples=asked) == decide(
            kept_evidence, th, samples=oracle(kept_evidence)
        )


def test_observation_written_twice_counts_its_last_activity_row() -> None:
    """Two observe runs in one second write one observation twice; the walk reads the last
    activity row written (an SSH connection in the first one does not end the stretch)."""
    stamps = [float(NOW - i * STEP) for i in range(9, -1, -1)]
    gpu = [GpuSample(t, 0, 0.0, 20000.0) for t in stamps]
    act = [ActivitySample(t, 0, 2.0) for t in stamps]
    gpu.insert(5, GpuSample(stamps[5], 0, 0.0, 20000.0))
    act.insert(5, ActivitySample(stamps[5], 1, 95.0))
    session = Session(
        "s0", "u0", "interactive", created_at=0.0, gpus=(0,), vram_mib=20000.0,
        gpu_samples=tuple(gpu), activity_samples=tuple(act),
    )  # fmt: skip
    walked = InMemorySamples(session, fast=False).idle_run(ReapSettings(), NOW, interactive=True)
    assert walked == IdleRun(stamps[0], None, 0.0)
    assert InMemorySamples(session).idle_run(ReapSettings(), NOW, interactive=True) == walked
