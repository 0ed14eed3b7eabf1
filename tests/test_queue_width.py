"""`deskgpu queue` in an 80- and a 60-column SSH window: what people look for stays whole.

Every recorded snapshot, through the real CLI: each GPU's holders, each active job's name,
each session's name and each state appear uncut; less important columns go first."""

from __future__ import annotations

from pathlib import Path

import pytest

from deskgpu.queue import load
from deskgpu.snapshot import ACTIVE_STATES, Snapshot

SNAPSHOTS = sorted((Path(__file__).parent / "fixtures" / "snapshots").glob("*.json"))
CONFIG = Path(__file__).parent / "fixtures" / "doctor" / "host-config.yaml"


def _wanted(snap: Snapshot) -> list[str]:
    words: list[str] = []
    for gpu in snap.nvml.gpus:
        words += [h.label for h in gpu.holders]
        if gpu.allocated_to is not None:
            words.append(gpu.allocated_to.label)
    for job in snap.sky.jobs:
        if job.state in ACTIVE_STATES:
            words += [w for w in (job.name, job.user, job.state) if w]
    for cluster in snap.sky.clusters:
        words += [w for w in (cluster.name, cluster.user, cluster.state) if w]
    return words


@pytest.mark.parametrize("width", [80, 60])
@pytest.mark.parametrize("path", SNAPSHOTS, ids=lambda p: p.stem)
def test_every_holder_and_name_is_whole(cli, path: Path, width: int) -> None:
    result = cli(
        "queue", "--snapshot", str(path), "--config", str(CONFIG), env={"COLUMNS": str(width)}
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    assert "…" not in result.stdout
    for word in _wanted(load(path)):
        assert any(word in line for line in lines), (word, result.stdout)


def test_the_wide_screen_keeps_every_column(cli) -> None:
    busy = next(p for p in SNAPSHOTS if p.stem == "busy_box")
    result = cli("queue", "--snapshot", str(busy), "--config", str(CONFIG), env={"COLUMNS": "140"})
    header = "\n".join(result.stdout.splitlines()[:3])
    for column in ("Name", "VRAM used/total", "Power", "Held by"):
        assert column in header
    assert "████" in result.stdout
