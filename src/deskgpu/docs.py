"""The generated parts of the docs, produced from the code that knows them.

`python -m deskgpu.docs` rewrites every generated block in place, between its marker comments;
`python -m deskgpu.docs --check` changes nothing and exits 1 when a committed block differs from
what the code would write (a test runs it). Run both from a checkout (`--root` names another).

    <!-- generated: NAME (from SOURCE): uv run python -m deskgpu.docs -->
    ...
    <!-- end generated: NAME -->
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deskgpu.config import HostConfig
from deskgpu.config.doctor import DoctorSettings
from deskgpu.config.reap import KEYS
from deskgpu.doctor.registry import readme_table
from deskgpu.house_rules.podspec import readme_section
from deskgpu.validate import load_schema

REGENERATE = "uv run python -m deskgpu.docs"


@dataclass(frozen=True)
class Block:
    name: str
    path: str  # relative to the checkout's root
    source: str  # where the facts live, named in the marker
    render: Callable[[], str]


def _schema_properties(*section: str) -> dict[str, dict[str, Any]]:
    node: dict[str, Any] = load_schema("hostconfig-v1.json")
    for name in section:
        node = node["properties"][name]
    props: dict[str, dict[str, Any]] = node["properties"]
    return props


def _show(value: Any) -> str:
    """A code default as the host config would spell it."""
    if value is None or value in ((), [], {}, ""):
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _key_table(props: dict[str, dict[str, Any]], defaults: dict[str, Any]) -> str:
    """key | default | meaning, in the schema's order; every key needs a description."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, prop in props.items():
        if "description" not in prop:
            raise ValueError(f"hostconfig-v1.json: {key} has no description")
        if "x-default" in prop:
            default = prop["x-default"]
        elif key in defaults:
            default = _show(defaults[key])
        else:
            raise ValueError(f"hostconfig-v1.json: {key} has no default in the code")
        meaning = prop["description"].replace("|", "\\|")
        rows.append(f"| `{key}` | {default} | {meaning} |")
    unknown = sorted(set(defaults) - set(props))
    if unknown:
        raise ValueError(f"settings the schema does not list: {', '.join(unknown)}")
    return "\n".join(rows) + "\n"


def host_config_table() -> str:
    """The host config's top-level keys, with HostConfig's defaults."""
    skip = {"images_allow", "images_deny", "source", "reap", "doctor"}
    defaults = {f.name: getattr(HostConfig(), f.name) for f in fields(HostConfig)}
    return _key_table(_schema_properties(), {k: v for k, v in defaults.items() if k not in skip})


def reap_table() -> str:
    """`reap:` keys, with the defaults `deskgpu.config.reap` parses."""
    return _key_table(_schema_properties("reap"), {key: spec[2] for key, spec in KEYS.items()})


def doctor_table() -> str:
    """`doctor:` keys, with DoctorSettings' defaults."""
    default = DoctorSettings()
    values = {f.name: getattr(default, f.name) for f in fields(DoctorSettings)}
    values.pop("retired")
    return _key_table(_schema_properties("doctor"), values)


BLOCKS: tuple[Block, ...] = (
    Block("host-config-keys", "docs/setup.md", "src/deskgpu/schemas/hostconfig-v1.json",
          host_config_table),
    Block("doctor-checks", "docs/doctor.md", "src/deskgpu/doctor/registry.py", readme_table),
    Block("doctor-settings", "docs/doctor.md", "src/deskgpu/schemas/hostconfig-v1.json",
          doctor_table),
    Block("reap-thresholds", "docs/reap.md", "src/deskgpu/schemas/hostconfig-v1.json",
          reap_table),
    Block("pod-config-allow-list", "docs/house-rules.md", "src/deskgpu/house_rules/podspec.py",
          readme_section),
)  # fmt: skip


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated: {re.escape(name)} [^\n]*-->\n)(.*?)(<!-- end generated: "
        rf"{re.escape(name)} -->)",
        re.S,
    )


def begin_marker(block: Block) -> str:
    return f"<!-- generated: {block.name} (from {block.source}): {REGENERATE} -->\n"


def regenerate(text: str, block: Block) -> str | None:
    """`text` with the block rewritten; None when its markers are missing."""
    found = _pattern(block.name).search(text)
    if found is None:
        return None
    new = begin_marker(block) + block.render() + found.group(3)
    return text[: found.start()] + new + text[found.end() :]


def run(root: Path, *, check: bool) -> list[str]:
    """Regenerate (or, with `check`, compare) every block; the problems, one line each."""
    problems: list[str] = []
    texts: dict[str, str] = {}
    for block in BLOCKS:
        path = root / block.path
        if block.path not in texts:
            try:
                texts[block.path] = path.read_text(encoding="utf-8")
            except OSError as exc:
                problems.append(f"{block.path}: cannot read it ({exc.strerror})")
                continue
        new = regenerate(texts[block.path], block)
        if new is None:
            problems.append(f"{block.path}: no markers for generated block {block.name}")
        elif new != texts[block.path]:
            if check:
                problems.append(f"{block.path}: block {block.name} differs from the code")
            texts[block.path] = new
    if not check:
        for rel, text in texts.items():
            path = root / rel
            if path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deskgpu.docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on drift")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout (default: .)")
    args = parser.parse_args(argv)
    problems = run(args.root, check=args.check)
    for line in problems:
        print(f"deskgpu.docs: {line}", file=sys.stderr)
    if problems and args.check:
        print(f"deskgpu.docs: regenerate with `{REGENERATE}`", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
