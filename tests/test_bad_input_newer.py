"""Bad input in the newer commands (`logs`, `cancel`, `ssh`, `report`, `observe --textfile`,
`setup render`, doctor's host config): no hang, no internal error, one short line.

Each case is named after what a fuzz run reproduced. The commands that could hang run as real
processes with a hard timeout, so a regression fails here instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deskgpu.cli._common import MAX_ERROR_LINE, error_line
from tests.test_reap_live import Box
from tests.test_report import _observed_box, _write_config

DESKGPU = str(Path(sys.executable).with_name("deskgpu"))
JOB_COMMANDS = ("logs", "cancel", "ssh")


def _run(
    *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DESKGPU, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def _one_clean_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[:3000]
    assert "internal error" not in stderr and "Traceback" not in stderr
    assert len(lines[0]) <= 2048
    return lines[0]


# ---- NAME in logs / cancel / ssh --------------------------------------------------------------


@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_a_name_that_is_a_fifo_returns_at_once(hermetic, command: str, tmp_path: Path) -> None:
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    done = _run(command, str(fifo), "--timeout", "1")
    assert done.returncode == 2
    assert "not a regular file" in _one_clean_line(done.stderr)


@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_dev_zero_or_a_symlink_to_it_is_not_read(hermetic, command: str, tmp_path: Path) -> None:
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    for name in ("/dev/zero", str(link)):
        done = _run(command, name, "--timeout", "1")
        assert done.returncode == 2, done.stderr
        assert "not a regular file" in _one_clean_line(done.stderr)


def test_a_50mb_spec_as_name_is_refused_within_the_deadline(hermetic, tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.write(b"name: big\nrun: |\n")
        f.write(b"  x\n" * (50 * 1024 * 1024 // 4))
    started = time.monotonic()
    done = _run("cancel", str(big), "--timeout", "0.1")
    assert done.returncode == 2
    line = _one_clean_line(done.stderr)
    assert "more than a spec can be" in line
    assert time.monotonic() - started < 0.1 + 5 + 10  # the deadline, plus the process start


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("a" * 256, "not a job name"),
        ("a" * 5000, "too long"),
        ("1" * 4301, "too long"),
        ("1" * 4000, "not a managed job id"),
        ("9" * 20, "not a managed job id"),
    ],
    ids=["256-chars", "5000-chars", "4301-digits", "4000-digits", "20-digits"],
)
def test_overlong_names_and_numbers_are_one_short_usage_line(cli, name: str, says: str) -> None:
    result = cli("logs", name, "--timeout", "1")
    assert result.exit_code == 2
    line = _one_clean_line(result.stderr)
    assert says in line and len(line) < 300


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=300))
def test_any_name_is_a_clean_answer(cli, name: str) -> None:
    """Hostile NAMEs (control characters, NULs, paths, digits, unicode) through the real CLI:
    exit 1 (the dead test server) or 2, one line, never an internal error."""
    if name.startswith("-"):
        name = "x" + name
    result = cli("cancel", name, "--timeout", "1")
    assert result.exit_code in (1, 2), result.stderr
    _one_clean_line(result.stderr)


# ---- report --since and --html ---------------------------------------------------------------


def test_report_since_800000d_is_a_usage_error(cli, tmp_path: Path) -> None:
    cfg = _write_config(tmp_path)
    result = cli("report", "--since", "800000d", "--config", str(cfg))
    assert result.exit_code == 2
    assert "at most 3650d" in _one_clean_line(result.stderr)


def test_report_page_is_bounded_by_the_data_not_the_window(cli, tmp_path: Path) -> None:
    box = Box(tmp_path)
    _observed_box(box, tmp_path, 2)
    cfg = _write_config(tmp_path, reap={"idle_window": "1h", "min_age": "2h"})
    small, large = tmp_path / "small.html", tmp_path / "large.html"
    first = cli("report", "--since", "1000d", "--html", str(small), "--config", str(cfg))
    again = cli("report", "--since", "3650d", "--html", str(large), "--config", str(cfg))
    assert first.exit_code == again.exit_code == 0, again.stderr
    # The same page whatever the window beyond the history (it once grew a cell per hour).
    assert abs(large.stat().st_size - small.stat().st_size) < 1024
    assert "the history starts at" in again.stderr


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_report_html_onto_a_special_file_is_refused(hermetic, tmp_path: Path, kind: str) -> None:
    box = Box(tmp_path)
    _observed_box(box, tmp_path, 1)
    cfg = _write_config(tmp_path)
    target = tmp_path / "page.html"
    precious = tmp_path / "precious.txt"
    precious.write_text("mine\n")
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        target.symlink_to(precious)
    else:
        target.mkdir()
    done = _run("report", "--since", "1000d", "--html", str(target), "--config", str(cfg))
    assert done.returncode == 2
    if kind == "directory":  # click's own check of the option: its usage error, exit 2
        assert "is a directory" in done.stderr and "Traceback" not in done.stderr
    else:
        _one_clean_line(done.stderr)
    assert precious.read_text() == "mine\n"  # never written through the link
    assert target.is_symlink() or not target.is_file()  # and never replaced


# ---- observe --textfile ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device"])
def test_observe_textfile_never_replaces_a_special_file(tmp_path: Path, kind: str) -> None:
    from deskgpu.errors import ExitStatus, UsageError
    from deskgpu.usage import textfile

    target = tmp_path / textfile.FILENAME
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        target.symlink_to(tmp_path / "elsewhere.prom")
    else:
        target.symlink_to("/dev/null")  # a device node, as a link (mknod needs CAP_MKNOD)
    with pytest.raises(UsageError) as caught:
        textfile.write(tmp_path, "deskgpu_up 1\n")
    assert caught.value.exit_status == ExitStatus.USAGE
    assert "not a regular file" in str(caught.value) or "symbolic link" in str(caught.value)
    assert not (tmp_path / "elsewhere.prom").exists()
    assert target.is_symlink() or not target.is_file()


def test_observe_textfile_onto_a_file_or_an_unwritable_directory_is_exit_2(tmp_path: Path) -> None:
    from deskgpu.errors import UsageError
    from deskgpu.usage import textfile

    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        textfile.write(not_dir, "deskgpu_up 1\n")
    with pytest.raises(UsageError, match="not a directory"):
        textfile.write(Path("/dev/zero"), "deskgpu_up 1\n")


def test_observe_textfile_error_exit_code_through_the_cli(hermetic, tmp_path: Path) -> None:
    """`observe --textfile` names the same failure as `--record`: a file for DIR is exit 2."""
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    cfg = _write_config(tmp_path)
    done = _run("observe", "--textfile", str(not_dir), "--config", str(cfg))
    assert done.returncode == 2  # click's own check of the option, before anything runs
    assert "is a file" in done.stderr and "Traceback" not in done.stderr


# ---- setup render and host-config paths -----------------------------------------------------


def test_setup_render_under_an_unsearchable_directory_is_a_usage_error(tmp_path: Path) -> None:
    """As nobody: `--out`, `--python` and `--deskgpu` under a 0700 directory of root's."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory another user cannot search")
    import shutil
    import tempfile

    from typer.testing import CliRunner

    from deskgpu.cli import app
    from tests.asuser import as_nobody

    open_dir = Path(tempfile.mkdtemp(prefix="deskgpu-render-", dir="/tmp"))
    open_dir.chmod(0o755)
    locked = open_dir / "locked"
    locked.mkdir(mode=0o700)
    config = open_dir / "host-config.yaml"
    config.write_text("box_name: t\n")
    config.chmod(0o644)
    tools = ["--python", "/bin/sh", "--deskgpu", "/bin/true"]  # executables anyone may run
    cases = {
        "--out": ["--out", str(locked / "out"), *tools],
        "--python": ["--out", str(open_dir / "o"), "--python", str(locked / "python"),
                     "--deskgpu", "/bin/true"],
        "--deskgpu": ["--out", str(open_dir / "o"), "--python", "/bin/sh",
                      "--deskgpu", str(locked / "deskgpu")],
    }  # fmt: skip

    def run() -> dict[str, object]:
        answers = {}
        for flag, args in cases.items():
            r = CliRunner().invoke(app, ["setup", "render", "--config", str(config), *args])
            answers[flag] = [r.exit_code, r.stderr]
        return answers

    try:
        answers = as_nobody(run)
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
    for flag, (code, stderr) in answers.items():
        assert code == 2, (flag, stderr)
        line = _one_clean_line(str(stderr))
        assert "ermission denied" in line or "cannot look" in line, (flag, line)


