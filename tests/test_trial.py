"""`deskgpu setup trial`: the written server.sh starts a real API server with the house rules,
env.sh points the real CLI at it, and a job goes through the rules into SkyPilot.

The server is the one server.sh execs (its own session, killed with its whole group on every
path: tests/apiserver.stop_group). The suite holds 46580 (conftest): had the jobs controller
fallen into the second-server trap, it would have tried that port and failed the session.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskgpu.config import load_config
from deskgpu.setup.render import server_config_path, server_plugins_path
from deskgpu.setup.trial import TRIAL_PORT, server_environment, trial_config
from tests import apiserver

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "host-config.yaml"


def _deskgpu(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deskgpu", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _sourced(env_sh: Path, base: dict[str, str]) -> dict[str, str]:
    """The environment after `. env.sh` in a shell started with `base`."""
    out = subprocess.run(
        ["sh", "-c", f". {shlex.quote(str(env_sh))} && env -0"],
        capture_output=True,
        env=base,
        check=True,
        timeout=10,
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    out = tmp_path_factory.mktemp("trial")
    port = apiserver.free_port()
    written = _deskgpu(
        "setup", "trial", "--out", str(out), "--port", str(port), "--config", str(EXAMPLE)
    )
    assert written.returncode == 0, written.stderr
    home = out / "home"
    log_path = out / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(out / "server.sh")],
            env={"PATH": os.environ["PATH"]},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=apiserver._die_with_parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        apiserver._wait_healthy(proc, url, log_path, 240)
        yield out, url
    finally:
        apiserver.stop_group(proc.pid, home, proc)


def test_the_trial_is_the_boxs_server_config_in_a_home_of_its_own(tmp_path: Path) -> None:
    config = load_config(EXAMPLE)
    trial = trial_config(config, tmp_path, 46999, user="alice")
    assert server_config_path(trial) == str(tmp_path / "home/.sky/config.yaml")
    assert server_plugins_path(trial) == str(tmp_path / "home/.sky/plugins.yaml")
    assert trial.gpus == config.gpus and trial.images_allow == config.images_allow
    env = server_environment(trial, tmp_path)
    # The one variable that keeps the jobs controller off a second server in the same HOME.
    assert env["SKYPILOT_API_SERVER_LOCAL_PORT"] == "46999"
    assert env["HOME"] == str(tmp_path / "home")


def test_the_trial_refuses_the_boxs_port(tmp_path: Path) -> None:
    done = _deskgpu("setup", "trial", "--out", str(tmp_path), "--port", "46580")
    assert done.returncode == 2
    assert "46580 is the box's shared API server's" in done.stderr
    assert not any(tmp_path.iterdir())


def test_the_cli_default_port_is_the_trials(cli) -> None:
    result = cli("setup", "trial", "--help")
    assert f"default: {TRIAL_PORT}" in " ".join(result.output.split())


def test_a_job_goes_through_the_house_rules_into_skypilot(trial, tmp_path: Path) -> None:
    out, url = trial
    env = _sourced(out / "env.sh", {"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert env["SKYPILOT_API_SERVER_ENDPOINT"] == url
    spec = tmp_path / "job.yaml"
    # Broken house rule: deskgpu refuses it from the trial's host config...
    spec.write_text("name: big\ngpus: A6000:99\nrun: nvidia-smi\n")
    refused = _deskgpu("submit", str(spec), env=env, timeout=240)
    assert refused.returncode == 2, refused.stderr
    assert "asks for 99 GPUs but this box has 4x A6000" in refused.stderr
    # ...and so does the trial server's policy, asked by the stock CLI.
    sky = Path(sys.executable).parent / "sky"
    stock = subprocess.run(
        [str(sky), "launch", "-y", "-c", "dev", "--gpus", "A6000:99", "echo", "hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert stock.returncode != 0
    assert "99" in stock.stdout + stock.stderr and "4x A6000" in stock.stdout + stock.stderr
    # Within the rules: past the policy, SkyPilot's own prechecks answer (no Kubernetes here).
    spec.write_text("name: hello\ngpus: 0\nrun: echo hi\n")
    done = _deskgpu("submit", str(spec), env=env, timeout=240)
    # Exit 1 when SkyPilot's prechecks answered within submit's watch, else queued (exit 0);
    # either way the job ends FAILED_PRECHECKS for want of infrastructure, not a rule.
    assert done.returncode in (0, 1), done.stdout + done.stderr
    if done.returncode == 1:
        assert "no infrastructure enabled" in done.stderr and url in done.stderr, done.stderr
    deadline = time.monotonic() + 180
    while True:
        queue = _deskgpu("queue", "--json", "--all", env=env, timeout=120)
        assert queue.returncode == 0, queue.stderr
        if "FAILED_PRECHECKS" in queue.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert "hello" in queue.stdout and "FAILED_PRECHECKS" in queue.stdout, queue.stdout
