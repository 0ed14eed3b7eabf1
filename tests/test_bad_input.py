"""Bad input is a located exit 2, never "internal error"; nothing a user points deskgpu at can
hang it or be overwritten. Driven through the real CLI, plus fuzzing of the same entry
functions it calls (hypothesis)."""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deskgpu.errors import DeskgpuError
from tests.conftest import HOST_CONFIG

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED = [
    ("doctor", "--facts", FIXTURES / "doctor" / "healthy-4x-a6000.json"),
    ("queue", "--snapshot", next(iter(sorted((FIXTURES / "snapshots").glob("*.json"))))),
    ("reap", "--evidence", next(iter(sorted((FIXTURES / "reap").glob("*.json"))))),
]
IDS = [r[0] for r in RECORDED]


def _config_args() -> list[str]:
    return ["--config", str(FIXTURES / "doctor" / "host-config.yaml")]


# -- special files are refused, not read ---------------------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(("command", "flag", "_"), RECORDED, ids=IDS)
def test_a_fifo_is_refused_not_waited_on(cli, fifo: Path, command: str, flag: str, _) -> None:
    result = cli(command, flag, str(fifo), *_config_args())
    assert result.exit_code == 2
    assert f"{fifo}: not a regular file" in result.stderr


@pytest.mark.parametrize(("command", "flag", "_"), RECORDED, ids=IDS)
def test_a_device_that_never_ends_is_refused(cli, command: str, flag: str, _) -> None:
    result = cli(command, flag, "/dev/zero", *_config_args())
    assert result.exit_code == 2 and "not a regular file" in result.stderr


@pytest.mark.parametrize(("command", "flag", "_"), RECORDED, ids=IDS)
def test_a_gzip_bomb_is_refused(cli, tmp_path: Path, command: str, flag: str, _) -> None:
    bomb = tmp_path / "bomb.json.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(b"[" + b"0," * (140 * 1024 * 1024) + b"0]")
    assert bomb.stat().st_size < 1024 * 1024
    result = cli(command, flag, str(bomb), *_config_args())
    assert result.exit_code == 2 and "expands to more than" in result.stderr


@pytest.mark.parametrize(("command", "flag", "_"), RECORDED, ids=IDS)
@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"a": ' * 5000 + "1" + "}" * 5000, "nested"),
        ('{"taken_at": Infinity}', "Infinity is not JSON"),
        ('{"x": NaN}', "NaN is not JSON"),
        ("\xff\xfe not utf-8", "not JSON"),
    ],
    ids=["deep", "infinity", "nan", "bytes"],
)
def test_documents_json_cannot_hold_are_refused(
    cli, tmp_path: Path, command: str, flag: str, _, text: str, says: str
) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(text.encode("latin-1"))
    result = cli(command, flag, str(path), *_config_args())
    assert result.exit_code == 2, result.stderr
    assert says in result.stderr and "internal error" not in result.stderr


# -- --record never replaces what is not a regular file ----------------------------------------


