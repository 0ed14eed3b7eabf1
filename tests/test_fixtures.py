"""Every fixture says where it came from: recorded live where, or built by hand from what."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
JSON = sorted(FIXTURES.rglob("*.json"))
YAML = sorted(FIXTURES.rglob("*.yaml"))


def test_there_are_fixtures_to_check() -> None:
    assert len(JSON) > 40 and YAML


@pytest.mark.parametrize("path", JSON, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_json_fixture_states_its_provenance(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert isinstance(doc, dict), "wrap a list in {'_provenance': ..., 'records': [...]}"
    # tests/skyreplay.py recordings carry `recorded_from` and a `note` on what was edited.
    note = doc.get("_provenance") or (doc.get("recorded_from") and doc.get("note"))
    assert isinstance(note, str) and len(note) > 40, "add a `_provenance` note"
    assert any(word in note.lower() for word in ("record", "by hand", "generated"))


@pytest.mark.parametrize("path", YAML, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_yaml_fixture_starts_with_its_provenance(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("by hand" in first or "recorded" in first)
