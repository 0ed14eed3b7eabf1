"""hostio.run: a child that runs past its timeout takes its whole process group with it, and
no module of deskgpu starts a program any other way."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from deskgpu import hostio

SRC = Path(__file__).resolve().parents[1] / "src" / "deskgpu"

# A child that forks a grandchild (which ignores SIGTERM and sleeps) and then sleeps itself;
# both write their pids first so the test can look for them afterwards.
FORKER = """
import os, signal, sys, time
out = sys.argv[1]
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(out + ".grandchild", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
    os._exit(0)
with open(out + ".child", "w") as f:
    f.write(str(os.getpid()))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_timeout_kills_the_child_and_its_grandchildren(tmp_path: Path) -> None:
    marks = tmp_path / "pid"
    done = hostio.run([sys.executable, "-c", FORKER, str(marks)], timeout_s=2)
    assert done.timed_out and done.returncode is None
    assert "ran past its timeout" in done.why()
    child = int(Path(f"{marks}.child").read_text())
    grandchild = int(Path(f"{marks}.grandchild").read_text())
    deadline = time.monotonic() + 5
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)


def test_a_missing_program_and_an_exec_error_are_results(tmp_path: Path) -> None:
    missing = hostio.run(["no-such-program-deskgpu"], timeout_s=5, env={"PATH": str(tmp_path)})
    assert missing.missing and missing.returncode is None
    assert missing.why() == "no-such-program-deskgpu not found"
    not_exec = tmp_path / "script"
    not_exec.write_text("#!/bin/sh\n")
    failed = hostio.run([str(not_exec)], timeout_s=5)
    assert failed.error is not None and not failed.ok
    assert str(not_exec) in failed.why()


def test_output_input_and_status_come_back() -> None:
    done = hostio.run(
        [sys.executable, "-c", "import sys; print(sys.stdin.read().upper()); sys.exit(3)"],
        timeout_s=30,
        input_text="hello",
    )
    assert done.returncode == 3 and done.stdout.strip() == "HELLO" and not done.ok


def test_no_module_starts_a_program_but_hostio() -> None:
    """`subprocess` and `os.system`/`os.popen`/`os.spawn*` appear in hostio only. (`deskgpu
    ssh` exec's ssh: that replaces deskgpu, it starts no child.)"""
    users = []
    for path in SRC.rglob("*.py"):
        if path.name == "hostio.py":
            continue
        text = path.read_text()
        if re.search(r"^\s*(import subprocess|from subprocess )", text, re.M) or re.search(
            r"\bos\.(system|popen|spawn\w*)\(", text
        ):
            users.append(str(path.relative_to(SRC)))
    assert sorted(users) == [], users


def test_account_names() -> None:
    assert hostio.user_name(0) == "root"
    assert hostio.user_name(2**31 - 7) is None
    assert hostio.group_name(os.getgid()) is not None
