"""The `reap:` host config section, the history store, and the shipped cron/systemd examples."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from deskgpu.config import load_config
from deskgpu.config.reap import KEYS, ReapSettings, load_settings
from deskgpu.errors import SpecError
from deskgpu.reap.evidence import GpuSample
from deskgpu.state.history import Notice, SessionSample, open_history
from tests.conftest import EXAMPLES


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_documented_ones() -> None:
    s = ReapSettings()
    assert (s.min_age_s, s.idle_window_s, s.grace_s) == (86400, 6 * 3600, 86400)
    assert (s.util_threshold_pct, s.min_vram_mib, s.stalled_batch_after_s) == (5, 1024, 12 * 3600)
    for key, (attr, _, default) in KEYS.items():
        assert hasattr(s, attr), key
        assert default is not None or getattr(s, attr) is None


def test_every_key_parses_through_schema_and_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
state_dir: /srv/deskgpu
protected: [lab-demo, "user:pi"]
reap:
  min_age: 2d
  idle_window: 8h
  util_threshold_pct: 3
  min_vram_mib: 2048
  cpu_busy_pct: null
  grace: 12h
  stalled_batch_after: 1d
  max_sample_gap: 30m
  live_window: 2m
  live_interval: 10s
  retention: 10d
  warn_on_observe: false
  notify_command: [/usr/local/bin/notify-user, "{owner}", "{message}"]
  notify_timeout: 1m
  kill_timeout: 20s
  lock_timeout: 10m
  history_path: /srv/deskgpu/h.sqlite
  audit_log: /var/log/deskgpu/audit.jsonl
""",
    )
    s = load_settings(load_config(path))
    assert (s.min_age_s, s.idle_window_s, s.grace_s, s.live_interval_s) == (
        172800,
        28800,
        43200,
        10,
    )
    assert s.cpu_busy_pct is None and s.warn_on_observe is False
    assert s.notify_command == ("/usr/local/bin/notify-user", "{owner}", "{message}")
    assert s.protected == ("lab-demo", "user:pi")
    assert str(s.history_file) == "/srv/deskgpu/h.sqlite"
    assert str(s.lock_file) == "/srv/deskgpu/reap.lock"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("reap: {idle_windw: 6h}", "idle_windw"),
        ("reap: {grace: soon}", "grace"),
        ("reap: {notify_command: 'mail root'}", "notify_command"),
        ("reap: {util_threshold_pct: -1}", "util_threshold_pct"),
    ],
)
def test_bad_reap_keys_are_located_usage_errors(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(SpecError) as err:
        load_settings(load_config(write(tmp_path, text)))
    assert says in "\n".join(err.value.lines())


def test_bad_reap_config_exits_2_on_the_cli(tmp_path: Path, cli) -> None:
    path = write(tmp_path, "reap: {grace: soon}\n")
    fixture = Path(__file__).parent / "fixtures" / "reap" / "notebook_kernel_idle.json"
    result = cli("reap", "--config", str(path), "--evidence", str(fixture))
    assert result.exit_code == 2
    assert "grace" in result.stderr and result.stdout == ""


def test_history_is_compact_bounded_and_keeps_notices(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    with open_history(db) as h:
        for i in range(10):
            h.append(
                1000.0 + 300 * i,
                [SessionSample("a-x", ((0, 0.4, 20000.0), (1, None, 5.0)), 0, 3.0 * i)],
            )
        h.prune(1000.0 + 300 * 5)
        got = h.samples(["a-x"], 0)["a-x"]
        assert got[0][0] == GpuSample(2500.0, 0, 0.0, 20000.0)  # whole numbers: compact
        assert len(got[0]) == 10 and len(got[1]) == 5
        assert got[1][-1].cpu_pct == 1.0  # 3 CPU-seconds per 300 s
        assert h.since() == 2500.0
        h.record_notice(Notice("a-x", "a", 900.0, 2000.0, 5000.0, "msg"))
        assert h.notice("a-x", 900.0) is not None
        assert h.notice("a-x", 7000.0) is None  # a new session with the same name


def _deskgpu_lines() -> list[list[str]]:
    lines = []
    for raw in (EXAMPLES / "cron" / "deskgpu.crontab").read_text().splitlines():
        if raw.strip() and not raw.startswith("#") and "deskgpu " in raw and "=" not in raw:
            words = shlex.split(raw)
            lines.append(words[words.index("deskgpu") + 1 :])
    for unit in sorted((EXAMPLES / "systemd").glob("*.service")):
        parser = configparser.ConfigParser()
        parser.read(unit)
        words = shlex.split(parser["Service"]["ExecStart"])
        lines.append(words[1:])
    return lines


def test_examples_run_real_commands_with_real_options(cli) -> None:
    lines = _deskgpu_lines()
    assert len(lines) == 4
    for args in lines:
        command, options = args[0], args[1:]
        help_text = cli(command, "--help").stdout
        for option in options:
            assert option in help_text, (command, option)


def test_systemd_units_pair_up() -> None:
    for timer in (EXAMPLES / "systemd").glob("*.timer"):
        parser = configparser.ConfigParser()
        parser.read(timer)
        assert "Timer" in parser and "Install" in parser
        assert timer.with_suffix(".service").exists()
