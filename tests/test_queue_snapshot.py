"""Recorded snapshots replayed through `Snapshot.from_dict` and the real `deskgpu queue` CLI.

Each fixture is named after a failure seen in the wild; the replay path is the one the live
reader's output round-trips through, so a fixture recorded on a GPU host with
`deskgpu queue --record` drops in next to these hand-written ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deskgpu import queue as survey
from deskgpu.snapshot import (
    HOLDER_HIDDEN,
    HOLDER_SKYPILOT,
    HOLDER_UNMANAGED,
    RUNNING,
    SCHEMA_VERSION,
    Cluster,
    Gpu,
    GpuProcess,
    Holder,
    Job,
    NvmlView,
    SessionUse,
    SkyView,
    Snapshot,
    SnapshotFormatError,
    is_zombie_suspect,
)

SNAPSHOTS = Path(__file__).parent / "fixtures" / "snapshots"
ALL = sorted(SNAPSHOTS.glob("*.json"))


def load(name: str) -> Snapshot:
    return Snapshot.from_dict(json.loads((SNAPSHOTS / f"{name}.json").read_text()))


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_fixture_round_trips(path: Path) -> None:
    snap = Snapshot.from_dict(json.loads(path.read_text()))
    again = Snapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    assert again == snap
    assert snap.to_dict()["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_fixture_renders_without_live_calls(cli, path: Path, monkeypatch) -> None:
    # No live call may happen: make every live source explode.
    from deskgpu import attribution, nvml
    from deskgpu.skypilot import sdk as skyapi

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("live call during --snapshot")

    monkeypatch.setattr(nvml, "read", boom)
    monkeypatch.setattr(skyapi, "fetch_queue", boom)
    monkeypatch.setattr(attribution, "pods_from_kube", boom)
    result = cli("queue", "--snapshot", str(path))
    snap = Snapshot.from_dict(json.loads(path.read_text()))
    assert result.exit_code == (1 if survey.both_missing(snap) else 0), result.stderr
    assert "Traceback" not in result.stderr
    assert survey.summarize(snap).line() in result.stdout


def test_json_of_a_replayed_snapshot_reads_back_as_the_same_snapshot(cli) -> None:
    result = cli("queue", "--snapshot", str(SNAPSHOTS / "busy_box.json"), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kind"] == "deskgpu.queue/snapshot"
    assert doc["schema_version"] == SCHEMA_VERSION
    assert Snapshot.from_dict(doc) == load("busy_box")


def test_busy_box_summary_line(cli) -> None:
    result = cli("queue", "--snapshot", str(SNAPSHOTS / "busy_box.json"))
    assert result.exit_code == 0
    assert "2 of 4 GPUs free · 3 queued · 1 zombie suspect" in result.stdout
    assert "zombie suspect" in result.stdout.split("Sessions")[1]
    assert "Queued #1" in result.stdout
    assert "old-run" not in result.stdout  # finished jobs only with --all
    assert "old-run" in cli("queue", "--snapshot", str(SNAPSHOTS / "busy_box.json"), "-a").stdout


def test_record_writes_the_snapshot_it_showed(cli, tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    result = cli(
        "queue",
        "--snapshot",
        str(SNAPSHOTS / "busy_box.json"),
        "--user",
        "alice",
        "--record",
        str(out),
    )
    assert result.exit_code == 0
    seen = Snapshot.from_dict(json.loads(out.read_text()))
    assert {j.user for j in seen.sky.jobs} == {"alice"}
    assert len(seen.nvml.gpus) == 4  # GPUs are everyone's business
    assert "carol" not in result.stdout.split("Jobs")[1]


def test_gpu_fell_off_the_bus() -> None:
    snap = load("gpu_fell_off_the_bus")
    lost = snap.nvml.gpus[2]
    assert lost.lost and not lost.is_free and "Xid 79" in (lost.error or "")
    summary = survey.summarize(snap)
    assert (summary.gpus_free, summary.gpus_total, summary.gpus_lost) == (2, 4, 1)


def test_gpu_fell_off_the_bus_renders_a_row_that_says_so(cli) -> None:
    result = cli("queue", "--snapshot", str(SNAPSHOTS / "gpu_fell_off_the_bus.json"))
    row = next(line for line in result.stdout.splitlines() if line.lstrip("│ ").startswith("2 "))
    assert "LOST" in row


def test_fields_not_supported_render_as_na(cli) -> None:
    result = cli("queue", "--snapshot", str(SNAPSHOTS / "fields_not_supported.json"))
    row = next(line for line in result.stdout.splitlines() if "3090" in line)
    assert row.count("N/A") >= 3  # util, temp, power
    assert "unmanaged frank (Xorg)" in row


def test_pid_in_other_pid_namespace_is_kept_as_hidden() -> None:
    gpu = load("pid_in_other_pid_namespace").nvml.gpus[0]
    assert not gpu.is_free
    assert [h.kind for h in gpu.holders] == [HOLDER_HIDDEN]


def test_one_pid_on_two_gpus_counts_once_per_gpu() -> None:
    snap = load("one_pid_on_two_gpus")
    assert [len(g.holders) for g in snap.nvml.gpus] == [1, 1]
    assert snap.nvml.gpus[1].holders[0].label == "alice/bert-finetune"
    assert survey.summarize(snap).gpus_free == 0


def test_two_jobs_on_one_gpu_shows_both_holders(cli) -> None:
    snap = load("two_jobs_on_one_gpu")
    assert [h.label for h in snap.nvml.gpus[0].holders] == ["alice/bert-finetune", "bob/notebook"]
    result = cli("queue", "--snapshot", str(SNAPSHOTS / "two_jobs_on_one_gpu.json"))
    assert "alice/bert-finetune" in result.stdout and "bob/notebook" in result.stdout
    assert "!thermal,power" in result.stdout


def test_unmanaged_host_process() -> None:
    holder = load("unmanaged_host_process").nvml.gpus[0].holders[0]
    assert holder.kind == HOLDER_UNMANAGED
    assert holder.label == "unmanaged gina (python)"


def test_mig_enabled_gpu_without_per_process_memory(cli) -> None:
    gpu = load("mig_enabled").nvml.gpus[0]
    assert gpu.mig_mode is True
    assert gpu.processes[0].used_memory_mib is None
    result = cli("queue", "--snapshot", str(SNAPSHOTS / "mig_enabled.json"))
    assert "[MIG]" in result.stdout and "hidden (pod 0b1c2d3e)" in result.stdout


def test_gpu_half_without_skypilot_is_data(cli) -> None:
    result = cli("queue", "--snapshot", str(SNAPSHOTS / "sky_unreachable.json"))
    assert result.exit_code == 0
    assert "alice/bert-finetune" in result.stdout
    assert result.stderr.count("\n") == 1 and "SkyPilot: " in result.stderr
    assert "unreachable" in result.stderr
    # An unknown queue is not an empty one.
    assert "1 of 2 GPUs free · queue unknown" in result.stdout and "0 queued" not in result.stdout
    doc = json.loads(
        cli("queue", "--snapshot", str(SNAPSHOTS / "sky_unreachable.json"), "--json").stdout
    )
    assert doc["summary"]["queued"] is None and doc["summary"]["running"] is None


def test_skypilot_half_without_gpus_is_data(cli) -> None:
    result = cli("queue", "--snapshot", str(SNAPSHOTS / "no_driver_sky_only.json"))
    assert result.exit_code == 0
    assert "llama-sft" in result.stdout and "GPUs unknown" in result.stdout
    assert "no NVIDIA driver" in result.stderr


def test_handwritten_minimal_snapshot_is_read_with_defaults() -> None:
    snap = load("minimal_handwritten")
    assert snap.nvml.gpus[0].utilization_gpu_pct is None
    assert snap.nvml.gpus[0].processes[0].holder is None
    assert not snap.sky.available


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("not json", "not JSON"),
        ('{"schema_version": 99, "taken_at": 1}', "schema_version 99"),
        ('{"schema_version": 1}', "no taken_at"),
        (
            '{"schema_version": 1, "taken_at": 1, "nvml": {"available": true, "gpus": [{}]}}',
            "nvml.gpus[0]: `index` is missing",
        ),
    ],
)
def test_bad_snapshot_file_is_a_usage_error(cli, tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = cli("queue", "--snapshot", str(path))
    assert result.exit_code == 2
    assert needle in result.stderr and result.stdout == ""


def test_snapshot_and_watch_do_not_mix(cli) -> None:
    result = cli("queue", "--snapshot", str(SNAPSHOTS / "busy_box.json"), "--watch")
    assert result.exit_code == 2


def test_missing_snapshot_file(cli, tmp_path: Path) -> None:
    result = cli("queue", "--snapshot", str(tmp_path / "nope.json"))
    assert result.exit_code == 2 and "cannot read snapshot" in result.stderr


# -- the zombie-suspect hint ---------------------------------------------------------------

NOW = 1_767_000_000.0


def _session(**kw: object) -> Cluster:
    base: dict[str, object] = {"name": "bob-nb", "state": RUNNING, "launched_at": NOW - 7200}
    base.update(kw)
    return Cluster(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cluster", "use", "suspect"),
    [
        (_session(), SessionUse((1,), 20000.0, 0), True),
        (_session(), SessionUse((1,), 20000.0, 3), False),  # doing something
        (_session(), SessionUse((), 0.0, None), False),  # holds no VRAM
        (_session(launched_at=NOW - 60), SessionUse((1,), 20000.0, 0), False),  # just started
        (_session(idle_since=NOW - 60), SessionUse((1,), 20000.0, 0), False),  # SkyPilot: active
        (_session(interactive=False), SessionUse((1,), 20000.0, 0), False),
        (_session(state="Queued"), SessionUse((1,), 20000.0, 0), False),
        (_session(launched_at=None), SessionUse((1,), 20000.0, 0), False),
    ],
)
def test_zombie_suspect_predicate(cluster: Cluster, use: SessionUse, suspect: bool) -> None:
    assert is_zombie_suspect(cluster, use, NOW) is suspect


# -- property: whatever the live reader can produce survives to_dict/from_dict -------------

_opt_int = st.none() | st.integers(0, 100)
_opt_float = st.none() | st.floats(0, 1e6, allow_nan=False).map(lambda x: round(x, 1))
_text = st.none() | st.text(max_size=12)
_holders = st.none() | st.builds(
    Holder,
    kind=st.sampled_from([HOLDER_SKYPILOT, HOLDER_UNMANAGED, HOLDER_HIDDEN]),
    user=_text,
    cluster_name_on_cloud=_text,
    job=_text,
    managed_job_id=st.none() | st.integers(0, 10**6),
    command=_text,
    note=_text,
)
_gpus = st.builds(
    Gpu,
    index=st.integers(0, 15),
    name=_text,
    lost=st.booleans(),
    memory_used_mib=_opt_float,
    memory_total_mib=_opt_float,
    utilization_gpu_pct=_opt_int,
    temperature_c=_opt_int,
    power_draw_w=_opt_float,
    throttle_reasons=st.none() | st.lists(st.sampled_from(["thermal", "power", "hw_slowdown"])),
    mig_mode=st.none() | st.booleans(),
    processes=st.lists(
        st.builds(
            GpuProcess, pid=st.integers(1, 2**22), used_memory_mib=_opt_float, holder=_holders
        ),
        max_size=3,
    ),
)


@given(
    gpus=st.lists(_gpus, max_size=4),
    jobs=st.lists(
        st.builds(
            Job,
            id=st.integers(0, 10**6),
            name=_text,
            user=_text,
            submitted_at=_opt_float,
            labels=st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
        ),
        max_size=3,
    ),
    clusters=st.lists(
        st.builds(Cluster, name=st.text(min_size=1, max_size=8), autostop_min=_opt_int), max_size=3
    ),
)
def test_any_snapshot_round_trips_through_json(
    gpus: list[Gpu], jobs: list[Job], clusters: list[Cluster]
) -> None:
    snap = Snapshot(
        taken_at=NOW,
        nvml=NvmlView(available=True, gpus=gpus),
        sky=SkyView(available=True, jobs=jobs, clusters=clusters),
    )
    doc = json.loads(json.dumps(survey.document(snap)))
    assert Snapshot.from_dict(doc) == snap


def test_from_dict_rejects_a_non_object() -> None:
    with pytest.raises(SnapshotFormatError):
        Snapshot.from_dict([])  # type: ignore[arg-type]
