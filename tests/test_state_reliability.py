"""The history and the audit log under kill -9, bad files and full disks: nothing lost, nothing
locked, every failure one line. Each test is named after the case a reliability probe
reproduced; the crashes are real (a child process SIGKILLs itself mid-transaction)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deskgpu.config import HostConfig
from deskgpu.errors import OutsideError
from deskgpu.state import audit
from deskgpu.state.history import (
    Notice,
    SessionSample,
    history_copy,
    latest_observation,
    open_history,
    read_notices,
)
from deskgpu.usage.report import open_readonly
from tests.test_reap_live import Box, make_config

T0 = 1_767_000_000


def _history_with_a_notice(path: Path, observations: int = 12) -> None:
    with open_history(path) as h:
        for i in range(observations):
            h.append(T0 + 300 * i, [SessionSample("alice-dbg", ((0, 0.0, 20000.0),), 0, 1.0)])
        h.record_notice(Notice("alice-dbg", "alice", T0, T0 + 3600, T0 + 90000, "idle"))


def _killed_inside_a_transaction(path: Path) -> None:
    """Open the history, BEGIN, insert 50,000 samples, SIGKILL ourselves: a hot journal."""
    code = (
        "import os, signal, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN')\n"
        "db.executemany('INSERT INTO gpu_samples VALUES (?, ?, ?, ?, ?)',\n"
        "               [('bob-nb', 1767100000 + i, 0, 0, 1) for i in range(50000)])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL
    journal = path.with_name(path.name + "-journal")
    assert journal.exists() and journal.stat().st_size > 0  # hot: a reader must roll it back


def test_a_hot_journal_does_not_blind_the_readers(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    _history_with_a_notice(path)
    before = path.read_bytes()
    _killed_inside_a_transaction(path)
    assert [n.cluster for n in read_notices(path)] == ["alice-dbg"]
    assert latest_observation(path) == T0 + 300 * 11
    with history_copy(path) as copy:
        assert copy.latest() == T0 + 300 * 11
        rows = copy.db.execute("SELECT count(*) FROM gpu_samples").fetchone()[0]
        assert rows == 12  # the killed transaction's 50,000 rows are rolled back
    with open_readonly(path) as db:
        assert db.execute("SELECT count(*) FROM observations").fetchone()[0] == 12
    # The readers changed nothing: the next writer rolls the journal back itself.
    assert path.read_bytes() == before or path.with_name(path.name + "-journal").exists()
    with open_history(path) as h:
        assert h.latest() == T0 + 300 * 11


def test_report_after_a_kill_inside_observe_answers(cli, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _history_with_a_notice(state / "history.sqlite")
    _killed_inside_a_transaction(state / "history.sqlite")
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {state}\n")
    result = cli("report", "--since", "3650d", "--json", "--config", str(config))
    assert result.exit_code == 0, result.stderr
    assert "readonly" not in result.stderr


def test_a_fifo_at_the_history_path_hangs_nothing(tmp_path: Path) -> None:
    """Each reader in a child with a hard timeout: a regression fails instead of hanging."""
    fifo = tmp_path / "history.sqlite"
    os.mkfifo(fifo)
    code = (
        "import sys\n"
        "from deskgpu.errors import OutsideError\n"
        "from deskgpu.state.history import read_notices, latest_observation, history_copy, "
        "open_history\n"
        "from deskgpu.usage.report import open_readonly\n"
        "p = sys.argv[1]\n"
        "calls = [lambda: read_notices(p), lambda: latest_observation(p),\n"
        "         lambda: history_copy(p).__enter__(), lambda: open_history(p).__enter__(),\n"
        "         lambda: open_readonly(__import__('pathlib').Path(p)).__enter__()]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "        print('no error')\n"
        "    except OutsideError as exc:\n"
        "        print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=30
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 5, done.stderr[-2000:]
    assert all("not a regular file" in line for line in lines), lines


def test_observe_never_writes_into_a_foreign_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (id INTEGER)")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(OutsideError, match="not deskgpu's observation history"), open_history(path):
        pass
    assert path.read_bytes() == before


def test_a_history_killed_before_its_tables_committed_has_no_observation_yet(
    tmp_path: Path,
) -> None:
    """A first observe killed inside the transaction that creates the tables leaves an empty
    database file (and maybe a hot journal): every reader answers "nothing yet"; a file with
    some other program's tables is still refused."""
    empty = tmp_path / "history.sqlite"
    empty.write_bytes(b"")
    assert latest_observation(empty) is None
    assert read_notices(empty) == []
    foreign = tmp_path / "foreign.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE photos (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(OutsideError, match="not a deskgpu history"):
        latest_observation(foreign)


