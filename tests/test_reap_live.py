"""reap and observe end to end on a simulated box: recorded snapshots, a real /proc-like tree,
a real SQLite history, real notify hooks and subprocesses; only time and `sky down` are fed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from deskgpu import identity
from deskgpu.config import HostConfig
from deskgpu.config.reap import load_settings
from deskgpu.errors import DeskgpuError, ExitStatus, OutsideError
from deskgpu.identity import Actor
from deskgpu.reap import observe, run
from deskgpu.reap.act import kill_unmanaged
from deskgpu.reap.rule import Action, Decision
from deskgpu.snapshot import Snapshot
from deskgpu.state import audit
from deskgpu.state.history import open_history

T0 = 1_767_000_000.0
POD = "0a1b2c3d-1111-2222-3333-444455556666"
POD2 = "0a1b2c3d-1111-2222-3333-777788889999"
STEP = 600.0


class Box:
    """A box whose sessions we script: GPU utilization per cluster, SSH, CPU, time."""

    def __init__(self, tmp: Path) -> None:
        self.now = T0
        self.proc = tmp / "proc"
        self.cgroup = tmp / "cgroup"
        self.util = {"alice-dbg": 0, "bob-nb": 0}
        self.ssh = {"alice-dbg": 0, "bob-nb": 0}
        self.cpu_s = {"alice-dbg": 0.0, "bob-nb": 0.0}
        self.downs: list[str] = []
        self.fail_down: set[str] = set()
        self.jobs: dict[str, tuple[int, int]] = {}

    def snapshot(self, _config: HostConfig) -> Snapshot:
        self._write_proc()
        gpus = []
        for index, (cluster, pod, pid) in enumerate(
            [("alice-dbg", POD, 1001), ("bob-nb", POD2, 2001)]
        ):
            gpus.append(
                {
                    "index": index,
                    "utilization_gpu_pct": self.util[cluster],
                    "memory_used_mib": 20000,
                    "processes": [
                        {
                            "pid": pid,
                            "used_memory_mib": 20000,
                            "holder": {
                                "kind": "skypilot",
                                "user": cluster.split("-")[0],
                                "cluster": cluster,
                                "cluster_name_on_cloud": f"{cluster}-2ea4",
                                "pod_uid": pod,
                                "job_kind": "interactive",
                            },
                        }
                    ],
                }
            )
        clusters = [
            {
                "name": c,
                "user": c.split("-")[0],
                "state": "Running",
                "sky_status": "UP",
                "launched_at": T0 - 3600,
                "interactive": True,
                "cluster_name_on_cloud": f"{c}-2ea4",
                "labels": {"deskgpu.io/user": c.split("-")[0], "deskgpu.io/kind": "interactive"},
            }
            for c in ("alice-dbg", "bob-nb")
        ]
        doc = {
            "schema_version": 1,
            "taken_at": self.now,
            "nvml": {"available": True, "gpus": gpus},
            "sky": {"available": True, "clusters": clusters, "jobs": []},
        }
        return Snapshot.from_dict(json.loads(json.dumps(doc)))  # as a recording would be read

    def _write_proc(self) -> None:
        for cluster, pod, pid in (("alice-dbg", POD, 1001), ("bob-nb", POD2, 2001)):
            pod_slice = f"kubepods-pod{pod.replace('-', '_')}.slice"
            cg = f"0::/kubepods.slice/{pod_slice}/cri-containerd-ab12cd34ef56.scope\n"
            procs = [(pid, "python -m ipykernel_launcher", "0")]
            if self.ssh[cluster]:
                procs.append((pid + 1, "sshd: sky@pts/0", "0"))
            for p, cmd, tty in procs:
                d = self.proc / str(p)
                d.mkdir(parents=True, exist_ok=True)
                (d / "cgroup").write_text(cg)
                (d / "cmdline").write_bytes(cmd.replace(" ", "\0").encode() + b"\0")
                (d / "stat").write_text(f"{p} (x) S 1 {p} {p} {tty} -1 0\n")
            if not self.ssh[cluster]:
                stale = self.proc / str(pid + 1)
                if stale.exists():
                    for f in stale.iterdir():
                        f.unlink()
                    stale.rmdir()
            slice_dir = (
                self.cgroup / "kubepods.slice" / f"kubepods-pod{pod.replace('-', '_')}.slice"
            )
            slice_dir.mkdir(parents=True, exist_ok=True)
            (slice_dir / "cpu.stat").write_text(f"usage_usec {int(self.cpu_s[cluster] * 1e6)}\n")

    def down(self, name: str, _config: HostConfig) -> None:
        if name in self.fail_down:
            raise OutsideError(f"{name}: teardown failed: SkyPilot rejected the request")
        self.downs.append(name)

    def live(self) -> run.Live:
        return run.Live(  # utilization() reads the scripted snapshot
            snapshot=self.snapshot,
            pods=lambda: None,
            cluster_jobs=lambda name, _c: self.jobs.get(name, (0, 0)),
            down=self.down,
            proc_root=self.proc,
            cgroup_root=self.cgroup,
            clock=lambda: self.now,
            sleep=self.advance,
        )

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for k in self.cpu_s:
            self.cpu_s[k] += 0.01 * seconds  # 1% of a core: idle


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def make_config(tmp: Path, **reap: Any) -> HostConfig:
    hook = tmp / "hook.py"
    hook.write_text(
        "import json, sys\n"
        f"open({str(tmp / 'notices.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    section = {
        "min_age": "2h",
        "idle_window": "1h",
        "grace": "1h",
        "notify_command": [sys.executable, str(hook), "{owner}", "{cluster}", "{message}"],
        **reap,
    }
    return HostConfig(box_name="testbox", state_dir=str(tmp / "state"), reap=section)


ROOT = Actor("root", 0, frozenset())


def observe_for(box: Box, config: HostConfig, seconds: float) -> list[observe.ObserveResult]:
    settings = load_settings(config)
    results = []
    end = box.now + seconds
    while box.now < end:
        results.append(observe.observe(config, settings, box.live()))
        box.advance(STEP)
    results.append(observe.observe(config, settings, box.live()))
    return results


def test_week_of_idle_is_warned_by_observe_then_reaped_in_one_run(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    settings = load_settings(config)
    box.util["bob-nb"] = 60  # bob is working
    results = observe_for(box, config, 2 * 3600)
    warned = [r for r in results if r.warned]
    # alice qualifies once she is 2h old (min_age) and idle 1h: observe warns her then.
    assert [r.warned for r in warned] == [["alice-dbg"]]
    assert warned[0].at == T0 + 3600  # launched_at T0-1h, so 2h old at T0+1h
    notices = [json.loads(line) for line in (tmp_path / "notices.jsonl").read_text().splitlines()]
    assert notices[0][:2] == ["alice", "alice-dbg"]
    assert "/checkpoints/alice/" in notices[0][2] and "survive teardown" in notices[0][2]

    result = run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    assert [d.subject for d in result.decisions if d.action is Action.REAP] == ["alice-dbg"]
    assert box.downs == ["alice-dbg"]
    assert result.exit_status == ExitStatus.OK
    lines = [json.loads(x) for x in settings.audit_file.read_text().splitlines()]
    events = [
        (x["event"], x.get("subject"), x.get("action")) for x in lines if x["actor"] == "root"
    ]
    assert ("decision", "alice-dbg", "reap") in events
    assert ("decision", "bob-nb", "keep") in events
    assert ("action", "alice-dbg", "reap") in events
    assert lines[-1]["event"] == "run" and lines[-1]["run_id"] == result.run_id  # doctor's proof
    assert lines[-1]["counts"] == {"reap": 1, "keep": 1} and lines[-1]["failures"] == 0
    assert audit.last_reap_run(settings.audit_file) == (box.now, result.run_id)
    # "why was my session killed?": the evidence file re-decides to the same answer
    replayed = run.replay(Path(result.evidence_file or ""), settings)
    assert {d.subject: d.action for d in replayed.decisions} == {
        d.subject: d.action for d in result.decisions
    }


def test_owner_coming_back_clears_the_notice(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    settings = load_settings(config)
    observe_for(box, config, 3600)
    with open_history(settings.history_file) as h:
        assert h.notice("alice-dbg", T0 - 3600) is not None
    box.ssh["alice-dbg"] = 1
    results = observe_for(box, config, STEP)
    assert any("alice-dbg" in r.cleared for r in results)
    result = run.reap(config, settings, yes=False, actor=ROOT, live=box.live())
    alice = next(d for d in result.decisions if d.subject == "alice-dbg")
    assert alice.action is Action.KEEP and "SSH/IDE" in alice.summary


def test_dry_run_touches_nothing_and_exits_3(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    result = run.reap(config, settings, yes=False, actor=ROOT, live=box.live())
    assert result.zombies and box.downs == [] and result.outcomes == []
    assert result.exit_status == ExitStatus.FOUND


def test_running_job_found_by_the_queue_check_keeps_the_session(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path, warn_on_observe=False)
    box.jobs["alice-dbg"] = (1, 0)
    observe_for(box, config, 3 * 3600)
    result = run.reap(config, load_settings(config), yes=True, actor=ROOT, live=box.live())
    alice = next(d for d in result.decisions if d.subject == "alice-dbg")
    assert alice.action is Action.KEEP and "1 running job(s)" in alice.summary
    assert box.downs == []


def test_one_failed_teardown_does_not_stop_the_others(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    box.fail_down.add("alice-dbg")
    result = run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    assert box.downs == ["bob-nb"]
    assert [o.subject for o in result.failures] == ["alice-dbg"]
    assert result.exit_status == ExitStatus.OUTSIDE_FAILURE


def test_non_root_may_reap_only_their_own(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    bob = Actor("bob", 1002, frozenset({"bob"}))
    result = run.reap(config, settings, yes=True, actor=bob, live=box.live())
    assert box.downs == ["bob-nb"]
    skipped = next(o for o in result.outcomes if o.subject == "alice-dbg")
    assert skipped.did == "skipped"
    assert "owned by alice, needs root or admin_group" in skipped.message


def test_admin_group_counts_only_from_the_root_owned_system_config(
    box: Box, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-root user picks their own config: naming their own group as `admin_group`
    (with tiny thresholds) must not let them reap others' sessions."""

    config = make_config(tmp_path)
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    system = tmp_path / "etc-config.yaml"
    system.write_text("admin_group: gpuadmin\n")
    carol = Actor("carol", 1003, frozenset({"gpuadmin"}))
    monkeypatch.setattr(identity, "SYSTEM_CONFIG", system)
    mine = tmp_path / "carol.yaml"
    mine.write_text("admin_group: gpuadmin\n")
    # her own config file: the group does not count, whoever owns the file
    monkeypatch.setattr(identity, "root_owned", lambda _p: True)
    untrusted = HostConfig(**{**config.__dict__, "admin_group": "gpuadmin", "source": str(mine)})
    result = run.reap(untrusted, settings, yes=True, actor=carol, live=box.live())
    assert box.downs == []
    assert all(o.did == "skipped" for o in result.outcomes)
    assert "counts only from the root-owned" in result.outcomes[0].message
    # the system config, but writable by her (not root-owned): does not count either
    monkeypatch.setattr(identity, "root_owned", lambda _p: False)
    trusted = HostConfig(**{**config.__dict__, "admin_group": "gpuadmin", "source": str(system)})
    run.reap(trusted, settings, yes=True, actor=carol, live=box.live())
    assert box.downs == []
    # the root-owned system config: she is an admin
    monkeypatch.setattr(identity, "root_owned", lambda _p: True)
    run.reap(trusted, settings, yes=True, actor=carol, live=box.live())
    assert box.downs == ["alice-dbg", "bob-nb"]


