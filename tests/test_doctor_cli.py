"""`deskgpu doctor` through the real CLI: live on this machine, and on recorded facts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
BOX_CONFIG = str(FIXTURES / "host-config.yaml")
HAS_GPU = Path("/dev/nvidiactl").exists()


def box_facts(name: str, tmp_path: Path) -> str:
    """A recorded box whose server enforces BOX_CONFIG: its guard's answer names the file this
    doctor run reads (recorded, it names /etc/deskgpu/config.yaml, where the box has it)."""
    doc = json.loads((FIXTURES / name).read_text())
    guard = doc["sky"].get("guard")
    if guard and guard.get("body"):
        body = json.loads(guard["body"])
        body["host_config"] = BOX_CONFIG
        guard["body"] = json.dumps(body)
    out = tmp_path / name
    out.write_text(json.dumps(doc))
    return str(out)


@pytest.mark.skipif(HAS_GPU, reason="this test describes a machine without GPUs")
def test_doctor_on_this_machine_runs_to_completion_and_reports_failures(
    cli, tmp_path: Path
) -> None:
    """No GPU and none of the host tools (docker, nvidia-ctk, kubectl: an empty PATH, so what
    this machine has installed does not matter): failures with fixes, exit 3."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = cli("doctor", "--json", env={"PATH": str(empty)})
    assert result.exit_code == 3, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["kind"], doc["version"], doc["exit_status"]) == ("deskgpu.doctor/report", 1, 3)
    checks = {c["id"]: c for c in doc["checks"]}
    assert checks["driver.nvml"]["status"] == "fail"
    assert checks["kubernetes.context"]["status"] == "fail"
    assert (
        checks["docker.daemon"]["status"] in ("fail", "skip")
        or checks["docker.cli"]["status"] == "fail"
    )
    assert checks["docker.toolkit"]["status"] == "fail"
    for check in doc["checks"]:
        assert check["status"] in ("ok", "warn", "fail", "skip")
        if check["status"] == "fail":
            assert check["fix"], check["id"]
    assert sum(doc["summary"].values()) == len(doc["checks"])


def test_doctor_table_is_grouped_with_a_summary(cli, tmp_path: Path) -> None:
    result = cli(
        "doctor", "--facts", box_facts("thermal-throttling.json", tmp_path), "--config", BOX_CONFIG
    )
    assert result.exit_code == 3
    for title in (
        "NVIDIA driver",
        "Docker + NVIDIA Container Toolkit",
        "k3s / Kubernetes",
        "SkyPilot",
        "Golden rule",
        "Storage",
        "Operations",
    ):
        assert title in result.stdout
    assert "thermal slowdown in 3/3 samples" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    # The skips: skypilot.kueue (no queue), kubernetes.gpu_pod (no --gpu-pod) and the three
    # telemetry checks (no `telemetry:`).
    assert last.startswith("FAIL: 33 ok, 0 warn, 1 fail, 5 skip on deskbox")
    assert result.stderr == ""


def test_healthy_recorded_box_exits_0(cli, tmp_path: Path) -> None:
    result = cli(
        "doctor",
        "--json",
        "--facts",
        box_facts("healthy-4x-a6000.json", tmp_path),
        "--config",
        BOX_CONFIG,
    )
    assert result.exit_code == 0, result.stdout
    doc = json.loads(result.stdout)
    # The skips: kueue, gpu_pod and the three telemetry checks (no `telemetry:`).
    assert doc["summary"] == {"ok": 34, "warn": 0, "fail": 0, "skip": 5}
    assert doc["source"].startswith("recorded ")


def test_warnings_alone_exit_0(cli, tmp_path: Path) -> None:
    result = cli(
        "doctor",
        "--json",
        "--facts",
        box_facts("system-pip-torch.json", tmp_path),
        "--config",
        BOX_CONFIG,
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout)["summary"]["warn"] == 1


