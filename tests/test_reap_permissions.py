"""Dry runs and `--evidence` replays know who is asking: the real CLI, run by a real
non-root process (as root, the test forks and drops to `nobody`; as anyone else, the
caller already is a researcher), replaying the corpus's allocated-but-unused zombie."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.asuser import as_nobody

CORPUS = Path(__file__).parent / "fixtures" / "reap"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory `nobody` can read (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="deskgpu-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def invoke(*args: str) -> dict[str, Any]:
    from deskgpu.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)
    return {"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}


def as_researcher(*args: str) -> dict[str, Any]:
    """The CLI as a user who is neither root nor in admin_group."""
    if os.getuid() != 0:
        return invoke(*args)
    invoke(*args)  # as root first: every lazy import is loaded before the fork
    return as_nobody(lambda: invoke(*args))


def setup(shared: Path, name: str) -> tuple[Path, Path]:
    evidence = shared / f"{name}.json"
    shutil.copy(CORPUS / f"{name}.json", evidence)
    evidence.chmod(0o644)
    config = shared / "config.yaml"
    config.write_text(f"state_dir: {shared / 'state'}\nadmin_group: gpuadmin\n")
    config.chmod(0o644)
    return evidence, config


def test_researchers_dry_run_lists_others_zombies_as_would_skip(shared_dir: Path) -> None:
    evidence, config = setup(shared_dir, "allocated_unused_debug_pod")
    expected = json.loads(evidence.read_text())["expected"]["for_another_user"]
    seen = as_researcher("reap", "--evidence", str(evidence), "--config", str(config))
    assert seen["code"] == expected["exit_dry_run"], seen
    line = next(x for x in seen["stdout"].splitlines() if "nick-debug" in x)
    assert line.startswith("skip ")
    assert expected["refused"]["nick-debug"] in line
    assert "2 GPUs allocated, unused for 5d (no GPU process)" in line  # what the rule said
    assert "1 more --yes would skip" in seen["stdout"] and "--as-admin" in seen["stdout"]
    doc = as_researcher("reap", "--evidence", str(evidence), "--config", str(config), "--json")
    decision = json.loads(doc["stdout"])["decisions"][0]
    assert decision["action"] == "reap"
    assert decision["refused"] == "owned by nick, needs root or admin_group"
    assert json.loads(doc["stdout"])["would_skip"] == 1


def test_as_admin_is_for_root_or_admin_group_only(shared_dir: Path) -> None:
    evidence, config = setup(shared_dir, "allocated_unused_debug_pod")
    args = ("reap", "--evidence", str(evidence), "--config", str(config), "--as-admin")
    refused = as_researcher(*args)
    assert refused["code"] == 2 and refused["stdout"] == ""
    assert len(refused["stderr"].strip().splitlines()) == 1
    assert "--as-admin" in refused["stderr"] and "Traceback" not in refused["stderr"]
    if os.getuid() == 0:  # root's view: the zombie is to be reaped, exit 3
        admin = invoke(*args)
        assert admin["code"] == 3, admin
        assert "would skip" not in admin["stdout"] and "1 zombie(s) found" in admin["stdout"]