def test_owner_name_shared_by_two_accounts_is_refused() -> None:
    from deskgpu.identity import may_act_on, safe_user

    john = Actor("john.smith", 1010, frozenset())
    label = safe_user("john.smith")
    assert may_act_on(john, label, None, ["john.smith", "john_smith", "alice"]) is None
    other = Actor("john_smith", 1011, frozenset())
    assert may_act_on(other, label, None, ["john.smith", "john_smith"]) is not None
    # an account literally named like another's label: ambiguous, refused
    refused = may_act_on(john, label, None, ["john.smith", label])
    assert refused is not None and "also matches account" in refused


def test_no_history_samples_live_and_says_evidence_is_short(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path, live_window="30s", live_interval="10s")
    result = run.reap(config, load_settings(config), yes=False, actor=ROOT, live=box.live())
    assert result.evidence.source == "live"
    assert any("evidence is short" in n for n in result.notes)
    assert len({s.ts for s in result.evidence.sessions[0].gpu_samples}) == 4
    assert not result.zombies and result.exit_status == ExitStatus.OK


def test_concurrent_runs_serialize_on_the_lock(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path, lock_timeout="1s")
    settings = load_settings(config)
    with audit.run_lock(settings.lock_file, 1), pytest.raises(OutsideError, match="another reap"):
        run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    order: list[str] = []
    release = threading.Event()

    def holder() -> None:
        with audit.run_lock(settings.lock_file, 5):
            order.append("first")
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    while not order:
        pass
    threading.Timer(0.3, release.set).start()
    with audit.run_lock(settings.lock_file, 5):
        order.append("second")
    t.join()
    assert order == ["first", "second"]