def test_record_refuses_a_fifo_a_symlink_and_a_directory(cli, tmp_path: Path, fifo: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    facts = str(FIXTURES / "doctor" / "healthy-4x-a6000.json")
    for path, says in ((fifo, "not a regular file"), (link, "a symbolic link"),
                       (tmp_path, "is a directory"), ("", "empty path")):  # fmt: skip
        result = cli("doctor", "--facts", facts, "--record", str(path), *_config_args())
        assert result.exit_code == 2, (path, result.stderr)
        assert says in result.stderr, (path, result.stderr)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and link.is_symlink()
    assert target.read_text() == "{}"


def test_record_under_a_file_or_with_a_long_name_is_a_usage_error(cli, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    facts = str(FIXTURES / "doctor" / "healthy-4x-a6000.json")
    for path in (plain / "under.json", tmp_path / ("n" * 300 + ".json")):
        result = cli("doctor", "--facts", facts, "--record", str(path), *_config_args())
        assert result.exit_code == 2 and str(path) in result.stderr, result.stderr


def test_json_out_is_strict(cli, tmp_path: Path) -> None:
    from deskgpu.recorded import to_json

    assert json.loads(to_json({"a": float("nan"), "b": [float("inf")], "c": 1.5})) == {
        "a": None,
        "b": [None],
        "c": 1.5,
    }


# -- specs and host configs: located, whatever the value ---------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('name: x\ngpus: "' + "1" * 5000 + '"\nrun: x\n', ":2:7: gpus:"),
        ("name: x\nuv: !!bool maybe\nrun: x\n", ":2:5: value cannot be read"),
        ("name: 0x" + "f" * 5000 + "\nrun: x\n", ":1:7: a number too large"),
        ("name: x\nrun: x\nenv: {A: " + "9" * 5000 + "}\n", "thousands of digits"),
        ("name: x\ninteractive: true\nidle_timeout: " + "9" * 5000 + "h\n", ":3:15: idle_timeout:"),
    ],
    ids=["digits-string", "bad-bool", "hex", "digits-int", "digits-duration"],
)
def test_a_spec_with_absurd_values_is_a_located_exit_2(
    cli, tmp_path: Path, text: str, says: str
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    result = cli("submit", str(spec), "--dry-run", "--config", str(HOST_CONFIG))
    assert result.exit_code == 2, result.stderr
    assert says in result.stderr and "internal error" not in result.stderr
    assert len(result.stderr) < 2000  # a 5,000-character value is not echoed whole


def test_a_reap_setting_reap_refuses_is_refused_by_every_command_at_its_line(
    cli, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("box_name: x\nreap:\n  max_sample_gap: 30s\n")
    for args in (
        ["reap"],
        ["doctor", "--facts", str(FIXTURES / "doctor" / "healthy-4x-a6000.json")],
        ["submit", str(Path(__file__).parents[1] / "examples" / "cpu-only.yaml"), "--dry-run"],
    ):
        result = cli(*args, "--config", str(config))
        assert result.exit_code == 2, (args, result.stderr)
        assert f"{config}:3:19: reap.max_sample_gap: shorter than a minute" in result.stderr


def test_a_file_name_with_a_newline_stays_in_the_header_comment(cli, tmp_path: Path) -> None:
    where = tmp_path / "odd\nname"
    where.mkdir()
    spec = where / "job.yaml"
    spec.write_text("name: x\ngpus: 0\nrun: echo hi\n")
    result = cli("submit", str(spec), "--dry-run", "--config", str(HOST_CONFIG))
    assert result.exit_code == 0, result.stderr
    header = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    task = yaml.safe_load("\n".join(header))
    assert set(task) >= {"name", "resources", "run"}  # nothing of the path became YAML
    assert "odd\\nname" in result.stdout


def test_names_that_look_like_rich_markup_are_shown_as_text(cli, tmp_path: Path) -> None:
    snap = json.loads((FIXTURES / "snapshots" / "busy_box.json").read_text())
    text = json.dumps(snap).replace('"user": "bob"', '"user": "[/]"')
    assert '"user": "[/]"' in text
    path = tmp_path / "snap.json"
    path.write_text(text)
    result = cli("queue", "--snapshot", str(path), *_config_args())
    assert result.exit_code == 0, result.stderr
    assert "[/]" in result.stdout
    facts = json.loads((FIXTURES / "doctor" / "healthy-4x-a6000.json").read_text())
    facts["hostname"] = "[bold red]x[/]"
    path.write_text(json.dumps(facts))
    result = cli("doctor", "--facts", str(path), *_config_args())
    assert result.exit_code == 0 and "on [bold red]x[/]" in result.stdout


# -- fuzzing the recorded documents and specs ----------------------------------------------------

_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=8), st.lists(st.integers(), max_size=2), st.just({"[/]": "[bold]"}),
    st.just("[/]"), st.just({}),
)  # fmt: skip


def _leaves(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in _leaves(v, (*path, k))] + [path]
    if isinstance(doc, list):
        return [p for i, v in enumerate(doc) for p in _leaves(v, (*path, i))] + [path]
    return [path]


def _mutate(doc: Any, picks: list[int], values: list[Any]) -> Any:
    doc = copy.deepcopy(doc)
    leaves = [p for p in _leaves(doc) if p]
    for pick, value in zip(picks, values, strict=False):
        path = leaves[pick % len(leaves)]
        node = doc
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    return doc


