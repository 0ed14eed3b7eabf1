"""Docs are tests: every example spec loads, expands and passes SkyPilot's own validator."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deskgpu import submission
from deskgpu.config import load_config
from deskgpu.expand import CHECKPOINT_VOLUME, DATA_VOLUME, LABEL_USER
from deskgpu.skypilot import sdk as skyapi
from tests.conftest import EXAMPLES, HOST_CONFIG

SPECS = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "host-config.yaml")


def test_the_corpus_has_every_kind_of_example() -> None:
    names = {p.stem for p in SPECS}
    assert {
        "train-single-gpu",
        "train-multi-gpu",
        "uv-job",
        "interactive",
        "cpu-only",
        "cloud-parity",
    } <= names


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_example_passes_skypilot_validator(spec_path: Path) -> None:
    config = load_config(HOST_CONFIG)
    plan = submission.plan(spec_path, config, "alice")
    task = skyapi.validate_task(plan.expansion.task)
    assert task.name == f"alice-{plan.spec.name}"
    (resources,) = list(task.resources)
    assert resources.labels[LABEL_USER] == "alice"
    if plan.spec.gpus.count:
        assert sum(resources.accelerators.values()) == plan.spec.gpus.count
    else:
        assert resources.accelerators is None


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_printed_dry_run_yaml_is_a_valid_skypilot_task(spec_path: Path, cli) -> None:
    """What a researcher sees is exactly what SkyPilot accepts (secrets redacted)."""
    result = cli("submit", str(spec_path), "--dry-run", "--config", str(HOST_CONFIG))
    assert result.exit_code == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    skyapi.validate_task(printed)
    assert "hf_example_not_a_real_token" not in result.stdout


def test_on_box_examples_mount_data_read_only_and_checkpoints_read_write() -> None:
    config = load_config(HOST_CONFIG)
    for spec_path in SPECS:
        plan = submission.plan(spec_path, config, "alice")
        task = plan.expansion.task
        if plan.spec.infra:
            assert "config" not in task, spec_path
            continue
        pod = task["config"]["kubernetes"]["pod_config"]["spec"]
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts[DATA_VOLUME] == {"name": DATA_VOLUME, "mountPath": "/data", "readOnly": True}
        assert mounts[CHECKPOINT_VOLUME]["mountPath"] == "/checkpoints/alice"
        assert mounts[CHECKPOINT_VOLUME]["subPath"] == "alice"
        assert "readOnly" not in mounts[CHECKPOINT_VOLUME]
        volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
        assert volumes == {DATA_VOLUME: "/data", CHECKPOINT_VOLUME: "/checkpoints"}
        assert task["config"]["kubernetes"]["provision_timeout"] == -1


def test_cloud_parity_example_drops_host_mounts_and_says_what_replaces_them(cli) -> None:
    result = cli(
        "submit", str(EXAMPLES / "cloud-parity.yaml"), "--dry-run", "--config", str(HOST_CONFIG)
    )
    assert result.exit_code == 0
    assert "hostPath" not in result.stdout
    assert "infra: aws" in result.stdout
    assert "file_mounts" in result.stderr and "bucket" in result.stderr
