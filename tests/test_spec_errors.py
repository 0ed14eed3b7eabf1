"""Bad specs: exit 2, one located line per problem, all problems at once, never a traceback."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from deskgpu.config import load_config
from deskgpu.errors import SpecError
from deskgpu.spec import load_spec
from deskgpu.yamlio import MAX_BYTES, MAX_NODES
from tests.conftest import HOST_CONFIG

CORPUS = Path(__file__).parent / "specs" / "invalid"
CASES = sorted(CORPUS.glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: (\d+):(\d*) ?(.*)$")


def expectations(path: Path) -> list[tuple[str, list[str]]]:
    """`# expect: LINE:COL words...` header lines -> (location prefix, words that must appear)."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _EXPECT.match(line)
        if match:
            line_no, col, words = match.groups()
            out.append((f"{path}:{line_no}:{col}", words.split()))
    return out


def test_corpus_is_not_empty() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_invalid_spec_is_rejected_with_location_and_field(path: Path, cli) -> None:
    result = cli("submit", str(path), "--dry-run", "--config", str(HOST_CONFIG))
    assert result.exit_code == 2, result.stdout
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    expected = expectations(path)
    assert expected, f"{path.name} has no `# expect:` header"
    assert len(lines) == len(expected), result.stderr
    for line, (where, words) in zip(lines, expected, strict=True):
        assert line.startswith(where), f"{line!r} should start with {where!r}"
        for word in words:
            assert word in line, f"{word!r} missing from {line!r}"


def _reject(tmp_path: Path, content: bytes, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        load_spec(path, load_config(HOST_CONFIG), "alice")
    (line,) = info.value.lines()
    assert line.startswith(str(path))
    return line


def test_non_utf8_bytes_are_located(tmp_path: Path) -> None:
    line = _reject(tmp_path, b"name: caf\xe9\nrun: x\n")
    assert line.startswith(f"{tmp_path / 'job.yaml'}:1:10:")
    assert "0xe9" in line and "UTF-8" in line


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        bomb.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    content = ("\n".join(bomb) + "\nname: bomb\nrun: x\n").encode()
    line = _reject(tmp_path, content)
    assert f"more than {MAX_NODES} values" in line


def test_multi_megabyte_file_is_refused_without_parsing(tmp_path: Path) -> None:
    content = b"name: big\nrun: |\n" + b"  echo padding padding padding\n" * 200_000
    assert len(content) > MAX_BYTES
    line = _reject(tmp_path, content)
    assert "MB" in line and "right file" in line


def test_empty_file(tmp_path: Path) -> None:
    assert "file is empty" in _reject(tmp_path, b"")


def test_missing_file_and_directory(tmp_path: Path, cli) -> None:
    missing = cli("submit", str(tmp_path / "nope.yaml"), "--dry-run")
    assert missing.exit_code == 2
    assert missing.stderr.strip() == f"{tmp_path / 'nope.yaml'}: no such file (check the path)"
    folder = cli("submit", str(tmp_path), "--dry-run")
    assert folder.exit_code == 2
    assert "is a directory" in folder.stderr


def test_name_too_long_once_user_prefix_is_added(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: a-fairly-long-experiment-name-here\nrun: x\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, load_config(HOST_CONFIG), "averyverylongusername")
    (line,) = info.value.lines()
    assert line.startswith(f"{path}:1:7: name:")
    assert "shorten the name to at most" in line


def test_bare_gpu_count_needs_a_model_without_inventory(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: any\ngpus: 2\nrun: x\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, load_config(None, environ={}), "alice")
    (line,) = info.value.lines()
    assert line.startswith(f"{path}:2:7: gpus: a bare count needs the box's GPU inventory")
    assert "set `gpus:` in /etc/deskgpu/config.yaml" in line  # the host config key to set


def test_bare_gpu_count_takes_the_gpus_nvml_sees_when_the_config_lists_none(
    tmp_path: Path,
) -> None:
    """Replayed from a recorded 4x A6000 snapshot through the live path's NvmlView."""
    import json

    from deskgpu import submission
    from deskgpu.snapshot import Snapshot

    recorded = Path(__file__).parent / "fixtures" / "snapshots" / "busy_box.json"
    view = Snapshot.from_dict(json.loads(recorded.read_text())).nvml
    path = tmp_path / "job.yaml"
    path.write_text("name: any\ngpus: 2\nrun: x\n")
    p = submission.plan(path, load_config(None, environ={}), "alice", nvml_reader=lambda: view)
    assert p.expansion.task["resources"]["accelerators"] == "A6000:2"
    assert p.expansion.notes[0].startswith("the host config (built-in defaults) lists no GPUs")
    assert "{A6000: 4}" in p.expansion.notes[0]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "name: x\nenviroment: {A: '1'}\nrun: x\n",
            ":2:1: enviroment: unknown field `enviroment` (did you mean `env`?)",
        ),
        ("name: x\ngpus: 'RTX A6000:1'\nrun: x\n", "(did you mean `gpus: A6000:1`?)"),
        ("name: x\ninfra: k9s\nrun: x\n", ":2:8: infra: unknown infra `k9s` (did you mean `k8s`?)"),
        ("box_name: lab\ndata_root: /data\ngpus: {A6000: 4}\n", "this looks like a host config"),
    ],
    ids=["typo", "queue-name", "infra", "host-config"],
)
def test_spec_errors_that_guess_right(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path, load_config(HOST_CONFIG), "alice")
    assert any(says in line for line in info.value.lines()), info.value.lines()


