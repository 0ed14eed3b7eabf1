"""Run a piece of the suite as another Unix account: `nobody` (uid 65534, neither root nor in
any admin group), or one of the accounts tests/accounts.py creates.

`as_nobody(fn)` (`as_account(name, fn)`) forks, drops to that account in the child (no
exec: nothing it runs must be readable by the account), runs `fn` there and returns its
JSON-able result through a pipe.
Callers import what `fn` needs before calling, so the child loads nothing new.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

NOBODY = 65534


def as_nobody(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return as_uid(NOBODY, NOBODY, fn)


def as_account(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`fn` in a child running as Unix account `name`, with its groups (tests/accounts.py)."""
    import pwd

    entry = pwd.getpwnam(name)
    return as_uid(entry.pw_uid, entry.pw_gid, fn, os.getgrouplist(name, entry.pw_gid))


def as_uid(
    uid: int, gid: int, fn: Callable[[], dict[str, Any]], groups: list[int] | None = None
) -> dict[str, Any]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read)
            os.setgroups(groups or [])
            os.setgid(gid)
            os.setuid(uid)
            try:
                result = fn()
            except BaseException as exc:  # reported to the parent, which fails
                result = {"__error__": f"{type(exc).__name__}: {exc}"}
            os.write(write, json.dumps(result).encode())
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
    result = dict(json.loads(b"".join(chunks)))
    assert "__error__" not in result, f"the child as uid {uid} failed: {result['__error__']}"
    return result
