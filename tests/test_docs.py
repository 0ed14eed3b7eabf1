"""The README and docs/ as tests: generated tables equal the code's, every command shown parses
with the real CLI, every relative link lands, and the README stays a five-minute read."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskgpu import docs
from deskgpu.doctor.scheduled import Parsed, parse_args
from tests.conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Written by the concurrent `deskgpu logs|cancel|ssh` work; linked before it lands.
PENDING: set[Path] = set()  # links to docs not written yet (none now)

FENCE = re.compile(r"^\s*(`{3,})\s*(\S*)\s*$")
PREFIXES = (("deskgpu",), ("sudo", "deskgpu"), ("uv", "run", "deskgpu"))
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|…|^[A-Z][A-Z_]+$")


def blocks(path: Path) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    """Every fenced block of a Markdown file: its info string and its numbered lines."""
    info: str | None = None
    fence = ""
    body: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        found = FENCE.match(line)
        if info is None and found:
            fence, info, body = found.group(1), found.group(2), []
        elif info is not None and found and found.group(1) == fence and not found.group(2):
            yield info, body
            info = None
        elif info is not None:
            body.append((number, line))


def prose(path: Path) -> list[str]:
    """The lines outside fenced blocks."""
    inside = {n for _, body in blocks(path) for n, _ in body}
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for n, line in enumerate(lines, 1) if n not in inside and not FENCE.match(line)]


def joined(body: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Lines with their `\\` continuations joined."""
    pending: tuple[int, str] | None = None
    for number, line in body:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
        if line.endswith("\\"):
            pending = (number, line[:-1])
            continue
        pending = None
        yield number, line


def deskgpu_words(line: str) -> list[str] | None:
    """The arguments of a `deskgpu ...` command line, up to its first pipe or redirection."""
    lexer = shlex.shlex(line.strip(), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for word in lexer:
        if set(word) <= set("|&;<>()"):
            break
        words.append(word)
    for prefix in PREFIXES:
        if tuple(words[: len(prefix)]) == prefix:
            return words[len(prefix) :]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for info, body in blocks(page):
            if info in ("usage", "json", "yaml"):
                continue
            for number, line in joined(body):
                words = deskgpu_words(line)
                if words is not None:
                    found.append((f"{page.relative_to(ROOT)}:{number}", words))
    return found


def test_the_generated_blocks_are_what_the_code_writes() -> None:
    assert docs.run(ROOT, check=True) == [], "regenerate: uv run python -m deskgpu.docs"


def test_the_generator_rewrites_a_stale_block_and_check_mode_says_so(tmp_path: Path) -> None:
    for block in docs.BLOCKS:
        target = tmp_path / block.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / block.path, target)
    doctor = tmp_path / "docs" / "doctor.md"
    fresh = doctor.read_text()
    doctor.write_text(fresh.replace("| `driver.nvml` |", "| `driver.nvml_old` |"))
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert doctor.read_text() != fresh  # --check changed nothing
    assert docs.main(["--root", str(tmp_path)]) == 0
    assert doctor.read_text() == fresh
    doctor.write_text("# no markers\n")
    assert docs.run(tmp_path, check=True) == [
        "docs/doctor.md: no markers for generated block doctor-checks",
        "docs/doctor.md: no markers for generated block doctor-settings",
    ]


def test_every_host_config_key_is_documented_with_its_default() -> None:
    setup, reap, doctor = (
        (ROOT / "docs" / name).read_text() for name in ("setup.md", "reap.md", "doctor.md")
    )
    for key in ("box_name", "api_server", "metrics_textfile_dir"):
        assert f"| `{key}` |" in setup
    assert "| `min_age` | `24h` |" in reap
    assert "| `probe_timeout_s` | `4` |" in doctor


def test_the_readme_is_a_five_minute_read() -> None:
    assert len(README.read_bytes()) <= 15_500


def test_the_readme_keeps_the_two_set_up_commands_ci_runs() -> None:
    commands = [line.split("#")[0].strip() for _, body in blocks(README) for _, line in body]
    assert "uv run deskgpu submit examples/train-single-gpu.yaml --dry-run" in commands
    assert "uv run pytest" in commands


def test_the_readme_links_the_jobs_page_from_the_researchers_part() -> None:
    text = README.read_text()
    assert text.index("docs/jobs.md") < text.index("## For the admin")


def test_docs_show_commands_of_every_kind() -> None:
    shown = {tuple(words[:1]) for _, words in documented_commands()}
    for command in ("submit", "queue", "reap", "observe", "report", "doctor", "setup"):
        assert (command,) in shown, command


