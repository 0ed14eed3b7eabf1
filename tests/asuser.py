"""Run a piece of the suite as `nobody` (uid 65534): neither root nor in any admin group.

`as_nobody(fn)` forks, drops to nobody in the child (no exec: nothing it runs must be
readable by nobody), runs `fn` there and returns its JSON-able result through a pipe.
Callers import what `fn` needs before calling, so the child loads nothing new.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

NOBODY = 65534


def as_nobody(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write, json.dumps(fn()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the non-root child failed"
    return dict(json.loads(b"".join(chunks)))
