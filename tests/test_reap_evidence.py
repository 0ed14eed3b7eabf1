"""Malformed evidence documents: one clean line and exit 2, never an internal error, and
never a value that silently looks idle (NaN compares false with every threshold)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deskgpu.config.reap import ReapSettings
from deskgpu.reap.evidence import Evidence, EvidenceError
from deskgpu.reap.rule import decide

NOW = 1732600800


def session(**extra: Any) -> dict[str, Any]:
    return {
        "cluster": "a",
        "owner": "b",
        "kind": "interactive",
        "gpus": [2],
        "gpu_samples": [[NOW, 2, 0, 4]],
        "activity_samples": [[NOW, 0, 1]],
        **extra,
    }


def doc(**extra: Any) -> dict[str, Any]:
    return {"schema_version": 1, "collected_at": NOW, **extra}


BAD = {
    "collected_at_1e400": '{"schema_version":1,"collected_at":1e400}',
    "collected_at_nan": '{"schema_version":1,"collected_at":NaN}',
    "collected_at_bad_iso": '{"schema_version":1,"collected_at":"2024-13-45"}',
    "collected_at_year_0": '{"schema_version":1,"collected_at":"0001-01-01T00:00:00+05:00"}',
    "notes_is_a_number": json.dumps(doc(notes=5)),
    "created_at_1e20": json.dumps(doc(sessions=[session(created_at=1e20)])),
    "sample_ts_1e300": json.dumps(doc(sessions=[session(gpu_samples=[[1e300, 2, 3, 4]])])),
    "ssh_count_infinity": json.dumps(doc(sessions=[session(activity_samples=[[NOW, 1e400, 1]])])),
    "util_nan": json.dumps(doc(sessions=[session(gpu_samples=[[NOW, 2, float("nan"), 4]])])),
    "util_negative": json.dumps(doc(sessions=[session(gpu_samples=[[NOW, 2, -50, 4]])])),
    "cpu_negative": json.dumps(doc(sessions=[session(activity_samples=[[NOW, 0, -1]])])),
    "gpu_index_negative": json.dumps(doc(sessions=[session(gpu_samples=[[NOW, -1, 0, 4]])])),
    "pod_present_text": json.dumps(doc(sessions=[session(pod_present="false")])),
    "vram_text": json.dumps(doc(unmanaged=[{"pid": 1, "gpu": 0, "vram_mib": "x"}])),
    "pid_huge_float": json.dumps(doc(unmanaged=[{"pid": 1e300, "gpu": 0}])),
    "history_since_list": json.dumps(doc(history_since=[1])),
    "allocated_gpus_text": json.dumps(doc(sessions=[session(allocated_gpus="2,3")])),
    "allocation_source_unknown": json.dumps(doc(sessions=[session(allocation_source="nvml")])),
    "truncated": '{"schema_version":1',
    "top_level_list": "[]",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_evidence_is_one_line_and_exit_2(name: str, tmp_path: Path, cli) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(BAD[name])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    result = cli("reap", "--evidence", str(path), "--config", str(cfg))
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and str(path) in result.stderr
    assert not (tmp_path / "state").exists()


def test_gzip_that_is_not_gzip_is_exit_2(tmp_path: Path, cli) -> None:
    path = tmp_path / "x.json.gz"
    path.write_bytes(b"\x1f\x8b" + b"not gzip at all")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    result = cli("reap", "--evidence", str(path), "--config", str(cfg))
    assert result.exit_code == 2 and "Traceback" not in result.stderr


def test_a_good_gzipped_document_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok.json.gz"
    path.write_bytes(gzip.compress(json.dumps(doc(sessions=[session()])).encode()))
    from deskgpu.state.audit import read_evidence

    assert read_evidence(path).sessions[0].cluster == "a"


# ---- property: any JSON-ish document -----------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["2024-11-26T03:00:00Z", "interactive", "batch", "Z", "graphics"]),
)
json_ish = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
numberish = st.one_of(
    st.none(),
    st.integers(min_value=-5, max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(NOW),
    st.text(max_size=4),
)
row = st.lists(numberish, min_size=0, max_size=5)
session_docs = st.fixed_dictionaries(
    {
        "cluster": st.just("a"),
        "owner": st.just("b"),
        "kind": st.sampled_from(["interactive", "batch", "x"]),
    },
    optional={
        "created_at": numberish,
        "warned_at": numberish,
        "last_activity_at": numberish,
        "vram_mib": numberish,
        "jobs_running": numberish,
        "jobs_pending": numberish,
        "ssh_attached": json_ish,
        "pod_present": json_ish,
        "labels": json_ish,
        "gpus": st.one_of(json_ish, st.lists(numberish, max_size=3)),
        "gpu_samples": st.one_of(json_ish, st.lists(row, max_size=4)),
        "activity_samples": st.one_of(json_ish, st.lists(row, max_size=4)),
    },
)
unmanaged_docs = st.fixed_dictionaries(
    {"pid": numberish, "gpu": numberish},
    optional={
        "vram_mib": numberish,
        "util_pct": numberish,
        "command": json_ish,
        "user": json_ish,
        "process_type": json_ish,
        "uid": numberish,
        "start_time": numberish,
        "kernel_thread": json_ish,
    },
)
documents = st.one_of(
    json_ish,
    st.fixed_dictionaries(
        {"schema_version": st.just(1), "collected_at": numberish},
        optional={
            "sessions": st.one_of(json_ish, st.lists(session_docs, max_size=3)),
            "unmanaged": st.one_of(json_ish, st.lists(unmanaged_docs, max_size=3)),
            "notes": json_ish,
            "history_since": numberish,
            "host": json_ish,
        },
    ),
)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_any_document_is_read_or_refused_cleanly(document: Any) -> None:
    try:
        evidence = Evidence.from_dict(document)
    except EvidenceError:
        return
    # what was accepted is decidable and renders back into a valid document
    for d in decide(evidence, ReapSettings()):
        json.dumps(d.to_dict(), allow_nan=False)
    again = json.loads(json.dumps(evidence.to_dict(), allow_nan=False))
    assert Evidence.from_dict(again).sessions == evidence.sessions
