"""Load small YAML files a person wrote, remembering where every value came from.

PyYAML alone keeps the last of two duplicate keys, expands alias bombs, and reports
problems as tracebacks. Specs and host configs go through `load_located` instead: it
composes the node tree, builds plain Python values itself (so it can count nodes and
refuse duplicates), and records the line and column of every key and value so that
later checks can point at the exact place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deskgpu.errors import SpecError

MAX_BYTES = 256 * 1024  # a job spec is a few hundred bytes; a host config a few KiB
MAX_NODES = 20_000  # after alias expansion; stops "billion laughs" documents early
MAX_DEPTH = 50  # a spec is three levels deep; a self-referencing alias is infinitely deep

PathKey = tuple[str | int, ...]


@dataclass
class Located:
    """A loaded document plus where each of its parts sits in the file."""

    source: str
    data: Any
    key_marks: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    value_marks: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    # Found while loading (duplicate keys), as ((line, col), message) for sorting with others.
    problems: list[tuple[tuple[int, int], str]] = field(default_factory=list)

    def mark_of(self, path: PathKey, *, key: bool = False) -> tuple[int, int]:
        """(line, col) of a path, falling back to its nearest located parent."""
        marks = self.key_marks if key else self.value_marks
        probe = tuple(path)
        while probe:
            if probe in marks:
                return marks[probe]
            if probe in self.key_marks:
                return self.key_marks[probe]
            probe = probe[:-1]
        return self.value_marks.get((), (1, 1))

    def where(self, path: PathKey, *, key: bool = False) -> str:
        """`file:LINE:COL` for a path."""
        line, col = self.mark_of(path, key=key)
        return f"{self.source}:{line}:{col}"

    def located(
        self, path: PathKey, what: str, fix: str = "", *, key: bool = False
    ) -> tuple[tuple[int, int], str]:
        """`problem()` with its position, for sorting problems from several checks."""
        return self.mark_of(path, key=key), self.problem(path, what, fix, key=key)

    def problem(self, path: PathKey, what: str, fix: str = "", *, key: bool = False) -> str:
        """One error line: `file:LINE:COL: field.path: what is wrong (how to fix)`."""
        dotted = dotted_path(path)
        text = f"{self.where(path, key=key)}: {dotted + ': ' if dotted else ''}{what}"
        return f"{text} ({fix})" if fix else text


def dotted_path(path: PathKey) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    def __init__(self, loc: Located, loader: yaml.SafeLoader) -> None:
        self.loc = loc
        self.loader = loader
        self.nodes = 0
        self.problems: list[tuple[tuple[int, int], str]] = []

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        if len(path) > MAX_DEPTH:
            line, col = _mark(node)
            raise SpecError(
                [
                    f"{self.loc.source}:{line}:{col}: nested more than {MAX_DEPTH} levels deep "
                    "(does a YAML alias refer to itself? write the values out)"
                ]
            )
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SpecError(
                [
                    f"{self.loc.source}:{_mark(node)[0]}:{_mark(node)[1]}: document expands to "
                    f"more than {MAX_NODES} values (YAML aliases repeated too often? "
                    "write the values out)"
                ]
            )
        self.loc.value_marks.setdefault(path, _mark(node))
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    line, col = _mark(key_node)
                    self.problems.append(
                        (
                            (line, col),
                            f"{self.loc.source}:{line}:{col}: {dotted_path(path) or 'top level'}: "
                            "a key must be a plain word (write `name: value`)",
                        )
                    )
                    continue
                key = self._scalar(key_node)
                if not isinstance(key, str):
                    line, col = _mark(key_node)
                    self.problems.append(
                        (
                            (line, col),
                            f"{self.loc.source}:{line}:{col}: {dotted_path(path) or 'top level'}: "
                            f"key `{key_node.value or '~'}` is not text (quote it: "
                            f'`"{key_node.value}": ...`)',
                        )
                    )
                    continue
                child = (*path, key)
                if key in out:
                    line, col = _mark(key_node)
                    first_line = self.loc.key_marks[child][0]
                    self.problems.append(
                        (
                            (line, col),
                            f"{self.loc.source}:{line}:{col}: {dotted_path(child)}: duplicate "
                            f"key, first set on line {first_line} (keep one of them)",
                        )
                    )
                    continue
                self.loc.key_marks[child] = _mark(key_node)
                out[key] = self.build(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> Any:
        line, col = _mark(node)
        try:
            value = self.loader.construct_object(node)
        except (
            ValueError, TypeError, OverflowError, KeyError, yaml.constructor.ConstructorError,
        ) as exc:  # fmt: skip
            # e.g. a timestamp out of range, an unknown `!!tag`, `!!bool maybe`
            where = f"{self.loc.source}:{line}:{col}"
            if node.tag == "tag:yaml.org,2002:merge":
                raise SpecError(
                    [f"{where}: a merge key (`<<:`) is not supported (write the keys out)"]
                ) from None
            if isinstance(exc, yaml.constructor.ConstructorError) and node.tag.startswith("!"):
                raise SpecError(
                    [f"{where}: YAML tag {node.tag[:40]} is not supported (remove it, or quote "
                     "the value)"]
                ) from None  # fmt: skip
            problem = getattr(exc, "problem", None)
            why = f"{type(exc).__name__} {exc}" if isinstance(exc, KeyError) else str(exc)
            if isinstance(exc, yaml.constructor.ConstructorError) and problem:
                why = problem  # PyYAML's own context lines repeat the file: one line is ours
            if "integer string conversion" in why:
                why = "a number with thousands of digits"
            why = " ".join(why.split())[:200]
            raise SpecError([f"{where}: value cannot be read: {why} (quote it)"]) from None
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 63:
            raise SpecError(
                [f"{self.loc.source}:{line}:{col}: a number too large for any setting "
                 f"({value.bit_length()} bits; is it the right value?)"]
            )  # fmt: skip
        return value


def _too_big(source: str, size: int) -> SpecError:
    return SpecError(
        [
            f"{source}:1:1: file is {size / 1024 / 1024:.1f} MB; a job spec or host config "
            "is a few KB at most (is this the right file?)"
        ]
    )


def load_located(text_or_bytes: bytes | str, source: str, *, empty_ok: bool = False) -> Located:
    """Parse one YAML document; every problem becomes a located `SpecError`.

    `empty_ok`: an empty document (or only comments) is an empty mapping, as a host config
    that means "the built-in defaults" is written; a spec must say something.
    """
    if len(text_or_bytes) > MAX_BYTES:
        raise _too_big(source, len(text_or_bytes))
    if isinstance(text_or_bytes, bytes):
        try:
            text = text_or_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            before = text_or_bytes[: exc.start]
            line = before.count(b"\n") + 1
            col = exc.start - (before.rfind(b"\n") + 1) + 1
            raise SpecError(
                [
                    f"{source}:{line}:{col}: byte 0x{text_or_bytes[exc.start]:02x} is not UTF-8 "
                    "(save the file as UTF-8)"
                ]
            ) from None
    else:
        text = text_or_bytes
    text = text.removeprefix("\ufeff")
    loc = Located(source=source, data=None)
    if not text.strip() or all(
        not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        if empty_ok:
            return Located(source=source, data={})
        raise SpecError([f"{source}:1:1: file is empty (write at least `name:` and `run:`)"])
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        raise SpecError([_describe_reader_error(exc, text, source)]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError([f"{source}:1:1: file is empty (write at least `name:` and `run:`)"])
        builder = _Builder(loc, loader)
        loc.data = builder.build(node, ())
    except yaml.MarkedYAMLError as exc:
        raise SpecError([_describe_yaml_error(exc, source)]) from None
    except yaml.reader.ReaderError as exc:
        raise SpecError([_describe_reader_error(exc, text, source)]) from None
    except yaml.YAMLError as exc:  # pragma: no cover - PyYAML marks nearly everything
        raise SpecError([f"{source}:1:1: not valid YAML: {exc}"]) from None
    except RecursionError:
        # PyYAML composes recursively: thousands of `[` exhaust the stack before our guard.
        raise SpecError(
            [f"{source}:1:1: nested too deeply to read (flatten the structure)"]
        ) from None
    finally:
        loader.dispose()
    loc.problems = builder.problems
    return loc


def _describe_reader_error(exc: yaml.reader.ReaderError, text: str, source: str) -> str:
    before = text[: exc.position]
    line = before.count("\n") + 1
    col = exc.position - (before.rfind("\n") + 1) + 1
    char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
    return (
        f"{source}:{line}:{col}: control character U+{char:04X} is not allowed in YAML "
        "(remove it; was the file saved as text?)"
    )


def _describe_yaml_error(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    if exc.context_mark and "end of stream" in (exc.problem or ""):
        mark = exc.context_mark  # point at the unclosed quote or bracket, not the file's end
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = exc.problem or "not valid YAML"
    if "'\\t'" in problem or "tab" in problem:
        return f"{source}:{line}:{col}: tab character in indentation (indent with spaces)"
    if "expected a single document" in (exc.context or "") + problem:
        return f"{source}:{line}:{col}: more than one YAML document (keep one; remove `---`)"
    if "found undefined alias" in (exc.context or "") + problem:
        return f"{source}:{line}:{col}: {problem} (define the &anchor before using it)"
    context = f"{exc.context}, " if exc.context else ""
    return (
        f"{source}:{line}:{col}: not valid YAML: {context}{problem} (check indentation and quoting)"
    )


def read_located(path: Path, source: str | None = None, *, empty_ok: bool = False) -> Located:
    """Read and parse a YAML file; unreadable files become a located `SpecError`."""
    label = source or str(path)
    try:
        if path.is_dir():
            raise SpecError([f"{label}: is a directory (pass the YAML file itself)"])
        if path.exists() and not path.is_file():
            # A FIFO would block forever and /dev/zero never ends.
            raise SpecError([f"{label}: not a regular file (pass the YAML file itself)"])
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
            if len(raw) > MAX_BYTES:
                raise _too_big(label, path.stat().st_size)
    except FileNotFoundError:
        raise SpecError([f"{label}: no such file (check the path)"]) from None
    except PermissionError:
        raise SpecError([f"{label}: permission denied (check the file's mode)"]) from None
    except OSError as exc:
        raise SpecError([f"{label}: cannot read: {exc.strerror or exc}"]) from None
    return load_located(raw, label, empty_ok=empty_ok)


def yaml_get(text: str | None, path: tuple[str, ...]) -> Any:
    """The value at `path` in a YAML text, or None (unparseable, absent, not a mapping)."""
    if not text:
        return None
    try:
        node: Any = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node
