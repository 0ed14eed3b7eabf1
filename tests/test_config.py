"""The host config: where it comes from, its defaults, and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from deskgpu.config import HostConfig, config_path, load_config
from deskgpu.errors import SpecError
from tests.conftest import EXAMPLES, HOST_CONFIG


def test_built_in_defaults_match_the_design() -> None:
    config = HostConfig()
    assert (config.data_root, config.checkpoint_root, config.infra) == (
        "/data",
        "/checkpoints",
        "k8s",
    )
    assert config.idle_timeout_s == 2 * 3600 and config.max_idle_timeout_s == 3 * 86400


def test_explicit_path_beats_env_beats_system(tmp_path: Path) -> None:
    env_file = tmp_path / "env.yaml"
    assert config_path(None, {"DESKGPU_CONFIG": str(env_file)}) == env_file
    assert config_path(HOST_CONFIG, {"DESKGPU_CONFIG": str(env_file)}) == HOST_CONFIG


def test_example_host_config_loads() -> None:
    config = load_config(HOST_CONFIG)
    assert config.gpus == {"A6000": 4} and config.gpu_count == 4
    assert config.api_server == "http://127.0.0.1:46580"
    assert config.source == str(HOST_CONFIG)


def test_env_var_config_is_used_by_the_cli(tmp_path: Path, cli) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("gpus: {H100: 8}\ndata_root: /srv/data\n")
    spec = tmp_path / "job.yaml"
    spec.write_text("name: big\ngpus: 8\nrun: x\n")
    result = cli("submit", str(spec), "--dry-run", env={"DESKGPU_CONFIG": str(path)})
    assert result.exit_code == 0, result.stderr
    assert "accelerators: H100:8" in result.stdout and "path: /srv/data" in result.stdout


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("gpus: {A6000: 0}\n", ":1:15:", ["gpus.A6000", "below the minimum"]),
        ("infra: aws\n", ":1:8:", ["infra", "k8s"]),
        ("data_root: data\n", ":1:12:", ["data_root", "absolute"]),
        ("gpu: {A6000: 4}\n", ":1:1:", ["unknown field `gpu`", "did you mean `gpus`"]),
        ("idle_timeout: 4d\n", ":1:15:", ["idle_timeout", "longer than max_idle_timeout"]),
        ("api_server: 127.0.0.1:46580\n", ":1:13:", ["api_server", "http://"]),
    ],
)
def test_bad_host_config_is_located(
    tmp_path: Path, text: str, where: str, words: list[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_config(path)
    (line,) = info.value.lines()
    assert line.startswith(f"{path}{where}"), line
    for word in words:
        assert word in line


def test_bad_host_config_is_exit_2_for_every_command_that_reads_it(tmp_path: Path, cli) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("gpus: four\n")
    result = cli("submit", str(EXAMPLES / "cpu-only.yaml"), "--dry-run", "--config", str(path))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{path}:1:7: gpus:")


def test_overlapping_roots_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("data_root: /srv\ncheckpoint_root: /srv/ckpt\n")
    with pytest.raises(SpecError) as info:
        load_config(path)
    (line,) = info.value.lines()
    assert line.startswith(f"{path}:2:18: checkpoint_root:") and "overlap" in line


def test_api_server_needs_a_host(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text('api_server: "http://"\n')
    with pytest.raises(SpecError):
        load_config(path)
