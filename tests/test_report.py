"""`deskgpu report`, the metrics textfile and `reap --report`: over real SQLite histories built
from the reap scenario corpus and from a simulated box observed by the real `observe`; the
textfile is checked by the Prometheus client library's own parser, the HTML page by a real
headless Chromium where one is installed (and by its data everywhere)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deskgpu.config.reap import load_settings
from deskgpu.reap.evidence import Evidence
from deskgpu.state import usage as store
from deskgpu.state.history import open_history
from deskgpu.usage import html, report, textfile, weekly
from tests.fixtures.reap import make_corpus
from tests.test_reap_live import STEP, Box, make_config, observe_for

HOUR = 3600.0


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def history_from(evidence: Evidence, path: Path, drop: tuple[float, float] | None = None) -> None:
    """A history as `observe` would have written it for these sessions (owners included)."""
    with open_history(path) as h:
        db = h.db
        store.ensure(db)
        stamps = {g.ts for s in evidence.sessions for g in s.gpu_samples}
        if drop is not None:
            stamps = {t for t in stamps if not drop[0] <= t < drop[1]}
        db.executemany("INSERT OR IGNORE INTO observations VALUES (?)", [(int(t),) for t in stamps])
        for s in evidence.sessions:
            rows = [g for g in s.gpu_samples if g.ts in stamps]
            db.executemany(
                "INSERT INTO gpu_samples VALUES (?, ?, ?, ?, ?)",
                [(s.cluster, int(g.ts), g.gpu, g.util_pct, g.vram_mib) for g in rows],
            )
            if rows:
                db.execute(
                    "INSERT INTO usage_sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (s.cluster, int(s.created_at or 0), s.owner, s.labels.get("deskgpu.io/job")
                     or s.cluster, s.kind, int(rows[0].ts), int(rows[-1].ts)),
                )  # fmt: skip
        db.commit()


def scenario(name: str) -> Evidence:
    return Evidence.from_dict(make_corpus.scenarios()[name]["evidence"])


def build(path: Path, since: float, until: float, **kw: Any) -> report.Report:
    with report.open_readonly(path) as db:
        return report.build(db, since=since, until=until, threshold_pct=5.0, max_gap_s=1200, **kw)


def check_reconciles(r: report.Report) -> None:
    """allocated = busy + idle (+ unknown) per GPU per hour, and the box is the sum of cells."""
    cells = r.cells.values()
    for u in cells:
        assert u.allocated_s == pytest.approx(u.busy_s + u.idle_s + u.unknown_s)
        assert u.allocated_s <= HOUR + 1200  # one GPU cannot be held longer than the hour
    assert r.box.allocated_s == pytest.approx(sum(u.allocated_s for u in cells))
    assert r.box.idle_s == pytest.approx(sum(u.idle_s for u in cells))
    d = r.to_dict()["box"]
    assert d["gpu_hours_allocated"] == pytest.approx(
        d["gpu_hours_busy"] + d["gpu_hours_idle"] + d["gpu_hours_unknown"], abs=0.02
    )


@pytest.mark.parametrize("name", sorted(make_corpus.scenarios()))
def test_every_corpus_scenario_reconciles(name: str, tmp_path: Path) -> None:
    ev = scenario(name)
    path = tmp_path / "history.sqlite"
    history_from(ev, path)
    r = build(path, make_corpus.NOW - 8 * 86400, make_corpus.NOW + 1)
    check_reconciles(r)
    per_session = sum(s.usage.allocated_s for s in r.sessions)
    assert r.box.allocated_s <= per_session + 1e-6  # a shared GPU counts once for the box


def test_long_idle_debug_session_is_mostly_held_idle(tmp_path: Path) -> None:
    # Corpus: 21 h at 37 % then idle at 23 GiB until NOW (6 days after creation).
    path = tmp_path / "history.sqlite"
    history_from(scenario("long_idle_debug_session"), path)
    r = build(path, make_corpus.NOW - 7 * 86400, make_corpus.NOW + 1)
    (alice,) = r.users
    assert alice.user == "alice"
    assert alice.usage.busy_s / HOUR == pytest.approx(21, abs=0.2)
    assert alice.usage.idle_s / HOUR == pytest.approx(6 * 24 - 21, abs=0.3)
    assert alice.peak_vram_mib == 23654
    assert r.gpus == 3  # GPU 2 is the highest seen (no usage_box rows in this history)
    line = r.user_line(alice)
    assert line.startswith("alice: ") and "idle" in line


def test_gap_in_history_is_shown_and_never_counted_as_idle(tmp_path: Path) -> None:
    ev = scenario("long_idle_debug_session")
    hole = (make_corpus.NOW - 3 * 86400, make_corpus.NOW - 3 * 86400 + 10 * HOUR)
    full, holed = tmp_path / "full.sqlite", tmp_path / "holed.sqlite"
    history_from(ev, full)
    history_from(ev, holed, drop=hole)
    since, until = make_corpus.NOW - 7 * 86400, make_corpus.NOW + 1
    a, b = build(full, since, until), build(holed, since, until)
    check_reconciles(b)
    inner = [g for g in b.gaps if g[0] > since + 86400]
    assert len(inner) == 1
    start, end = inner[0]
    assert start == pytest.approx(hole[0], abs=make_corpus.STEP)
    assert end == pytest.approx(hole[1], abs=make_corpus.STEP)
    assert a.box.idle_s - b.box.idle_s == pytest.approx(10 * HOUR, abs=make_corpus.STEP)
    assert b.box.busy_s == pytest.approx(a.box.busy_s)
    assert a.observed_s - b.observed_s == pytest.approx(10 * HOUR, abs=make_corpus.STEP)
    hours = [h for h in range(b.hours) if b.covered[h] == 0]
    assert hours, "the hole's hours have no coverage"
    assert all((2, h) not in b.cells for h in hours)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, int] = {}
        self.bars = 0
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        a = dict(attrs)
        for key in ("src", "href", "xlink:href"):
            if a.get(key):
                self.refs.append(str(a[key]))
        cls = (a.get("class") or "").split()
        if tag == "rect" and "cell" in cls:
            self.cells[cls[1]] = self.cells.get(cls[1], 0) + 1
        if tag == "rect" and "bar" in cls:
            self.bars += 1


def test_html_page_is_self_contained_with_a_cell_per_gpu_hour(tmp_path: Path) -> None:
    ev = scenario("long_idle_debug_session")
    path = tmp_path / "h.sqlite"
    history_from(ev, path, drop=(make_corpus.NOW - 3 * 86400, make_corpus.NOW - 2 * 86400))
    r = build(path, make_corpus.NOW - 7 * 86400, make_corpus.NOW + 1)
    page = _Page()
    page.feed(html.page(r))
    assert sum(page.cells.values()) == r.gpus * r.hours
    assert page.cells["gap"] >= 3 * 24 - 1  # GPUs 0-2 x the dropped day
    assert page.cells["idle"] > page.cells["busy"] > 0
    assert page.bars == 2  # alice: busy + idle
    assert page.refs == [] and "script" not in page.tags


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium here (apt-get install chromium)")
def test_html_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    history_from(scenario("long_idle_debug_session"), path)
    r = build(path, make_corpus.NOW - 7 * 86400, make_corpus.NOW + 1)
    out = tmp_path / "report.html"
    out.write_text(html.page(r))
    argv = [
        str(_chromium()), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    dom = subprocess.run(
        [*argv, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _Page()
    page.feed(dom.stdout)  # the DOM Chromium built: the SVG survived its parser
    assert sum(page.cells.values()) == r.gpus * r.hours
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [*argv, f"--screenshot={shot}", "--window-size=1400,900", out.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- observed end to end -------------------------------------------------------------------


def _observed_box(box: Box, tmp_path: Path, hours: float) -> Any:
    config = make_config(tmp_path)
    box.util["bob-nb"] = 80
    results = observe_for(box, config, hours * HOUR)
    return config, results


def test_observed_box_report_textfile_and_weekly_lines(box: Box, tmp_path: Path) -> None:
    config, results = _observed_box(box, tmp_path, 4)
    settings = load_settings(config)
    r = report.make(settings, since_s=86400, now=box.now + 1)
    check_reconciles(r)
    users = {u.user: u for u in r.users}
    assert users["alice"].usage.idle_s / HOUR == pytest.approx(4, abs=STEP / HOUR + 0.01)
    assert users["alice"].usage.busy_s == 0
    assert users["bob"].usage.busy_s / HOUR == pytest.approx(4, abs=STEP / HOUR + 0.01)
    assert r.gpus == 2 and not r.gaps[1:]
    assert {s.job for s in r.sessions} == {"alice-dbg", "bob-nb"}
    assert users["alice"].notices == 1  # observe warned her idle session (audit log)
    assert r.waits_known and users["alice"].waited_s == 0  # never seen Queued

    out = tmp_path / "prom"
    out.mkdir()
    target = textfile.observe_textfile(out, results[-1], settings)
    families = {f.name: f for f in text_string_to_metric_families(target.read_text())}
    mem = {
        (s.labels["gpu"], s.labels["user"]): s.value
        for s in families["deskgpu_gpu_memory_used_bytes"].samples
    }
    assert mem == {("0", "alice"): 20000 * 1024 * 1024, ("1", "bob"): 20000 * 1024 * 1024}
    idle = {
        s.labels["user"]: s.value for s in families["deskgpu_gpu_allocated_idle_seconds"].samples
    }
    assert idle["bob"] == 0
    assert idle["alice"] == pytest.approx(4 * HOUR, abs=STEP)
    util = {s.labels["user"]: s.value for s in families["deskgpu_gpu_utilization_ratio"].samples}
    assert util == {"alice": 0.0, "bob": 0.8}
    suspects = [s.labels for s in families["deskgpu_zombie_suspect"].samples]
    assert {"cluster": "alice-dbg", "user": "alice"} in suspects
    deadlines = families["deskgpu_reap_notice_deadline_timestamp_seconds"].samples
    assert [s.labels["cluster"] for s in deadlines] == ["alice-dbg"]
    assert all(n.startswith("deskgpu_") for n in families)

    sent = weekly.after_reap(config, settings, notify=True, now=box.now + 1)
    assert sorted(sent.notified) == ["alice", "bob"] and not sent.failures
    lines = [json.loads(x) for x in (tmp_path / "notices.jsonl").read_text().splitlines()]
    reports = [x for x in lines if x[1] == ""]  # {owner} {cluster} {message}: no cluster
    assert {x[0] for x in reports} == {"alice", "bob"}
    assert all(x[2].split(", ", 1)[1].startswith(x[0] + ":") for x in reports)


def _write_config(tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "config.yaml"
    doc = {"state_dir": str(tmp_path / "state"), **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_report_cli_json_html_and_errors(cli, box: Box, tmp_path: Path) -> None:
    _observed_box(box, tmp_path, 2)
    cfg = _write_config(tmp_path, reap={"idle_window": "1h", "min_age": "2h"})
    html_out = tmp_path / "r.html"
    # The box's clock is in 2025-12; the report's window ends now: ask for enough of the past.
    res = cli("report", "--since", "1000d", "--json", "--html", str(html_out), "--config", str(cfg))
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {u["user"] for u in doc["users"]} == {"alice", "bob"}
    assert doc["box"]["gpus"] == 2
    assert html_out.read_text().startswith("<!DOCTYPE html>")
    res = cli("report", "--since", "1000d", "--user", "bob", "--config", str(cfg))
    assert res.exit_code == 0, res.stderr
    assert "bob" in res.stdout and "alice" not in res.stdout.split("USER", 1)[1]
    bad = cli("report", "--since", "soon", "--config", str(cfg))
    assert bad.exit_code == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "other").mkdir()
    missing = _write_config(tmp_path / "other")
    gone = cli("report", "--config", str(missing))
    assert gone.exit_code == 1
    assert gone.stderr.count("\n") == 1 and "no observation history" in gone.stderr


def test_history_written_before_owner_records_says_so(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    history_from(scenario("long_idle_debug_session"), path)
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE usage_sessions; DROP TABLE usage_waits;")
    db.close()
    r = build(path, make_corpus.NOW - 7 * 86400, make_corpus.NOW + 1)
    assert [u.user for u in r.users] == ["?"]
    assert any("predates owner records" in n for n in r.notes)
    assert any("waited Queued is unknown" in n for n in r.notes)


def test_setup_render_wires_the_textfile_dir_into_observe(tmp_path: Path) -> None:
    from deskgpu.config import load_config
    from deskgpu.doctor.scheduled import parse_args
    from deskgpu.setup.render import Tools, render

    cfg = _write_config(tmp_path, metrics_textfile_dir="/var/lib/prometheus/node-exporter")
    config = load_config(cfg)
    rendered = render(config, Tools(python=sys.executable, deskgpu="/opt/deskgpu/bin/deskgpu"))
    files = {f.path: f.text for f in rendered.files}
    unit = files["etc/systemd/system/deskgpu-observe.service"]
    want = "observe --quiet --textfile /var/lib/prometheus/node-exporter"
    assert f"ExecStart=/opt/deskgpu/bin/deskgpu {want}" in unit
    assert want in files["cron/deskgpu"]
    parsed = parse_args(want.split())
    assert not isinstance(parsed, str)
    plain = render(load_config(_write_config(tmp_path)), Tools(sys.executable, "/x/deskgpu"))
    assert (
        "--textfile"
        not in {f.path: f.text for f in plain.files}["etc/systemd/system/deskgpu-observe.service"]
    )


def test_reap_replay_with_report_appends_it_and_keeps_the_reap_exit(
    cli, box: Box, tmp_path: Path
) -> None:
    _observed_box(box, tmp_path, 2)
    cfg = _write_config(tmp_path)
    evidence = Path(make_corpus.HERE) / "long_idle_debug_session.json"
    res = cli("reap", "--evidence", str(evidence), "--report", "--json", "--config", str(cfg))
    assert res.exit_code == 3, res.stderr  # a dry run that found a zombie, report or not
    doc = json.loads(res.stdout)
    assert doc["decisions"] and doc["report"]["error"] is None
    assert doc["report"]["notified"] == []  # a replay sends nothing
    (tmp_path / "none").mkdir()
    empty = _write_config(tmp_path / "none")
    res = cli("reap", "--evidence", str(evidence), "--report", "--config", str(empty))
    assert res.exit_code == 3 and "report: no observation history" in res.stdout