def test_known_infra_names_are_skypilots() -> None:
    from deskgpu.config import KNOWN_INFRA

    registry = pytest.importorskip("sky.utils.registry")
    names = set(registry.CLOUD_REGISTRY) | set(registry.CLOUD_REGISTRY._aliases)
    assert set(KNOWN_INFRA) == names


def test_workdir_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: wd\nworkdir: missing\nrun: x\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, load_config(HOST_CONFIG), "alice")
    assert info.value.lines()[0].startswith(f"{path}:2:10: workdir:")


def test_the_spec_file_is_never_modified(cli) -> None:
    path = CASES[0]
    before = path.read_bytes()
    cli("submit", str(path), "--dry-run")
    assert path.read_bytes() == before


def test_house_rule_violation_points_at_the_spec_field(tmp_path: Path, cli) -> None:
    config = tmp_path / "config.yaml"
    config.write_text('gpus: {A6000: 4}\nimages: {deny: ["*:latest"]}\n')
    spec = tmp_path / "job.yaml"
    spec.write_text("name: t\ngpus: A6000:1\nimage: pytorch/pytorch:latest\nrun: x\n")
    result = cli("submit", str(spec), "--dry-run", "--config", str(config))
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"{spec}:3:8: image: house rule image_denied:")
    assert "(use another image)" in line


def test_nesting_deeper_than_the_yaml_parser_can_go(tmp_path: Path) -> None:
    line = _reject(tmp_path, b"name: x\nrun: " + b"[" * 5000 + b"\n")
    assert "nested too deeply" in line


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_special_files_are_refused_without_reading(tmp_path: Path, special: str, cli) -> None:
    path = Path(special)
    if special == "fifo":
        path = tmp_path / "job.yaml"
        os.mkfifo(path)  # opening it to read would block forever
    result = cli("submit", str(path), "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{path}: not a regular file (pass the YAML file itself)"


def test_workdir_symlink_loop_is_located(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    line = _reject(tmp_path, b"name: w\nworkdir: loop\nrun: x\n")
    assert line.startswith(f"{tmp_path / 'job.yaml'}:2:10: workdir: cannot use 'loop'")


def test_uv_needs_a_workdir_with_a_pyproject(tmp_path: Path) -> None:
    line = _reject(tmp_path, b"name: u\nuv: true\nrun: x\n")
    assert line.startswith(f"{tmp_path / 'job.yaml'}:2:5: uv:") and "add `workdir: .`" in line
    (tmp_path / "proj").mkdir()
    line = _reject(tmp_path, b"name: u\nuv: true\nworkdir: proj\nrun: x\n")
    assert "needs a pyproject.toml" in line and "uv init" in line


def test_name_that_already_carries_the_user_prefix(tmp_path: Path) -> None:
    """Otherwise `exp` and `alice-exp` would share a checkpoint directory."""
    path = tmp_path / "job.yaml"
    path.write_text("name: alice-exp\nrun: x\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, load_config(HOST_CONFIG), "alice")
    (line,) = info.value.lines()
    assert line.startswith(f"{path}:1:7: name: already starts with your user prefix `alice-`")
    assert "(write `name: exp`)" in line


def test_wait_must_be_a_finite_number(cli) -> None:
    result = cli("submit", str(CASES[0]), "--wait", "nan")
    assert result.exit_code == 2 and "--wait" in result.stderr
