"""A single-box host config renders exactly what it rendered before `nodes:` existed.

`tests/fixtures/setup/single-box.json` holds every file `setup render` wrote for
`examples/host-config.yaml` and for the built-in defaults (text, mode, owner, destination,
purpose) and the notes it gave, recorded from the renderer before multi-node support
(issue 28). A config without `nodes:` must keep rendering those bytes. Regenerate only for a
deliberate change of the single box's files: `uv run python -m tests.test_setup_single_box`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from deskgpu.config import HostConfig, load_config
from deskgpu.setup.render import Tools, render
from tests.conftest import HOST_CONFIG, ROOT

GOLDEN = ROOT / "tests/fixtures/setup/single-box.json"
TOOLS = Tools("/opt/deskgpu/bin/python", "/opt/deskgpu/bin/deskgpu")


def _configs() -> dict[str, tuple[HostConfig, str | None]]:
    example = dataclasses.replace(load_config(HOST_CONFIG), source="examples/host-config.yaml")
    return {
        "examples/host-config.yaml": (example, HOST_CONFIG.read_text()),
        "built-in defaults": (HostConfig(), None),
    }


def rendered() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (config, text) in _configs().items():
        result = render(config, TOOLS, text)
        out[name] = {
            "notes": result.notes,
            "files": [{**f.as_json(), "text": f.text} for f in result.files],  # install order
        }
    return out


@pytest.mark.parametrize("name", sorted(_configs()))
def test_a_single_box_renders_what_it_always_rendered(name: str) -> None:
    golden = json.loads(GOLDEN.read_text())[name]
    now = rendered()[name]
    assert [f["path"] for f in now["files"]] == [f["path"] for f in golden["files"]]
    for have, want in zip(now["files"], golden["files"], strict=True):
        assert have == want, want["path"]
    assert now["notes"] == golden["notes"]


if __name__ == "__main__":
    provenance = json.loads(GOLDEN.read_text())["_provenance"]
    GOLDEN.write_text(
        json.dumps({"_provenance": provenance, **rendered()}, indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote {GOLDEN.relative_to(ROOT)}")
