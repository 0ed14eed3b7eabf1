"""JSON Schema validation that speaks in file positions, field paths and fixes."""

from __future__ import annotations

import difflib
import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from deskgpu.yamlio import Located, PathKey


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema shipped in `deskgpu/schemas/`, e.g. `jobspec-v1.json`."""
    text = resources.files("deskgpu.schemas").joinpath(name).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def schema_path(name: str) -> str:
    """Filesystem path of a shipped schema (for yaml-language-server modelines)."""
    return str(resources.files("deskgpu.schemas").joinpath(name))


def _fix_for(schema: dict[str, Any], path: PathKey) -> str:
    """The `x-fix` hint of the deepest property schema along `path`."""
    node: Any = schema
    fix = ""
    for part in path:
        if not isinstance(node, dict):
            break
        props = node.get("properties", {})
        if isinstance(part, str) and part in props:
            node = props[part]
        elif "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
            node = node["additionalProperties"]
        elif "items" in node:
            node = node["items"]
        else:
            break
        fix = node.get("x-fix", fix) if isinstance(node, dict) else fix
    return fix


def _type_name(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "a mapping", list: "a list", str: "text", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def schema_problems(doc: Located, schema: dict[str, Any], what: str) -> list[str]:
    """Every schema violation in `doc`, one located line each, in file order."""
    return [text for _, text in located_schema_problems(doc, schema, what)]


def invalid_fields(doc: Located, schema: dict[str, Any]) -> set[str]:
    """Top-level fields with a schema violation (later checks skip them)."""
    if not isinstance(doc.data, dict):
        return set()
    validator = jsonschema.Draft202012Validator(schema)
    return {
        str(error.absolute_path[0])
        for error in validator.iter_errors(doc.data)
        if error.absolute_path
    }


def located_schema_problems(
    doc: Located, schema: dict[str, Any], what: str
) -> list[tuple[tuple[int, int], str]]:
    """Like `schema_problems`, keeping each line's (line, col) for merging with other checks."""
    if not isinstance(doc.data, dict):
        return [
            *doc.problems,
            (
                (1, 1),
                doc.problem(
                    (),
                    f"top level is {_type_name(doc.data)}, not a mapping of fields",
                    f"a {what} is `field: value` lines, e.g. `name: my-job`",
                ),
            ),
        ]
    validator = jsonschema.Draft202012Validator(schema)
    found: list[tuple[tuple[int, int], str]] = list(doc.problems)
    for error in validator.iter_errors(doc.data):
        path: PathKey = tuple(error.absolute_path)
        for line_text, line_path, at_key in _describe(error, path, schema, doc.data):
            found.append(doc.located(line_path, line_text[0], line_text[1], key=at_key))
    found.sort(key=lambda item: item[0])
    unique: list[tuple[tuple[int, int], str]] = []
    for item in found:
        if item not in unique:
            unique.append(item)
    return unique


# What people write for a field, by what it is called elsewhere (SkyPilot, docker, k8s).
_ALIASES = {
    "environment": "env", "envs": "env", "variables": "env", "gpu": "gpus",
    "accelerators": "gpus", "image_id": "image", "docker_image": "image", "command": "run",
    "cmd": "run", "script": "run", "install": "setup", "idle": "idle_timeout",
    "autostop": "idle_timeout", "cloud": "infra", "dir": "workdir", "working_dir": "workdir",
}  # fmt: skip


def guess_field(key: str, known: list[str]) -> str | None:
    """The known field a misspelt or borrowed name most likely means (`enviroment` -> `env`)."""
    lowered = key.lower()
    for alias, field_name in _ALIASES.items():
        if field_name in known and difflib.SequenceMatcher(None, lowered, alias).ratio() >= 0.8:
            return field_name
    close = difflib.get_close_matches(lowered, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    prefixed = [k for k in known if len(k) >= 3 and lowered.startswith(k)]
    return max(prefixed, key=len) if prefixed else None


def _describe(
    error: jsonschema.ValidationError, path: PathKey, schema: dict[str, Any], data: Any
) -> list[tuple[tuple[str, str], PathKey, bool]]:
    fix = _fix_for(schema, path)
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        parent = error.schema if isinstance(error.schema, dict) else {}
        known = sorted(parent.get("properties", {}))
        out = []
        for key in error.instance:
            if key in known:
                continue
            close = guess_field(str(key), known)
            hint = f"did you mean `{close}`?" if close else f"known fields: {', '.join(known)}"
            out.append(((f"unknown field `{key}`", hint), (*path, key), True))
        if out:
            return out
    if kind == "required":
        missing = str(error.message).split("'")[1] if "'" in error.message else "field"
        needed = _fix_for(schema, (*path, missing)) or f"add `{missing}:`"
        return [((f"missing required field `{missing}`", needed), path, False)]
    if "propertyNames" in error.schema_path:
        bad = error.instance
        return [((f"`{bad}` is not a valid name", fix), (*path, str(bad)), True)]
    value = error.instance
    shown = repr(value) if not isinstance(value, (dict, list)) else _type_name(value)
    if len(shown) > 60:  # a 5,000-digit value is not worth echoing whole
        shown = f"{shown[:40]}...({len(shown)} characters)"
    if kind == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        text = f"is {_type_name(value)} ({shown}), expected {expected}"
    elif kind in ("pattern", "oneOf", "anyOf"):
        text = f"{shown} is not valid"
    elif kind == "maxLength":
        text = f"is {len(str(value))} characters, at most {error.validator_value} allowed"
    elif kind == "minLength":
        text = "is empty" if not value else f"{shown} is too short"
    elif kind == "minimum":
        text = f"{shown} is below the minimum {error.validator_value}"
    else:
        text = error.message
    return [((text, fix), path, False)]
