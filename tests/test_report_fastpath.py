"""`deskgpu report` counts by column exactly what it counts sample by sample.

The oracle is the report as first written: `Tally.add_rows` counts each sample in the
order SQLite scans the table, and `reference_peaks` sums VRAM as it did. `Tally.add` (the
default) counts the same by column; the reports must be equal to the last bit of every
float (the text, JSON and HTML are drawn from them), on random histories: several sessions
per GPU, names used twice (incarnations), failed readings, gaps, samples without their
observation row, rows written out of time order, and windows that end mid-interval.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deskgpu.reap.evidence import iso
from deskgpu.state import usage as store
from deskgpu.state.history import open_history
from deskgpu.usage import report

NOW = 1_767_000_000
STEP = 300


@st.composite
def histories(
    draw: st.DrawFn,
) -> tuple[list[tuple[object, ...]], list[int], list[tuple[object, ...]]]:
    """(gpu rows in the order written, observation times, usage_sessions rows)."""
    n = draw(st.integers(1, 150))
    stamps = [NOW - (n - i) * STEP + draw(st.sampled_from([0, 0, 3])) for i in range(n)]
    stamps = sorted(set(stamps))
    skipped = draw(st.sets(st.integers(0, len(stamps) - 1), max_size=4))
    observed = [t for i, t in enumerate(stamps) if i not in skipped]
    orphans = draw(st.sets(st.integers(0, len(stamps) - 1), max_size=2))  # rows, no observation
    rows: list[tuple[object, ...]] = []
    infos: list[tuple[object, ...]] = []
    for k in range(draw(st.integers(1, 4))):
        cluster = f"c{draw(st.integers(0, 2))}"  # a name two sessions may share
        gpus = draw(st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True))
        start, end = sorted(draw(st.lists(st.integers(0, len(stamps) - 1), min_size=2, max_size=2)))
        if draw(st.booleans()):
            infos.append(
                (
                    cluster,
                    NOW - 10**6 + k,
                    f"u{k % 2}",
                    "job",
                    "interactive",
                    stamps[start],
                    stamps[end],
                )
            )
        busy = draw(st.sampled_from([0, 5, 90]))
        for i in range(start, end + 1):
            if i in skipped and i not in orphans:
                continue
            for gpu in gpus:
                util = draw(st.sampled_from([0, 3, busy, None]))
                vram = draw(st.sampled_from([0, 512, 20000, None]))
                rows.append((cluster, stamps[i], gpu, util, vram))
    if draw(st.booleans()):
        rows.sort(key=lambda r: r[1])  # as observe writes: one observation after another
    else:
        random.Random(draw(st.integers(0, 2**16))).shuffle(rows)
    return rows, observed, infos


def reference_peaks(tally: report.Tally) -> dict[str, float]:
    """The VRAM peaks as the report first counted them: each session's and owner's most at
    any one time (an owner's sessions summed)."""
    for (key, _ts), mib in tally.vram_at.items():
        s = tally.sessions[key]
        s.peak_vram_mib = max(s.peak_vram_mib, mib)
    user_vram: dict[tuple[str, int], float] = defaultdict(float)
    for (key, ts), mib in tally.vram_at.items():
        user_vram[(tally.sessions[key].owner, ts)] += mib
    out: dict[str, float] = {}
    for (owner, _ts), mib in user_vram.items():
        out[owner] = max(out.get(owner, 0.0), mib)
    return out


def audit_log(infos: list[tuple[object, ...]], rows: list[tuple[object, ...]]) -> Path:
    """Notices and teardowns of the clusters: each counts for the last session of its name."""
    path = Path(tempfile.mkdtemp(prefix="deskgpu-report-")) / "audit.jsonl"
    names = sorted({str(r[0]) for r in rows} | {str(i[0]) for i in infos})
    lines = [
        {"ts": iso(NOW - 600), "event": "action", "run_id": f"r{k}", "subject": name,
         "did": "warned" if k % 2 else "torn-down", "owner": "u0", "ok": True}
        for k, name in enumerate(names)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def build(
    rows: list[tuple[object, ...]],
    observed: list[int],
    infos: list[tuple[object, ...]],
    until: float,
    threshold: float,
) -> report.Report:
    with open_history(":memory:") as history:
        store.ensure(history.db)
        with history.db:
            history.db.executemany("INSERT INTO observations VALUES (?)", [(t,) for t in observed])
            history.db.executemany("INSERT INTO gpu_samples VALUES (?, ?, ?, ?, ?)", rows)
            history.db.executemany(
                "INSERT OR IGNORE INTO usage_sessions VALUES (?, ?, ?, ?, ?, ?, ?)", infos
            )
        return report.build(
            history.db,
            since=NOW - 2 * 86400,
            until=until,
            threshold_pct=threshold,
            max_gap_s=1200,
            audit_file=audit_log(infos, rows),
        )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.sampled_from([0.0, 0.25, 117.4, 299.9, 1e-3]), st.sampled_from([5.0, 50.0]))
def test_columns_count_what_each_sample_counts(
    drawn: tuple[list[tuple[object, ...]], list[int], list[tuple[object, ...]]],
    after: float,
    threshold: float,
) -> None:
    rows, observed, infos = drawn
    until = observed[-1] + after if observed else NOW + after
    by_column = build(rows, observed, infos, until, threshold)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(report.Tally, "add", report.Tally.add_rows)
        m.setattr(report.Tally, "peaks", reference_peaks)
        by_row = build(rows, observed, infos, until, threshold)
    assert by_column == by_row
    assert list(by_column.cells) == list(by_row.cells)  # the same order, for the same sums
    assert [(s.cluster, s.first, s.notices, s.teardowns) for s in by_column.sessions] == [
        (s.cluster, s.first, s.notices, s.teardowns) for s in by_row.sessions
    ]
    assert report.text_lines(by_column) == report.text_lines(by_row)
