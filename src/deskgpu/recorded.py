"""Recorded JSON documents: `queue --record/--snapshot`, `doctor --record/--facts`,
`reap --record/--evidence`. One way to read and write them, one set of error lines.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from deskgpu.errors import DeskgpuError, UsageError

_GZIP_MAGIC = b"\x1f\x8b"


def read_document(path: Path, what: str) -> Any:
    """Plain or gzipped JSON; an unreadable or malformed file is a usage error (exit 2)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        return json.loads(gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw)
    except (OSError, EOFError, ValueError) as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from None
    except RecursionError:
        raise UsageError(f"{path}: not a recorded document (nested too deeply)") from None


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
    files pass `failure=OutsideError`.
    """
    if indent is None:
        text = json.dumps(document, separators=(",", ":"))
    else:
        text = json.dumps(document, indent=indent)
    data = (text + "\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise failure(f"{path}: cannot write {what} ({exc.strerror or exc})") from None