def test_record_then_replay_gives_the_same_verdicts(cli, tmp_path: Path) -> None:
    recorded = tmp_path / "facts.json"
    live = cli("doctor", "--json", "--record", str(recorded), "--timeout", "3")
    replay = cli("doctor", "--json", "--facts", str(recorded))
    assert live.exit_code == replay.exit_code
    statuses = [(c["id"], c["status"], c["detail"]) for c in json.loads(live.stdout)["checks"]]
    again = [(c["id"], c["status"], c["detail"]) for c in json.loads(replay.stdout)["checks"]]
    assert statuses == again


def test_unreadable_facts_file_is_one_clean_line(cli, tmp_path: Path) -> None:
    bad = tmp_path / "facts.json"
    bad.write_text('{"facts_version": 7}')
    result = cli("doctor", "--facts", str(bad))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"{bad}: recorded facts have facts_version 7; this deskgpu reads 1"
    )
    assert result.stdout == ""


def test_record_to_an_unwritable_place_is_a_usage_error(cli, tmp_path: Path) -> None:
    result = cli(
        "doctor",
        "--facts",
        str(FIXTURES / "healthy-4x-a6000.json"),
        "--config",
        BOX_CONFIG,
        "--record",
        str(tmp_path / "no" / "such" / "dir.json"),
    )
    assert result.exit_code == 2
    assert "to write the facts in" in result.stderr


def test_invalid_doctor_section_is_a_usage_error(cli, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("doctor:\n  min_free_pc: 5\n")
    result = cli("doctor", "--config", str(config))
    assert result.exit_code == 2
    assert "did you mean `min_free_pct`" in result.stderr


def test_example_host_config_is_accepted(cli, hermetic) -> None:
    example = Path(__file__).parent.parent / "examples" / "host-config.yaml"
    result = cli(
        "doctor",
        "--json",
        "--facts",
        str(FIXTURES / "healthy-4x-a6000.json"),
        "--config",
        str(example),
    )
    assert result.exit_code in (0, 3), result.stderr
    assert os.environ.get("DESKGPU_CONFIG") == str(hermetic.host_config)  # --config leaks nowhere


def test_replay_of_facts_recorded_on_the_dev_vm(cli) -> None:
    """Recorded live on the no-GPU dev VM (`deskgpu doctor --record`): CUDA 13.0 toolkit drift."""
    result = cli("doctor", "--json", "--facts", str(FIXTURES / "dev-vm-no-gpu.json"))
    assert result.exit_code == 3
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["driver.nvml"]["detail"].startswith("NVML does not load: no NVIDIA driver")
    assert checks["docker.daemon"]["detail"].startswith("Cannot connect to the Docker daemon")
    assert checks["kubernetes.context"]["detail"] == (
        "no usable kube context: error: current-context is not set"
    )
    assert checks["golden_rule.cuda_toolkit"]["status"] == "warn"
    assert (
        "CUDA 13.0 at /usr/local/cuda-13.0 (nvcc)" in checks["golden_rule.cuda_toolkit"]["detail"]
    )
    assert (
        "other API servers on this host: root pid 2689 port 46999"
        in (checks["skypilot.shared_server"]["detail"])
    )


def test_each_fix_is_one_whole_line_at_80_columns(cli) -> None:
    """Commands and URLs can be copied: a fix is never wrapped inside the table."""
    args = ["--facts", str(FIXTURES / "k3s-node-without-gpus.json"),
            "--config", str(FIXTURES / "host-config.yaml")]  # fmt: skip
    table = cli("doctor", *args, env={"COLUMNS": "80"})
    fixes = [
        c["fix"] for c in json.loads(cli("doctor", *args, "--json").stdout)["checks"] if c["fix"]
    ]
    assert len(fixes) >= 3
    lines = table.stdout.splitlines()
    for fix in fixes:
        assert any(line.endswith(fix) for line in lines), fix
