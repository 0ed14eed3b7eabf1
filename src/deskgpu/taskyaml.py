"""SkyPilot task dicts as readable YAML: multi-line scripts as `|` blocks, keys in order."""

from __future__ import annotations

from typing import Any

import yaml


class _TaskDumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_TaskDumper.add_representer(str, _str_representer)


def dump_task(task: dict[str, Any], header: list[str] | None = None) -> str:
    body = yaml.dump(task, Dumper=_TaskDumper, sort_keys=False, default_flow_style=False, width=100)
    lines = "".join(f"# {printable(line)}\n" for line in header or [])
    return lines + body


def printable(text: str) -> str:
    """`text` on one line with no control characters: a file name with a newline in it must
    not end a YAML comment (the rest would become task YAML) or move a terminal's cursor."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
