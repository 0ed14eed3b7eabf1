"""Recorded JSON documents: `queue --record/--snapshot`, `doctor --record/--facts`,
`reap --record/--evidence`. One way to read and write them, one set of error lines.

Reading is bounded whatever the user points at: regular files only (a FIFO would block
forever, `/dev/zero` never ends), at most `MAX_BYTES` on disk and `MAX_EXPANDED` once
gunzipped, at most `MAX_DEPTH` levels of nesting, and strict JSON (no NaN or Infinity, in or
out). Writing never replaces what is not a regular file (`--record /dev/null` as root stays a
device).
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import stat
import zlib
from pathlib import Path
from typing import Any

from deskgpu.errors import DeskgpuError, UsageError

_GZIP_MAGIC = b"\x1f\x8b"
MAX_BYTES = 64 * 1024 * 1024  # a week of evidence for a full box is a few MiB
MAX_EXPANDED = 256 * 1024 * 1024
MAX_DEPTH = 64  # the documents are five levels deep


def read_bounded(path: Path, what: str, limit: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file, at most `limit`; anything else is a usage error (exit 2)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise UsageError(f"{path}: {kind}, not a file deskgpu can read {what} from")
        if st.st_size > limit:
            raise UsageError(f"{path}: {st.st_size} bytes, more than {what} can be ({limit})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UsageError(f"{path}: more than {limit} bytes; not {what}")
    return data


def _gunzip(raw: bytes, path: Path) -> bytes:
    out = io.BytesIO()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            while chunk := f.read(1024 * 1024):
                out.write(chunk)
                if out.tell() > MAX_EXPANDED:
                    raise UsageError(
                        f"{path}: expands to more than {MAX_EXPANDED} bytes; not a recorded "
                        "document"
                    )
    except (OSError, EOFError, zlib.error) as exc:
        raise UsageError(f"{path}: not gzip ({exc})") from None
    return out.getvalue()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(doc: Any, path: Path) -> None:
    """Refuse documents nested deeper than any recorded one (they would crash later)."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UsageError(
                f"{path}: nested more than {MAX_DEPTH} levels; not a recorded document"
            )
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def read_document(path: Path, what: str) -> Any:
    """Plain or gzipped JSON; an unreadable or malformed file is a usage error (exit 2)."""
    raw = read_bounded(path, what)
    if raw[:2] == _GZIP_MAGIC:
        raw = _gunzip(raw, path)
    try:
        doc = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise UsageError(f"{path}: not a recorded document (nested too deeply)") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise UsageError(f"{path}: not JSON ({exc})") from None
    _depth(doc, path)
    return doc


def dumps(document: Any, *, indent: int | None = 2) -> str:
    """Strict JSON: a NaN or an infinity that got into a document is refused, not written."""
    if indent is None:
        return json.dumps(document, separators=(",", ":"), allow_nan=False)
    return json.dumps(document, indent=indent, allow_nan=False)


def finite(document: Any) -> Any:
    """`document` with every NaN or infinity replaced by null (what a reading it is not)."""
    if isinstance(document, float) and (document != document or document in (_INF, -_INF)):
        return None
    if isinstance(document, dict):
        return {k: finite(v) for k, v in document.items()}
    if isinstance(document, (list, tuple)):
        return [finite(v) for v in document]
    return document


_INF = float("inf")


def to_json(document: Any, *, indent: int | None = 2) -> str:
    """What `--json` prints: strict JSON, a non-finite number as null, other objects as text."""
    clean = finite(document)
    if indent is None:
        return json.dumps(clean, separators=(",", ":"), allow_nan=False, default=str)
    return json.dumps(clean, indent=indent, allow_nan=False, default=str)


def check_writable_target(path: Path, what: str) -> None:
    """`--record PATH` may create or replace a regular file, nothing else (exit 2 otherwise)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise UsageError(f"{path}: no directory {parent} to write {what} in") from None
        return
    except OSError as exc:
        raise UsageError(f"{path}: cannot write {what} ({exc.strerror or exc})") from None
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{path}: a symbolic link; {what} replaces only a regular file")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: not a regular file; {what} replaces only a regular file")


def write_document(
    path: Path,
    document: Any,
    what: str,
    *,
    indent: int | None = 2,
    failure: type[DeskgpuError] = UsageError,
) -> None:
    """Atomically, so a reader (`--watch --record`) never sees half a file; gzipped for `.gz`.

    A path the user named that cannot be written is a usage error; deskgpu's own state
    files pass `failure=OutsideError`. A path that exists and is not a regular file (a FIFO,
    a device, a symlink) is never replaced.
    """
    try:
        text = dumps(document, indent=indent)
    except ValueError as exc:
        raise failure(f"{path}: {what} holds a value JSON cannot carry ({exc})") from None
    data = (text + "\n").encode("utf-8")
    write_file(path, gzip.compress(data) if path.suffix == ".gz" else data, what, failure=failure)


def write_file(
    path: Path, data: bytes, what: str, *, failure: type[DeskgpuError] = UsageError
) -> None:
    """Replace the regular file `path` (or create it) with `data`, atomically: never a FIFO,
    a device or a symlink's target (`check_writable_target`)."""
    if str(path) in ("", "."):
        raise failure(f"{what}: an empty path")
    try:
        check_writable_target(path, what)
    except UsageError as exc:
        raise failure(str(exc)) from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENAMETOOLONG:
            reason = "file name too long"
        raise failure(f"{path}: cannot write {what} ({reason})") from None