def test_notify_hook_gets_a_hostile_cluster_name_as_one_argument(tmp_path: Path) -> None:
    from deskgpu.reap.act import notify

    out = tmp_path / "args.json"
    script = f"import json,sys; open({str(out)!r},'w').write(json.dumps(sys.argv[1:]))"
    error = notify(
        (sys.executable, "-c", script, "{cluster}"), {"cluster": "x; touch /tmp/pwned"}, 10
    )
    assert error is None
    assert json.loads(out.read_text()) == ["x; touch /tmp/pwned"]


def test_kill_unmanaged_sigterm_then_sigkill(tmp_path: Path) -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('up', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline()
    command = " ".join(stubborn.args)  # type: ignore[arg-type]
    decision = Decision(
        subject=f"pid:{stubborn.pid}",
        action=Action.REPORT_UNMANAGED,
        owner="x",
        kind="unmanaged",
        reasons=(),
        pid=stubborn.pid,
        command=command,
    )
    # a non-root caller is refused; the wrong command (PID reused) is refused
    assert kill_unmanaged(decision, Actor("x", 1000, frozenset()), 1).did == "skipped"
    other = Decision(**{**decision.__dict__, "command": "something else"})
    assert "different process" in kill_unmanaged(other, ROOT, 1).message
    reaped = threading.Thread(target=stubborn.wait)
    reaped.start()  # reap the zombie so /proc/<pid>/cmdline empties
    outcome = kill_unmanaged(decision, ROOT, 0.5, send=os.kill)
    reaped.join(5)
    assert outcome.did == "killed" and outcome.ok
    assert stubborn.returncode == -9 or "SIGKILL" in outcome.message


def test_reap_cli_live_path(box: Box, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real CLI over the simulated box: dry run exits 3, --json and --record agree."""
    config = make_config(tmp_path)
    observe_for(box, config, 3 * 3600)
    cfg_file = tmp_path / "config.yaml"
    import yaml

    cfg_file.write_text(
        yaml.safe_dump({"box_name": "testbox", "state_dir": config.state_dir, "reap": config.reap})
    )
    live = box.live()
    monkeypatch.setattr(run, "Live", lambda: live)
    rec = tmp_path / "evidence.json"
    result = cli("reap", "--config", str(cfg_file), "--json", "--record", str(rec))
    assert result.exit_code == 3, result.stderr
    doc = json.loads(result.stdout)
    assert doc["counts"] == {"reap": 2} and doc["dry_run"] is True
    again = cli("reap", "--config", str(cfg_file), "--evidence", str(rec), "--quiet")
    assert again.exit_code == 3
    assert "alice-dbg" in again.stdout and "bob-nb" in again.stdout
    observed = cli("observe", "--config", str(cfg_file), "--json")
    assert observed.exit_code == 0, observed.stderr
    assert json.loads(observed.stdout)["sessions"] == 2


def _history_rows(path: Path) -> tuple[int, int]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        gpu = db.execute("SELECT COUNT(*) FROM gpu_samples").fetchone()[0]
        act = db.execute("SELECT COUNT(*) FROM activity_samples").fetchone()[0]
        return gpu, act
    finally:
        db.close()


def test_dry_run_writes_no_shared_state(box: Box, tmp_path: Path) -> None:
    """A dry run (any user, any time) adds no history rows, audit lines, evidence files or
    notices, and so cannot rotate away the evidence of real runs."""
    config = make_config(tmp_path, warn_on_observe=False)
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    box.advance(60)
    before = _history_rows(settings.history_file)
    audit_before = settings.audit_file.read_text() if settings.audit_file.exists() else ""
    result = run.reap(config, settings, yes=False, actor=ROOT, live=box.live())
    assert result.zombies and result.exit_status == ExitStatus.FOUND
    assert result.evidence_file is None
    assert _history_rows(settings.history_file) == before
    assert not settings.evidence_dir.exists()
    assert (settings.audit_file.read_text() if settings.audit_file.exists() else "") == audit_before
    with open_history(settings.history_file) as h:
        assert h.notices() == []
    # ... yet it decided from this moment's readings too, like a --yes run would
    newest = max(g.ts for g in result.evidence.sessions[0].gpu_samples)
    assert newest == box.now


def test_failing_action_is_audited_and_the_others_continue(
    box: Box, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history failing inside one action (a locked database) once made the context
    manager yield twice: an internal error, the remaining actions abandoned, no audit line."""
    import sqlite3

    from deskgpu.state import history

    config = make_config(tmp_path, warn_on_observe=False)
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    calls: list[str] = []

    def locked(self: history.History, notice: history.Notice) -> None:
        calls.append(notice.cluster)
        if notice.cluster == "alice-dbg":
            raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(history.History, "record_notice", locked)
    result = run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    assert calls == ["alice-dbg", "bob-nb"]
    assert [(o.subject, o.did) for o in result.outcomes] == [
        ("alice-dbg", "failed"),
        ("bob-nb", "warned"),
    ]
    assert result.exit_status == ExitStatus.OUTSIDE_FAILURE
    lines = [json.loads(x) for x in settings.audit_file.read_text().splitlines()]
    actions = [(x["subject"], x["did"]) for x in lines if x["event"] == "action"]
    assert ("alice-dbg", "failed") in actions and ("bob-nb", "warned") in actions


def test_owner_back_just_before_teardown_is_skipped(box: Box, tmp_path: Path) -> None:
    """The evidence is minutes old by the second `sky down`: bob attached meanwhile."""
    config = make_config(tmp_path)
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    real_down = box.down

    def slow_down(name: str, cfg: HostConfig) -> None:
        real_down(name, cfg)
        box.ssh["bob-nb"] = 1  # bob logs in while alice's session goes down
        box._write_proc()

    box.down = slow_down  # type: ignore[method-assign]
    result = run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    assert box.downs == ["alice-dbg"]
    bob = next(o for o in result.outcomes if o.subject == "bob-nb")
    assert bob.did == "skipped" and "SSH/IDE session attached just now" in bob.message
    assert result.exit_status == ExitStatus.OK
    # GPU work started just before the teardown keeps it too (one NVML read per teardown)
    box.ssh["bob-nb"] = 0
    live = box.live()
    live.gpu_util = lambda: {0: 0.0, 1: 90.0}
    result = run.reap(config, settings, yes=True, actor=ROOT, live=live)
    bob = next(o for o in result.outcomes if o.subject == "bob-nb")
    assert bob.did == "skipped" and "90% GPU on GPU 1 just now" in bob.message
    assert box.downs == ["alice-dbg"]


def test_failed_notify_hook_starts_no_grace_period(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path, warn_on_observe=False)
    config.reap["notify_command"] = [sys.executable, "-c", "raise SystemExit(4)"]
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    result = run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    assert {o.did for o in result.outcomes} == {"failed"}
    assert "grace not started" in result.outcomes[0].message
    assert result.exit_status == ExitStatus.OUTSIDE_FAILURE
    with open_history(settings.history_file) as h:
        assert h.notices() == []


def test_observe_gives_no_notice_it_cannot_audit(box: Box, tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit-is-a-dir"
    audit_dir.mkdir()
    config = make_config(tmp_path, audit_log=str(audit_dir))
    settings = load_settings(config)
    results = observe_for(box, config, 2 * 3600)
    assert not any(r.warned for r in results)
    assert any("no notice given" in n for r in results for n in r.notes)
    assert not (tmp_path / "notices.jsonl").exists()  # the hook never ran
    with open_history(settings.history_file) as h:
        assert h.notices() == []


def test_stale_notice_is_not_counted_when_the_history_no_longer_covers_it(
    box: Box, tmp_path: Path
) -> None:
    """probe A, part B: warned in week 1; the owner worked, then idled; retention pruned the
    work. The week-1 notice must not count (before: reaped at once), and observe clears it
    even with warn_on_observe off."""
    config = make_config(tmp_path, warn_on_observe=False, retention="3h")
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    first = run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    assert {o.did for o in first.outcomes} == {"warned"}
    box.advance(STEP)
    box.ssh["alice-dbg"] = 1
    box.util["alice-dbg"] = 80
    results = observe_for(box, config, 2 * 3600)  # alice works for 2h
    assert any("alice-dbg" in r.cleared for r in results)
    box.ssh["alice-dbg"] = 0
    box.util["alice-dbg"] = 0
    box.advance(STEP)
    observe_for(box, config, 4 * 3600)  # idle 4h; the 3h retention prunes her work
    second = run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    alice = next(d for d in second.decisions if d.subject == "alice-dbg")
    assert alice.action is Action.WARN, alice.summary
    assert "alice-dbg" not in box.downs


def test_unreadable_pod_cpu_is_a_note_and_never_idle(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    settings = load_settings(config)
    scripted = box.live

    def unreadable_cgroups() -> run.Live:
        return replace(scripted(), cgroup_root=tmp_path / "no-cgroup")

    box.live = unreadable_cgroups  # type: ignore[method-assign]
    results = observe_for(box, config, 3 * 3600)
    assert any("CPU use is unreadable" in n for r in results for n in r.notes)
    assert not any(r.warned for r in results)
    result = run.reap(config, settings, yes=False, actor=ROOT, live=box.live())
    assert not result.zombies
    alice = next(d for d in result.decisions if d.subject == "alice-dbg")
    assert "CPU use unknown" in alice.summary


def test_kill_never_signals_a_process_that_took_the_pid_over(tmp_path: Path) -> None:
    """probe F: the PID is reused during the SIGTERM wait by a process with the same
    command line; it must not get the SIGKILL."""
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cmdline").write_bytes(b"python\0train.py\0")

    def start(ticks: int) -> None:
        (proc / "4242" / "stat").write_text(
            f"4242 (python) S 1 4242 4242 0 -1 4194304 {' '.join(['0'] * 12)} {ticks} 0 0\n"
        )

    start(1000)
    sent: list[tuple[int, int]] = []

    def send(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        start(2000)  # the process exits; a new one with the same command takes the PID

    decision = Decision(
        subject="pid:4242",
        action=Action.REPORT_UNMANAGED,
        owner="ivan",
        kind="unmanaged",
        reasons=(),
        pid=4242,
        command="python train.py",
        proc_start_time=1000,
    )
    outcome = kill_unmanaged(decision, ROOT, 0.3, proc, send=send)
    assert sent == [(4242, 15)]  # SIGTERM only
    assert outcome.did == "killed" and "exited after SIGTERM" in outcome.message
    # seen with another start time: the PID is someone else's by now; nothing is sent
    sent.clear()
    outcome = kill_unmanaged(decision, ROOT, 0.3, proc, send=send)
    assert sent == [] and outcome.did == "skipped" and "different process" in outcome.message
    # no command line known: cannot tell it is the same process
    blind = Decision(**{**decision.__dict__, "command": None, "proc_start_time": None})
    assert kill_unmanaged(blind, ROOT, 0.3, proc, send=send).did == "skipped"
    init = Decision(**{**decision.__dict__, "pid": 1, "subject": "pid:1"})
    assert kill_unmanaged(init, ROOT, 0.3, proc, send=send).did == "skipped" and sent == []


def test_kill_through_a_pidfd_checks_the_start_time(tmp_path: Path) -> None:
    """The default path (no `send`): signals go through a pidfd, after the identity check."""
    from deskgpu.reap.act import identity

    victim = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert victim.stdout is not None and victim.stdout.readline()
    seen = identity(Path("/proc"), victim.pid)
    assert seen is not None
    decision = Decision(
        subject=f"pid:{victim.pid}",
        action=Action.REPORT_UNMANAGED,
        owner="x",
        kind="unmanaged",
        reasons=(),
        pid=victim.pid,
        command=seen[0],
        proc_uid=seen[1],
        proc_start_time=seen[2] + 1,  # seen earlier as another process: refused
    )
    assert kill_unmanaged(decision, ROOT, 1).did == "skipped"
    assert victim.poll() is None
    exact = Decision(**{**decision.__dict__, "proc_start_time": seen[2]})
    reaped = threading.Thread(target=victim.wait)
    reaped.start()
    outcome = kill_unmanaged(exact, ROOT, 2)
    reaped.join(5)
    assert outcome.did == "killed" and victim.returncode == -15, outcome.message


def test_dry_run_shows_what_this_callers_yes_would_do(box: Box, tmp_path: Path) -> None:
    """A researcher's dry run once listed others' zombies as `reap` (exit 3); only --yes
    showed they would be skipped."""
    config = make_config(tmp_path)
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    bob = Actor("bob", 1002, frozenset({"bob"}))
    dry = run.reap(config, settings, yes=False, actor=bob, live=box.live())
    refused = {d.subject: d.refused for d in dry.decisions}
    assert refused == {"alice-dbg": "owned by alice, needs root or admin_group", "bob-nb": None}
    assert [d.subject for d in dry.actionable] == ["bob-nb"]
    assert dry.exit_status == ExitStatus.FOUND and dry.to_dict()["would_skip"] == 1
    acted = run.reap(config, settings, yes=True, actor=bob, live=box.live())
    skipped = {o.subject for o in acted.outcomes if o.did == "skipped"}
    assert skipped == {d.subject for d in dry.would_skip}  # the dry run told the truth
    assert box.downs == ["bob-nb"]
    with pytest.raises(DeskgpuError, match="--as-admin: bob is not root nor in admin_group"):
        run.reap(config, settings, yes=False, actor=bob, live=box.live(), as_admin=True)
    admin = run.reap(config, settings, yes=False, actor=ROOT, live=box.live(), as_admin=True)
    assert all(d.refused is None for d in admin.decisions)
    with pytest.raises(DeskgpuError, match="--yes acts as you"):
        run.reap(config, settings, yes=True, actor=ROOT, live=box.live(), as_admin=True)


def test_only_others_zombies_is_exit_0_for_a_researcher(box: Box, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    settings = load_settings(config)
    observe_for(box, config, 3 * 3600)
    carol = Actor("carol", 1003, frozenset({"carol"}))
    dry = run.reap(config, settings, yes=False, actor=carol, live=box.live())
    assert len(dry.would_skip) == 2 and dry.actionable == []
    assert dry.exit_status == ExitStatus.OK  # her --yes would do nothing


def test_allocated_but_unused_pod_is_observed_and_reaped(box: Box, tmp_path: Path) -> None:
    """The zombie Kubernetes makes most often: bob's pod holds GPU 1 through the device
    plugin with no process on it. The allocation is read from the pod's real environment
    (NVIDIA_VISIBLE_DEVICES in the box's /proc tree) by the live code path."""
    from deskgpu import allocation
    from deskgpu.attribution import PodIndex

    config = make_config(tmp_path)
    settings = load_settings(config)
    plain = box.snapshot

    def snapshot(cfg: HostConfig) -> Snapshot:
        snap = plain(cfg)
        gpu1 = snap.nvml.gpus[1]
        gpu1.uuid, gpu1.processes, gpu1.memory_used_mib = "GPU-1111", [], 0  # no process
        (box.proc / "2001" / "environ").write_bytes(
            b"PATH=/usr/bin\0NVIDIA_VISIBLE_DEVICES=GPU-1111\0"
        )
        view = allocation.from_environ(snap.nvml.gpus, PodIndex(), box.proc, tmp_path / "k")
        allocation.apply(snap, view, PodIndex())
        return snap

    box.snapshot = snapshot  # type: ignore[method-assign]
    (box.proc / "1").mkdir(parents=True, exist_ok=True)
    hosts = tmp_path / "k" / "pods" / POD2 / "etc-hosts"  # the kubelet names the pod
    hosts.parent.mkdir(parents=True)
    hosts.write_text("127.0.0.1\tlocalhost\n10.42.0.9\tbob-nb-2ea4-head\n")
    observe_for(box, config, 3 * 3600)
    result = run.reap(config, settings, yes=True, actor=ROOT, live=box.live())
    bob = next(d for d in result.decisions if d.subject == "bob-nb")
    assert bob.action is Action.REAP, bob.summary
    assert "1 GPU allocated, unused for" in bob.summary and "(no GPU process)" in bob.summary
    assert bob.allocated_gpus == (1,) and bob.gpus == ()
    assert "bob-nb" in box.downs
    session = next(s for s in result.evidence.sessions if s.cluster == "bob-nb")
    assert session.allocation_source == "environ" and session.vram_mib == 0
    assert {g.gpu for g in session.gpu_samples} == {1}
    assert any("GPU allocation: from NVIDIA_VISIBLE_DEVICES" in n for n in result.evidence.notes)
