"""Reap notices in `deskgpu queue`: a real SQLite history written through the reap history API,
read by the real CLI (recorded GPU/SkyPilot halves, or an injected NVML failure), recorded with
`--record` and replayed with `--snapshot`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from deskgpu.config import HostConfig
from deskgpu.config.reap import load_settings
from deskgpu.nvml import NO_DRIVER
from deskgpu.snapshot import NvmlView, SkyView, Snapshot
from deskgpu.state.history import Notice, open_history

SNAPSHOTS = Path(__file__).parent / "fixtures" / "snapshots"
BUSY = json.loads((SNAPSHOTS / "busy_box.json").read_text())
TAKEN_AT = float(BUSY["taken_at"])  # 2025-12-29 09:20 UTC
BOB_LAUNCHED = 1766985600.0  # bob-notebook's launched_at in busy_box
ALICE_JOB = "alice-bert-finetune-2ea4"  # managed job 7's name on cloud: reap's session name
SHOWN = "reap notice: torn down after Dec 29 14:20 UTC"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"box_name": "testbox", "state_dir": str(tmp_path / "state")}))
    return path


def history_file(config_file: Path) -> Path:
    state = yaml.safe_load(config_file.read_text())["state_dir"]
    return load_settings(HostConfig(state_dir=state)).history_file


def give(config_file: Path, *notices: Notice) -> None:
    """Notices as `deskgpu observe`/`reap --yes` record them."""
    with open_history(history_file(config_file)) as history:
        for notice in notices:
            history.record_notice(notice)


def bob_notice(created_at: float | None = BOB_LAUNCHED) -> Notice:
    return Notice(
        cluster="bob-notebook",
        owner="bob",
        created_at=created_at,
        warned_at=TAKEN_AT - 19 * 3600,
        reap_after=TAKEN_AT + 5 * 3600,
        message="bob-notebook on testbox is idle and will be torn down",
    )


def fake_live(
    monkeypatch: pytest.MonkeyPatch, nvml: NvmlView | None = None, sky: SkyView | None = None
) -> None:
    """The recorded busy box as the live halves; either can be swapped for a failure."""
    from deskgpu import nvml as nvml_module
    from deskgpu import queue as survey
    from deskgpu.skypilot import sdk as skyapi

    recorded = Snapshot.from_dict(BUSY)
    monkeypatch.setattr(nvml_module, "read", lambda: nvml or recorded.nvml)
    monkeypatch.setattr(skyapi, "fetch_queue", lambda _config, **_kw: sky or recorded.sky)
    # The recorded halves were seen at TAKEN_AT: so is this look (ages, "(due)").
    monkeypatch.setattr(survey.time, "time", lambda: TAKEN_AT)


def test_notice_shows_in_sessions_table_summary_and_json(cli, monkeypatch, config_file) -> None:
    give(config_file, bob_notice())
    fake_live(monkeypatch)
    result = cli("queue", "--config", str(config_file), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "bob-notebook" in line)
    assert "zombie suspect" in row and SHOWN in result.stdout
    assert "1 zombie suspect · 1 reap notice" in result.stdout
    assert result.stderr == ""

    doc = json.loads(cli("queue", "--config", str(config_file), "--json").stdout)
    assert doc["summary"]["reap_notices"] == ["bob-notebook"]
    assert doc["summary"]["line"].endswith("· 1 reap notice")
    (notice,) = doc["notices"]
    assert notice["cluster"] == "bob-notebook" and notice["owner"] == "bob"
    assert notice["reap_after"] == TAKEN_AT + 5 * 3600 and "torn down" in notice["message"]
    assert doc["notices_error"] is None and doc["schema_version"] == 1


def test_notice_round_trips_through_record_and_snapshot(
    cli, monkeypatch, config_file, tmp_path: Path
) -> None:
    give(config_file, bob_notice())
    fake_live(monkeypatch)
    recorded = tmp_path / "seen.json"
    live = cli("queue", "--config", str(config_file), "--json", "--record", str(recorded))
    assert live.exit_code == 0

    history_file(config_file).unlink()  # the replay reads the recording, never the history
    replayed = cli("queue", "--snapshot", str(recorded), "--json")
    assert json.loads(replayed.stdout) == json.loads(live.stdout)
    table = cli("queue", "--snapshot", str(recorded), env={"COLUMNS": "200"})
    assert SHOWN in table.stdout and "1 reap notice" in table.stdout
    assert not history_file(config_file).exists()


def test_notice_still_shows_when_nvml_fails(cli, monkeypatch, config_file) -> None:
    give(config_file, bob_notice())
    fake_live(monkeypatch, nvml=NvmlView(available=False, error=NO_DRIVER))
    result = cli("queue", "--config", str(config_file), env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "no NVIDIA driver" in result.stderr and result.stderr.count("\n") == 1
    assert SHOWN in result.stdout and "GPUs unknown" in result.stdout
    assert "1 reap notice" in result.stdout


def test_with_neither_half_the_notice_is_a_line_of_its_own(cli, monkeypatch, config_file) -> None:
    give(config_file, bob_notice())
    fake_live(
        monkeypatch,
        nvml=NvmlView(available=False, error=NO_DRIVER),
        sky=SkyView(available=False, error="API server unreachable"),
    )
    result = cli("queue", "--config", str(config_file), env={"COLUMNS": "200"})
    assert result.exit_code == 1  # unchanged: neither half could be read
    assert f"bob-notebook (bob): {SHOWN}" in result.stdout
    doc = json.loads(cli("queue", "--config", str(config_file), "--json").stdout)
    assert doc["summary"]["reap_notices"] == ["bob-notebook"]


def test_managed_job_notice_is_a_line_under_the_tables(cli, monkeypatch, config_file) -> None:
    job = Notice(ALICE_JOB, "alice", 1766993000.0, TAKEN_AT, TAKEN_AT + 5 * 3600, "stalled")
    give(config_file, job)
    fake_live(monkeypatch)
    result = cli("queue", "--config", str(config_file), env={"COLUMNS": "200"})
    assert f"{ALICE_JOB} (alice): {SHOWN}" in result.stdout
    assert "1 reap notice" in result.stdout


def test_relaunched_or_gone_session_does_not_inherit_the_notice(
    cli, monkeypatch, config_file
) -> None:
    """`observe` clears these on its next run; until then the queue must not show them."""
    reborn = bob_notice(created_at=BOB_LAUNCHED - 86400)  # a previous bob-notebook's
    gone = Notice("carol-dbg", "carol", None, TAKEN_AT, TAKEN_AT + 3600, "idle")
    give(config_file, reborn, gone)
    fake_live(monkeypatch)
    result = cli("queue", "--config", str(config_file), "--json")
    doc = json.loads(result.stdout)
    assert len(doc["notices"]) == 2  # recorded as read...
    assert doc["summary"]["reap_notices"] == []  # ...but none concerns a session shown
    assert "reap notice" not in doc["summary"]["line"]


def test_user_filter_keeps_only_their_notices(cli, monkeypatch, config_file) -> None:
    give(config_file, bob_notice())
    fake_live(monkeypatch)
    alice = json.loads(cli("queue", "--config", str(config_file), "--json", "-u", "alice").stdout)
    assert alice["notices"] == [] and alice["summary"]["reap_notices"] == []
    bob = json.loads(cli("queue", "--config", str(config_file), "--json", "-u", "bob").stdout)
    assert bob["summary"]["reap_notices"] == ["bob-notebook"]


def test_no_history_is_no_notices_and_is_not_created(cli, monkeypatch, config_file) -> None:
    fake_live(monkeypatch)
    result = cli("queue", "--config", str(config_file), "--json")
    assert result.exit_code == 0 and result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["notices"] == [] and doc["notices_error"] is None
    assert not history_file(config_file).exists()
    assert not history_file(config_file).parent.exists()


def test_corrupt_history_is_one_note_not_a_crash(cli, monkeypatch, config_file) -> None:
    path = history_file(config_file)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database" * 100)
    fake_live(monkeypatch)
    result = cli("queue", "--config", str(config_file), env={"COLUMNS": "200"})
    assert result.exit_code == 0
    (line,) = result.stderr.splitlines()
    assert line.startswith("deskgpu: reap notices: cannot read the observation history")
    assert "bob-notebook" in result.stdout and "reap notice:" not in result.stdout
    doc = json.loads(cli("queue", "--config", str(config_file), "--json").stdout)
    assert doc["notices"] == [] and "cannot read" in doc["notices_error"]


def test_a_reap_config_reap_refuses_is_refused_by_queue_too_at_its_line(cli, tmp_path) -> None:
    """One host config for every command: what reap would refuse, queue refuses, located."""
    cfg = tmp_path / "config.yaml"
    reap = {"live_window": "10s", "live_interval": "1m"}  # schema-valid, but reap refuses it
    cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path), "reap": reap}))
    result = cli("queue", "--config", str(cfg), "--json")
    assert result.exit_code == 2
    assert f"{cfg}:" in result.stderr and "reap.live_interval: longer than reap.live_window" in (
        result.stderr
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_history_this_user_may_not_read_is_silently_none(cli, monkeypatch, config_file) -> None:
    """A history behind a directory this user may not enter: no notices, and no noise."""
    give(config_file, bob_notice())
    state = history_file(config_file).parent
    state.chmod(0o000)
    try:
        fake_live(monkeypatch)
        result = cli("queue", "--config", str(config_file), "--json")
    finally:
        state.chmod(0o755)
    assert result.exit_code == 0 and result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["notices"] == [] and doc["notices_error"] is None


def test_recording_without_notices_still_reads() -> None:
    """Recordings from before notices existed: same schema_version, no notices."""
    doc = {k: v for k, v in BUSY.items() if k not in ("notices", "notices_error")}
    snap = Snapshot.from_dict(doc)
    assert snap.notices == [] and snap.notices_error is None
    assert Snapshot.from_dict(json.loads(json.dumps(snap.to_dict()))) == snap
