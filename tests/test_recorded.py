"""Recorded documents: one reader/writer for --record, --snapshot, --facts and --evidence."""

from __future__ import annotations

from pathlib import Path

import pytest

from deskgpu.errors import OutsideError, UsageError
from deskgpu.recorded import read_document, write_document


@pytest.mark.parametrize("name", ["doc.json", "doc.json.gz"])
def test_round_trip_plain_and_gzipped(tmp_path: Path, name: str) -> None:
    doc = {"schema_version": 1, "gpus": [{"index": 0, "memory_used_mib": 40211.0}], "x": None}
    path = tmp_path / name
    write_document(path, doc, "the snapshot")
    assert read_document(path, "snapshot") == doc
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"{\n")
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_unwritable_path_is_a_usage_error_unless_it_is_our_state(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "x.json"
    with pytest.raises(UsageError, match=r"x.json: no directory .*missing to write the snapshot"):
        write_document(target, {}, "the snapshot")
    with pytest.raises(OutsideError):
        write_document(target, {}, "the evidence", failure=OutsideError)


def test_unreadable_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"nope.json: cannot read the evidence"):
        read_document(tmp_path / "nope.json", "the evidence")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match=r"bad.json: not JSON"):
        read_document(bad, "snapshot")
    truncated = tmp_path / "cut.json.gz"
    truncated.write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(UsageError, match=r"cut.json.gz: not gzip"):
        read_document(truncated, "snapshot")


def test_absurdly_nested_json_is_a_usage_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UsageError, match="nested too deeply"):
        read_document(deep, "snapshot")