@pytest.mark.parametrize(
    ("where", "words"), documented_commands(), ids=[w for w, _ in documented_commands()]
)
def test_each_documented_command_parses_with_the_real_cli(where: str, words: list[str]) -> None:
    placeholders = [w for w in words if PLACEHOLDER.search(w)]
    assert not placeholders, f"{where}: write a real value, not {placeholders}"
    parsed = parse_args(words)
    assert isinstance(parsed, Parsed), f"{where}: deskgpu {shlex.join(words)}: {parsed}"


def _options_of(path: list[str]) -> set[str]:
    import typer.main

    from deskgpu.cli import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def test_each_synopsis_names_only_options_its_command_has() -> None:
    seen = 0
    for page in PAGES:
        for info, body in blocks(page):
            if info != "usage":
                continue
            text = " ".join(line.strip() for _, line in body)
            for synopsis in re.split(r"(?=\bdeskgpu )", text):
                if not synopsis.strip():
                    continue
                words = synopsis.split()
                path = []
                for word in words[1:]:
                    if not re.fullmatch(r"[a-z]+", word):
                        break
                    path.append(word)
                known = _options_of(path)
                for option in re.findall(r"--[a-z][a-z-]*", synopsis):
                    assert option in known, f"{page.name}: deskgpu {' '.join(path)} {option}"
                seen += 1
    assert seen >= 3


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in prose(page) if re.match(r"#{1,6} ", line)}


def test_every_relative_link_and_anchor_lands() -> None:
    broken = []
    for page in PAGES:
        for line in prose(page):
            for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                dest = (page.parent / target).resolve() if target else page
                if dest in PENDING and not dest.exists():
                    continue
                if not dest.exists():
                    broken.append(f"{page.name}: {target}")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{page.name}: {target}#{anchor}")
    assert not broken


def test_formats_lists_every_field_of_the_queue_snapshot() -> None:
    from typer.testing import CliRunner

    from deskgpu.cli import app

    result = CliRunner().invoke(
        app,
        ["queue", "--snapshot", str(ROOT / "tests/fixtures/snapshots/busy_box.json"), "--json"],
    )
    assert result.exit_code == 0, result.stderr
    import json

    keys: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                keys.add(key)
                if key != "labels":
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(result.stdout))
    formats = (ROOT / "docs" / "formats.md").read_text()
    missing = sorted(k for k in keys if f"`{k}`" not in formats)
    assert not missing


def test_the_transformer_lab_page_settings_hold_together(tmp_path: Path) -> None:
    """docs/transformerlab.md: its host-config block is a valid host config, and deskgpu's
    `frontend_gives_up_after` is the wait Transformer Lab's settings there allow."""
    from deskgpu.config import load_config
    from deskgpu.units import parse_duration_s

    page = ROOT / "docs" / "transformerlab.md"
    yaml_blocks = [
        "\n".join(line.strip() for _, line in body) for info, body in blocks(page) if info == "yaml"
    ]
    assert len(yaml_blocks) == 1
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml_blocks[0] + "\n")
    config = load_config(config_file)
    assert config.trusted_frontends == ("transformerlab",)
    text = page.read_text()
    threshold = int(re.search(r"EMPTY_PROVIDER_JOBS_TERMINAL_THRESHOLD=(\d+)", text).group(1))  # type: ignore[union-attr]
    interval = int(re.search(r"REMOTE_JOB_STATUS_INTERVAL_SECONDS=(\d+)", text).group(1))  # type: ignore[union-attr]
    assert threshold > 1  # 0, -1 and 1 fail a job on its first empty poll
    waits = threshold * interval
    assert abs(config.frontend_gives_up_after_s - waits) <= 86400, (
        waits,
        config.frontend_gives_up_after,
    )
    assert config.frontend_gives_up_after_s <= waits  # never "orphan" while still watched
    json_blocks = [
        "\n".join(line for _, line in body) for info, body in blocks(page) if info == "json"
    ]
    assert json.loads(json_blocks[0])["default_env_vars"]["SKYPILOT_USER"] == "alice"
    assert parse_duration_s("17d") == config.frontend_gives_up_after_s


def test_the_units_documentation_url_lands_on_a_heading() -> None:
    """`Documentation=` of the rendered timers once named an anchor no page had."""
    from deskgpu.setup.render import SCHEDULES_DOC

    page, anchor = SCHEDULES_DOC.split("#")
    assert anchor in _anchors(ROOT / page)