def _render_doctor(doc: Any, tmp: Path) -> None:
    from rich.console import Console

    from deskgpu.cli.render.doctor import render
    from deskgpu.config import load_config
    from deskgpu.doctor.report import load_facts, run_doctor

    path = tmp / "facts.json"
    path.write_text(json.dumps(doc))
    result = run_doctor(load_config(FIXTURES / "doctor" / "host-config.yaml"), load_facts(path))
    render(result, Console(file=io.StringIO(), width=80, markup=False))  # as the CLI does
    json.dumps(result.as_json(), allow_nan=False, default=str)


FIXTURE_CHECK = HealthCheck.function_scoped_fixture  # tmp_path is only a scratch directory
DOCTOR_DOC = json.loads(RECORDED[0][2].read_text())


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.integers(0, 10**6), min_size=1, max_size=4), st.lists(_JUNK, min_size=4, max_size=4)
)
def test_mutated_doctor_facts_are_judged_or_refused_never_crash(
    tmp_path: Path, picks: list[int], values: list[Any]
) -> None:
    doc = _mutate(DOCTOR_DOC, picks, values)
    try:
        _render_doctor(doc, tmp_path)
    except DeskgpuError as exc:
        assert exc.exit_status == 2 and exc.lines()


SPEC = {"name": "bert", "gpus": "A6000:1", "image": "nvcr.io/nvidia/pytorch:24.05-py3",
        "workdir": ".", "setup": "pip install x", "run": "python train.py",
        "env": {"A": "1"}, "interactive": False}  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.integers(0, 10**6), min_size=1, max_size=3), st.lists(_JUNK, min_size=3, max_size=3)
)
def test_mutated_specs_are_accepted_or_refused_with_a_location(
    tmp_path: Path, picks: list[int], values: list[Any]
) -> None:
    from deskgpu.config import load_config
    from deskgpu.spec import load_spec

    doc = _mutate(SPEC, picks, values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_spec(path, load_config(HOST_CONFIG), "alice")
    except DeskgpuError as exc:
        assert exc.exit_status == 2
        assert all(line.startswith(str(path)) for line in exc.lines()), exc.lines()


def test_the_fuzzers_reach_the_interesting_places() -> None:
    """A mutation can hit a nested reading (not only the top level)."""
    rng = random.Random(1)
    leaves = [p for p in _leaves(DOCTOR_DOC) if p]
    assert any(len(p) >= 4 for p in leaves) and len(leaves) > 200
    doc = _mutate(DOCTOR_DOC, [rng.randrange(10**6)], ["12"])
    assert doc != DOCTOR_DOC


def test_setup_render_into_a_place_it_cannot_write_is_a_usage_error(
    cli, tmp_path: Path, installed_tools: list[str]
) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    for out in ("/proc/deskgpu-test", str(plain / "sub")):
        result = cli(
            "setup", "render", "--out", out, "--config", str(HOST_CONFIG), *installed_tools
        )
        assert result.exit_code == 2, result.stderr
        assert (
            "cannot write the setup files" in result.stderr
            and "internal error" not in result.stderr
        )


SNAPSHOT_DOC = json.loads((FIXTURES / "snapshots" / "busy_box.json").read_text())


@settings(max_examples=150, deadline=None, suppress_health_check=[FIXTURE_CHECK])
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=4), st.lists(_JUNK, min_size=4))
def test_mutated_snapshots_are_shown_or_refused_never_crash(
    tmp_path: Path, picks: list[int], values: list[Any]
) -> None:
    from rich.console import Console

    from deskgpu import queue as survey
    from deskgpu.cli.render import queue as render_queue

    path = tmp_path / "snap.json"
    path.write_text(json.dumps(_mutate(SNAPSHOT_DOC, picks, values)))
    try:
        snap = survey.load(path)
    except DeskgpuError as exc:
        assert exc.exit_status == 2 and str(path) in exc.lines()[0]
        return
    json.dumps(survey.document(snap), allow_nan=False, default=str)
    console = Console(file=io.StringIO(), width=80, markup=False)  # as the CLI prints
    for part in [render_queue.gpu_half(snap), *render_queue.sky_half(snap, True)]:
        console.print(part)