def test_doctor_skypilot_server_config_of_root_dir_is_located(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("doctor:\n  skypilot_server_config: /\n")
    result = cli("doctor", "--config", str(cfg))
    assert result.exit_code == 2
    assert _one_clean_line(result.stderr).startswith(f"{cfg}:2:27: doctor.skypilot_server_config")


# ---- YAML: tags and merge keys --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("name: x\ngpus: 0\nrun: !custom x\n", "YAML tag !custom is not supported"),
        ("name: x\ngpus: 0\nenv:\n  <<: {A: b}\nrun: echo\n", "merge key (`<<:`) is not supported"),
    ],
    ids=["unknown-tag", "merge-key"],
)
def test_yaml_tags_and_merge_keys_are_one_line_with_the_right_fix(
    cli, tmp_path: Path, text: str, says: str
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    result = cli("submit", str(spec), "--dry-run")
    assert result.exit_code == 2
    line = _one_clean_line(result.stderr)
    assert says in line and "(quote it)" not in line


# ---- recorded documents and server text -----------------------------------------------------


def test_a_huge_value_in_a_recorded_document_is_cut(cli, tmp_path: Path) -> None:
    source = Path(__file__).parent / "fixtures" / "snapshots" / "busy_box.json"
    doc = json.loads(source.read_text())
    doc["schema_version"] = list(range(2000))
    bad = tmp_path / "snap.json"
    bad.write_text(json.dumps(doc))
    result = cli("queue", "--snapshot", str(bad))
    assert result.exit_code == 2
    assert len(_one_clean_line(result.stderr)) < 300


def test_text_from_a_server_is_printed_with_control_bytes_escaped() -> None:
    line = error_line("not SkyPilot: b'\x00\x1b[31mHTTP\xff\x07' and more")
    assert "\x00" not in line and "\x1b" not in line and "\x07" not in line
    assert "\\x00" in line and "\\x1b" in line
    assert len(error_line("x" * 100_000)) <= MAX_ERROR_LINE + 40