def test_reap_yes_with_a_file_where_the_evidence_folder_goes_is_one_line(tmp_path: Path) -> None:
    from deskgpu.reap.evidence import Evidence

    folder = tmp_path / "evidence"
    folder.write_text("not a folder")
    with pytest.raises(OutsideError, match="cannot keep the evidence"):
        audit.save_evidence(folder, "run-1", Evidence(collected_at=float(T0)))


def test_a_short_audit_write_leaves_no_half_record(tmp_path: Path) -> None:
    """`ulimit -f` just above the log's size: the record is not written at all."""
    log = tmp_path / "audit.jsonl"
    log.write_text(json.dumps({"event": "run", "n": 0}) + "\n")
    size = log.stat().st_size
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from deskgpu.errors import OutsideError\n"
        "from deskgpu.state.audit import AuditLog\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size + 100}, {size + 100}))\n"
        "try:\n"
        "    AuditLog(Path(sys.argv[1])).append({'event': 'warned', 'pad': 'x' * 1700})\n"
        "    print('written')\n"
        "except OutsideError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=30
    )
    assert done.stdout.startswith("refused:"), (done.stdout, done.stderr[-2000:])
    assert log.stat().st_size == size  # cut back: no fragment for the next record to fuse with


def test_a_torn_audit_tail_is_fenced_off_before_the_next_record(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text(json.dumps({"event": "run"}) + '\n{"event": "warned", "clus')
    audit.AuditLog(log).append({"event": "run", "run_id": "r2"})
    lines = log.read_text().splitlines()
    assert json.loads(lines[-1]) == {"event": "run", "run_id": "r2"}  # whole, on its own line
    assert lines[-2] == '{"event": "warned", "clus'  # the fragment stays alone, unreadable


def test_observe_quiet_does_not_hide_a_broken_lock(tmp_path: Path) -> None:
    """`reap.lock` a directory: the observation is kept, and the fault is a problem (said
    even with --quiet, exit 1), not a note."""
    from deskgpu.config.reap import load_settings
    from deskgpu.reap import observe

    box = Box(tmp_path)
    config = make_config(tmp_path)
    settings = load_settings(config)
    settings.lock_file.mkdir(parents=True)
    result = observe.observe(config, settings, box.live())
    assert result.problems and "notices cannot be given" in result.problems[0]
    assert "reap lock" in result.problems[0]
    with open_history(settings.history_file, create=False) as h:
        assert h.latest() == box.now


def test_history_readers_wait_for_a_writer_within_their_deadline(tmp_path: Path) -> None:
    """A writer holding the lock for a moment makes a reader wait, not fail (1 s once did)."""
    import threading
    import time

    path = tmp_path / "history.sqlite"
    _history_with_a_notice(path)
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(1.5, lambda: writer.execute("COMMIT"))
    released.start()
    started = time.monotonic()
    try:
        assert [n.cluster for n in read_notices(path)] == ["alice-dbg"]
    finally:
        released.join()
        writer.close()
    assert time.monotonic() - started >= 1.0


def test_older_evidence_with_a_gpu_no_longer_listed_still_replays(cli, tmp_path: Path) -> None:
    """A document kept by a pre-upgrade `reap --yes` (no `gpus_earlier` field), with samples of
    a GPU its session no longer lists: decided on VRAM, as docs/formats.md promises."""
    from tests.fixtures.reap import make_corpus

    doc = make_corpus.scenarios()["long_idle_debug_session"]["evidence"]
    session = doc["sessions"][0]
    session.pop("gpus_earlier", None)
    session.pop("allocated_gpus", None)
    session.pop("allocation_source", None)
    extra_gpu = max(r[1] for r in session["gpu_samples"]) + 1
    first_ts = session["gpu_samples"][0][0]
    session["gpu_samples"] = [[first_ts, extra_gpu, 0, 512], *session["gpu_samples"]]
    old = tmp_path / "old-evidence.json"
    old.write_text(json.dumps(doc))
    result = cli("reap", "--evidence", str(old), "--json")
    assert result.exit_code in (0, 3), result.stderr
    decided = json.loads(result.stdout)
    assert decided["decisions"][0]["subject"] == session["cluster"]


def test_deadlines_count_from_the_process_start(tmp_path: Path) -> None:
    """`--wait`/`--timeout` budgets include the interpreter's start and the imports."""
    from deskgpu import deadline

    assert 0.0 <= deadline.process_age_s() <= 3600.0
    stat = tmp_path / "stat"
    stat.write_text("1 (x) S 0 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 notanumber 0 0\n")
    assert deadline.process_age_s(str(stat)) == 0.0  # unreadable: counts from now, never fails
    code = (
        "import time\n"
        "time.sleep(1.2)\n"  # a slow start, before the command's first line
        "from deskgpu import deadline\n"
        "deadline.mark_process_start()\n"
        "print(deadline.Deadline.since_start(5.0).left())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    left = float(done.stdout.strip())
    assert left <= 5.0 - 1.2 + 0.05, left


# ---- kill -9 at random points: 50 observes and 50 `reap --yes` -------------------------------


def _killed_run(tmp: Path, step: int, mode: str, delay_s: float) -> int:
    """Run observe or `reap --yes` on the simulated box in a forked child that SIGKILLs itself
    after `delay_s` (a timer signal lands between any two bytecodes: inside transactions,
    between the audit line and the notice, in the notify hook's wait). Its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by its exit status
        code = 1
        try:
            from deskgpu.config.reap import load_settings
            from deskgpu.reap import observe, run
            from tests.test_reap_live import ROOT

            box = Box(tmp)
            box.now = T0 + 600.0 * step
            config = make_config(tmp)
            settings = load_settings(config)
            signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGKILL))
            signal.setitimer(signal.ITIMER_REAL, delay_s)
            if mode == "observe":
                observe.observe(config, settings, box.live())
            else:
                run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
            signal.setitimer(signal.ITIMER_REAL, 0)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _audit_records(path: Path) -> list[dict[str, object]]:
    records = []
    for line in path.read_text().splitlines():
        records.append(json.loads(line))  # not one torn line: a record is whole or absent
    return records


def test_kill_9_at_random_points_loses_nothing(tmp_path: Path) -> None:
    import random

    from deskgpu.config.reap import load_settings
    from deskgpu.usage import report

    rng = random.Random(26)  # the same 100 kill points on every run
    config = make_config(tmp_path)
    settings = load_settings(config)
    killed = {"observe": 0, "reap": 0}
    step = 0
    while min(killed.values()) < 50 and step < 1200:
        mode = "observe" if step % 2 == 0 else "reap"
        status = _killed_run(tmp_path, step, mode, rng.uniform(0.0, 0.025))
        killed[mode] += os.WIFSIGNALED(status)
        step += 1
        if not settings.history_file.exists():
            continue
        # Every reader answers after every kill.
        read_notices(settings.history_file)
        latest_observation(settings.history_file)
        with history_copy(settings.history_file) as copy:
            copy.latest()
        report.make(settings, since_s=86400.0, now=T0 + 600.0 * step)
    assert min(killed.values()) >= 50, killed  # 50 kills of each, at random points
    _finish_observe(tmp_path, step)  # the next run that finishes completes what was cut short
    records = _audit_records(settings.audit_file)
    assert _counted_twice(records) == []
    _assert_every_notice_has_its_line(settings.history_file, records)


def _killed_at_step(tmp: Path, step: int, mode: str, kill_at: int) -> None:
    """Run observe or `reap --yes` in a forked child that SIGKILLs itself just before or just
    after one of its durable steps (an audit line, a history transaction, the notify hook, a
    teardown): the `kill_at`-th such moment, counting each step's before and after. A run
    with fewer moments finishes."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by its exit status
        code = 1
        try:
            from deskgpu.config.reap import load_settings
            from deskgpu.reap import act, observe, run
            from deskgpu.state.history import History
            from tests.test_reap_live import ROOT

            moments = [0]

            def moment() -> None:
                moments[0] += 1
                if moments[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            def around(call: Any) -> Any:
                def wrapped(*args: Any, **kwargs: Any) -> Any:
                    moment()
                    out = call(*args, **kwargs)
                    moment()
                    return out

                return wrapped

            for target, name in (
                (audit.AuditLog, "append"),
                (History, "append"),
                (History, "record_notice"),
                (History, "clear_notice"),
                (act, "notify"),
                (act, "teardown"),
            ):
                setattr(target, name, around(getattr(target, name)))
            box = Box(tmp)
            box.now = T0 + 600.0 * step
            config = make_config(tmp)
            settings = load_settings(config)
            if mode == "observe":
                observe.observe(config, settings, box.live())
            else:
                run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
            code = 0
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def test_kill_9_before_or_after_any_durable_step_counts_each_notice_once(tmp_path: Path) -> None:
    """The random kill points above move with the machine's speed (on a fast one few runs
    live long enough to give a notice); these do not: 300 runs, most killed at a seeded step."""
    import random

    from deskgpu.config.reap import load_settings

    rng = random.Random(1)  # the old code counted a notice twice with these kill points
    settings = load_settings(make_config(tmp_path))
    for step in range(300):
        mode = "observe" if step % 2 == 0 else "reap"
        _killed_at_step(tmp_path, step, mode, rng.randint(1, 28) if rng.random() < 0.85 else 0)
    _finish_observe(tmp_path, 300)
    records = _audit_records(settings.audit_file)
    assert sum(r.get("did") == "warned" for r in records) >= 20  # it did give notices
    assert _counted_twice(records) == []
    _assert_every_notice_has_its_line(settings.history_file, records)


def _finish_observe(tmp: Path, step: int) -> None:
    from deskgpu.config.reap import load_settings
    from deskgpu.reap import observe

    box = Box(tmp)
    box.now = T0 + 600.0 * step
    config = make_config(tmp)
    observe.observe(config, load_settings(config), box.live())


def _counted_twice(records: list[dict[str, object]]) -> list[tuple[object, ...]]:
    """Notices counted twice: a second `warned` line for one session incarnation with no line
    between them that ends the first (a teardown's, or `notice-cleared`)."""
    open_notice: dict[tuple[object, object], object] = {}
    twice: list[tuple[object, ...]] = []
    for rec in records:
        if rec.get("event") != "action":
            continue
        key = (rec.get("subject"), rec.get("session_created_at"))
        if rec.get("did") == "warned" and rec.get("ok"):
            if key in open_notice:
                twice.append((*key, open_notice[key], rec.get("run_id")))
            open_notice[key] = rec.get("run_id")
        elif rec.get("did") in ("torn-down", audit.TEARDOWN_INTENT, audit.CLEARED):
            open_notice.pop(key, None)  # (a teardown's intent: the kill may have come after it)
    return twice


def _assert_every_notice_has_its_line(history: Path, records: list[dict[str, object]]) -> None:
    """Every notice the history holds has its own `warned` line (not an earlier notice's)."""
    from deskgpu.reap.evidence import iso, parse_ts

    with open_history(history, create=False) as h:
        for n in h.notices():
            assert any(
                r.get("did") == "warned"
                and r.get("subject") == n.cluster
                and r.get("session_created_at") == iso(n.created_at)
                and (parse_ts(r.get("ts"), "audit log") or 0.0) >= n.warned_at
                for r in records
            ), n


# ---- one notice, counted once: the kill points behind issue 26 (item 6), one by one ----------


def _alice_lines(audit_file: Path) -> list[object]:
    return [
        r.get("did")
        for r in _audit_records(audit_file)
        if r.get("event") == "action" and r.get("subject") == "alice-dbg"
    ]


def _killed_at(box: Box, config: HostConfig, mode: str, target: object, name: str) -> None:
    """Run observe or `reap --yes` in a forked child that SIGKILLs itself when it calls
    `target.name` ("clear_notice+": just after that call returns)."""
    after = name.endswith("+")
    name = name.rstrip("+")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies by its own hand
        try:
            from deskgpu.config.reap import load_settings
            from deskgpu.reap import observe, run
            from tests.test_reap_live import ROOT

            call = getattr(target, name)

            def die(*args: object, **kwargs: object) -> None:
                if after:
                    call(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)

            setattr(target, name, die)
            settings = load_settings(config)
            if mode == "observe":
                observe.observe(config, settings, box.live())
            else:
                run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"{mode} never called {name}"


def _stale_notice(box: Box, config: HostConfig) -> None:
    """alice warned by observe; then a hole in the history (30 min without an observation: her
    idle stretch starts over), then 80 idle minutes observed while a long reap run holds the
    lock (observe leaves notices to it): she qualifies again, and her notice is stale."""
    from deskgpu.config.reap import load_settings
    from deskgpu.reap import observe, run
    from tests.test_reap_live import ROOT, STEP, observe_for

    settings = load_settings(config)
    box.util["bob-nb"] = 60  # bob works: only alice is idle
    observe_for(box, config, 3600)
    assert _alice_lines(settings.audit_file) == [audit.INTENT, "warned"]
    box.advance(1800)
    with audit.run_lock(settings.lock_file, 0):
        for _ in range(8):
            observe.observe(config, settings, box.live())
            box.advance(STEP)
    dry = run.reap(config, settings, yes=False, actor=ROOT, live=box.live())
    alice = next(d for d in dry.decisions if d.subject == "alice-dbg")
    assert alice.warned_at is None and "predates this idle stretch" in alice.summary


@pytest.mark.parametrize("mode", ["observe", "reap"])
def test_a_stale_notice_ends_with_a_line_before_a_fresh_one(tmp_path: Path, mode: str) -> None:
    """A fresh notice replaced the stale one in the history with no line ending it: the log
    read as one notice given twice in one idle stretch."""
    from deskgpu.config.reap import load_settings
    from deskgpu.reap import observe, run
    from tests.test_reap_live import ROOT

    box = Box(tmp_path)
    config = make_config(tmp_path)
    settings = load_settings(config)
    _stale_notice(box, config)
    if mode == "observe":
        assert observe.observe(config, settings, box.live()).warned == ["alice-dbg"]
    else:
        run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    lines = _alice_lines(settings.audit_file)
    assert lines == [audit.INTENT, "warned", audit.CLEARED, audit.INTENT, "warned"]
    assert _counted_twice(_audit_records(settings.audit_file)) == []
    with open_history(settings.history_file, create=False) as h:
        assert [n.warned_at for n in h.notices()] == [box.now]  # the fresh one


@pytest.mark.parametrize("mode", ["observe", "reap"])
@pytest.mark.parametrize("at", ["notify", "clear_notice", "clear_notice+"])
def test_kill_between_a_fresh_notices_intent_and_record_notice_counts_once(
    tmp_path: Path, mode: str, at: str
) -> None:
    """Killed in the notify hook's wait, after the fresh notice's intent line, with the stale
    notice still in the history: the next run took that notice for the one the intent had
    recorded, wrote it a second `warned` line, then gave the fresh one (three lines, one
    incarnation, one stretch). Now the stale notice is gone before the intent is written."""
    from deskgpu.config.reap import load_settings
    from deskgpu.reap import act, observe
    from deskgpu.state.history import History

    box = Box(tmp_path)
    config = make_config(tmp_path)
    settings = load_settings(config)
    _stale_notice(box, config)
    _killed_at(box, config, mode, act if at == "notify" else History, at)
    assert observe.observe(config, settings, box.live()).warned == ["alice-dbg"]
    records = _audit_records(settings.audit_file)
    assert _counted_twice(records) == []
    assert [r for r in _alice_lines(settings.audit_file) if r == "warned"] == ["warned"] * 2
    _assert_every_notice_has_its_line(settings.history_file, records)


@pytest.mark.parametrize("at", ["clear_notice", "clear_notice+"])
def test_kill_while_clearing_a_notice_leaves_its_line(tmp_path: Path, at: str) -> None:
    """The owner came back; observe cleared the notice in the history, then was killed before
    its `notice-cleared` line: the next notice read as the first one given twice."""
    from deskgpu.config.reap import load_settings
    from deskgpu.state.history import History
    from tests.test_reap_live import STEP, observe_for

    box = Box(tmp_path)
    config = make_config(tmp_path)
    settings = load_settings(config)
    box.util["bob-nb"] = 60
    observe_for(box, config, 3600)
    box.ssh["alice-dbg"] = 1  # back
    box.advance(STEP)
    _killed_at(box, config, "observe", History, at)
    box.ssh["alice-dbg"] = 0  # gone again: idle an hour, warned again
    box.advance(STEP)
    observe_for(box, config, 3600 + 2 * STEP)
    lines = _alice_lines(settings.audit_file)
    assert lines.count("warned") == 2 and audit.CLEARED in lines
    assert _counted_twice(_audit_records(settings.audit_file)) == []


def test_pruning_a_month_down_to_a_week_gives_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    with open_history(path) as h:
        for i in range(31 * 24):  # hourly, a month, 20 sessions
            h.append(
                T0 + 3600 * i,
                [SessionSample(f"s{k}", ((k, 0.0, 1.0),), 0, float(i)) for k in range(20)],
            )
    full = path.stat().st_size
    with open_history(path) as h:
        h.prune(T0 + 3600 * (31 - 8) * 24)
        assert h.since() == T0 + 3600 * (31 - 8) * 24
    assert path.stat().st_size < full * 0.5, (full, path.stat().st_size)


def _worker(role: str, tmp: Path, until: float, write_fd: int) -> None:  # pragma: no cover
    """One of the four commands' cores in a loop until `until`; reports its counts."""
    import time

    from deskgpu.config.reap import load_settings
    from deskgpu.reap import observe, run
    from deskgpu.usage import report
    from tests.test_reap_live import ROOT

    config = make_config(tmp, retention="40d")
    settings = load_settings(config)
    done = errors = 0
    messages: list[str] = []
    step = 0
    while time.monotonic() < until:
        step += 1
        box = Box(tmp)
        box.now = T0 + 31 * 86400 + 60.0 * step
        try:
            if role == "observe":
                observe.observe(config, settings, box.live())
            elif role == "reap":
                run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
            elif role == "report":
                report.make(settings, since_s=31 * 86400.0, now=box.now)
            else:
                read_notices(settings.history_file)  # what `deskgpu queue` reads
            done += 1
        except Exception as exc:  # counted, not raised: the parent asserts on them
            errors += 1
            messages.append(f"{type(exc).__name__}: {exc}"[:200])
    os.write(write_fd, json.dumps({"role": role, "done": done, "errors": messages}).encode())


def test_observe_reap_report_and_queue_together_for_a_minute(tmp_path: Path) -> None:
    """On a month's history (20 sessions, every 5 minutes), the four at once: 0 lock errors."""
    import time

    from deskgpu.config.reap import load_settings

    config = make_config(tmp_path, retention="40d")
    settings = load_settings(config)
    with open_history(settings.history_file) as h:
        for i in range(31 * 288):
            h.append(
                T0 + 300 * i,
                [
                    SessionSample(f"s{k}-dbg", ((k % 8, 0.0, 100.0),), 0, float(i))
                    for k in range(20)
                ],
            )
    until = time.monotonic() + 60
    children = []
    for role in ("observe", "reap", "report", "queue"):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            code = 1
            try:
                os.close(read)
                _worker(role, tmp_path, until, write)
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        children.append((pid, read))
    results = []
    for pid, read in children:
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        os.waitpid(pid, 0)
        results.append(json.loads(b"".join(chunks)))
    for r in results:
        assert r["done"] > 0, r
        assert r["errors"] == [], r


def test_a_history_killed_while_being_created_still_opens(tmp_path: Path) -> None:
    """Its tables without the format row (a kill found by the crash test): ours, not foreign."""
    from deskgpu.state.history import _SCHEMA

    path = tmp_path / "history.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA)  # the tables, not the format row
    db.close()
    with open_history(path) as h:
        assert h.latest() is None
    assert sqlite3.connect(path).execute("SELECT value FROM meta").fetchone() == ("1",)
