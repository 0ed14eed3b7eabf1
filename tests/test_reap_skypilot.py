"""Teardown through the real SkyPilot SDK: recorded API server responses, and a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from deskgpu.config import HostConfig
from deskgpu.errors import OutsideError
from deskgpu.reap.act import teardown
from deskgpu.reap.rule import Action, Decision

SKY = Path(__file__).parent / "fixtures" / "sky"


def zombie(name: str) -> Decision:
    return Decision(subject=name, action=Action.REAP, owner="root", kind="interactive", reasons=())


def test_down_succeeds_against_recorded_response(sky_replay) -> None:
    sky_replay.load(SKY / "down-succeeded.json")
    outcome = teardown(zombie("root-dbg"), HostConfig())
    assert outcome.ok and outcome.did == "torn-down", outcome.message
    assert [s["key"] for s in sky_replay.seen][-2:] == ["POST /down", "GET /api/get"]
    assert '"cluster_name":"root-dbg"' in sky_replay.seen[-2]["body"].replace(" ", "")


def test_down_of_a_vanished_cluster_is_a_clean_per_session_error(sky_replay) -> None:
    sky_replay.load(SKY / "down-nonexistent.json")
    outcome = teardown(zombie("root-nonexist"), HostConfig())
    assert not outcome.ok and outcome.did == "failed"
    assert outcome.message == "root-nonexist: already gone (SkyPilot has no such cluster)"


@pytest.mark.apiserver
def test_down_nonexistent_on_a_real_api_server(
    sky_api_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deskgpu.skypilot import sdk as skyapi

    monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", sky_api_server)
    with pytest.raises(OutsideError, match="root-nonexist: already gone"):
        skyapi.down_cluster("root-nonexist", HostConfig())
    outcome = teardown(zombie("root-nonexist"), HostConfig())
    assert outcome.did == "failed" and "already gone" in outcome.message
